"""A trained run as a model you can use: rebuilt from its results.json and trained.pt, its adapters
merged (an open_clip CLIP again, scripts/export.py), its classes predicted (scripts/predict.py)."""
import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from so.clip.head_kinds import KIND_KEYS
from so.clip.lora import merge_adapters
from so.clip.methods import build_method, load_trained
from so.clip.model import build_clip, class_embeddings, tokenize
from so.clip.runs import current_layout
from so.clip.runtime import seed_everything
from so.clip.step import LOGIT_SCALE


def read_run(run_dir):
    """results.json of a run folder that has trained.pt; errors say what is missing."""
    run_dir = Path(run_dir)
    results_file, trained = run_dir / "results.json", run_dir / "trained.pt"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file} not found: expected a run folder of main.py")
    results = json.loads(results_file.read_text())
    if current_layout(results["config"])["method"]["kind"] == "zeroshot":
        raise ValueError(f"{run_dir} is a zero-shot run: nothing was trained; use the model's own weights "
                         f"({results['config']['model']['name']}, {results['config']['model']['pretrained']})")
    method = current_layout(results["config"])["method"]
    if method["kind"] in KIND_KEYS:
        raise ValueError(f"{run_dir}: method={method['name']} trained a head on CLIP's image features (a prompt "
                         "context, adapter, cache or probe), not CLIP's weights; export and predict take a run of a "
                         "method that trains CLIP's weights or LoRA adapters. Its trained.pt holds the head's tensors.")
    if not trained.is_file():
        raise FileNotFoundError(f"{trained} not found: train the run with save=true")
    if "classnames" not in results:
        raise ValueError(f"{results_file} records no class names (a run of an earlier version): run it again "
                         "with save=true force=true")
    return results


def load_run(run_dir, device="cpu"):
    """(merged model, eval transform, tokenizer, results) of a trained run: the model built as main.py
    built it (the same seed for random weights), the trained tensors loaded, adapters merged."""
    results = read_run(run_dir)
    config = current_layout(results["config"])
    seed_everything(config["seed"])
    model, transform, tokenizer = build_clip(config["model"]["name"], config["model"]["pretrained"], device=device,
                                             allow_unsafe_pickle=config["model"]["allow_unsafe_pickle"])
    optimizer = {k: False if k in ("step_in_backward", "sparse_backward") else v  # inference: plain layers
                 for k, v in config["optimizer"].items()}
    method = build_method(config["method"], optimizer, model, seed=config["seed"])
    load_trained(method, model, Path(run_dir) / "trained.pt")
    return merge_adapters(model).eval(), transform, tokenizer, results


def open_clip_state_dict(model, name):
    """The merged model's weights, checked to load into open_clip's `name` with no missing or
    unexpected key."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fresh = open_clip.create_model(name)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the merged model does not load into open_clip's {name}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return state


@torch.no_grad()
def classify(model, tokenizer, transform, classnames, templates, images, device="cpu", batch_size=64):
    """Class probabilities [N, C] of the images (PIL images), softmax of 100 x cosine as in training."""
    model.eval()
    text = class_embeddings(model, tokenize(tokenizer, [t.format(c) for c in classnames for t in templates], device),
                            len(templates))
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start:start + batch_size]]).to(device)
        features = F.normalize(model.encode_image(batch), dim=-1)
        out.append((LOGIT_SCALE * features @ text.T).softmax(dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, len(classnames))
