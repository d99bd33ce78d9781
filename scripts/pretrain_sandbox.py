"""Contrastive pretraining of the tiny CLIP on the synthetic world: `python scripts/pretrain_sandbox.py`.

Every step draws a fresh batch of images and captions from the pretraining distribution
(datasets.synthetic.PRETRAIN: some colour-shape pairs and backgrounds are never shown) and takes an
AdamW step on open_clip's ClipLoss, as open_clip's own training script does (learned temperature clamped
at 100, no weight decay on gains and biases). The result is saved as an open_clip-loadable state dict,
with a JSON record of the run beside it. Settings: configs/pretrain_sandbox.yaml. main.py calls
`build_if_missing` for a model config with pretrain_if_missing (model=tiny_pretrained).
"""
import inspect
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from open_clip.loss import ClipLoss
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: datasets/ and so/ beside scripts/
from datasets.synthetic import pretraining_batch  # noqa: E402
from so.model import build_clip, encode_text, tokenize  # noqa: E402
from so.runs import save_atomic, write_json_atomic  # noqa: E402

log = logging.getLogger(__name__)
CONFIG = ROOT / "configs" / "pretrain_sandbox.yaml"


def pretrain(out, model, seed, steps, batch_size, lr, warmup, weight_decay, threads=None):
    """Pretrain `model` from random weights and save its state dict to `out`; returns the run record.
    The caller's torch RNG state and thread count are left as they were. `recipe()` gives the arguments."""
    threads_before = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            if threads:
                torch.set_num_threads(threads)
            torch.manual_seed(seed)
            clip, record = train_clip(model, seed, steps, batch_size, lr, warmup, weight_decay, Path(out).name)
    finally:
        torch.set_num_threads(threads_before)
    out = Path(out).expanduser()
    save_atomic(clip.state_dict(), out)  # readers never see a partial checkpoint
    write_json_atomic(out.with_suffix(".json"), record, indent=2)
    log.info("Saved %s (final loss %.3f, %.0f s)", out, record["final_loss"], record["seconds"])
    return record


def train_clip(model, seed, steps, batch_size, lr, warmup, weight_decay, desc):
    """The pretraining loop; returns the model and the record of the run."""
    clip, _, tokenizer = build_clip(model)
    generator = torch.Generator().manual_seed(seed + 1)
    mean = torch.tensor(clip.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(clip.visual.preprocess_cfg["std"]).view(1, 3, 1, 1) * 255
    no_decay = lambda name, p: p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
    params = list(clip.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": weight_decay}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = lambda t: (t + 1) / warmup if t < warmup else \
        0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = ClipLoss()
    clip.train()
    start, losses = time.perf_counter(), []
    for _ in (bar := tqdm(range(steps), desc=f"pretrain {desc}")):
        images, captions = pretraining_batch(batch_size, generator)
        image = clip.encode_image((images.float() - mean) / std, normalize=True)
        text = encode_text(clip, tokenize(tokenizer, captions, "cpu"))
        loss = loss_fn(image, text, clip.logit_scale.exp())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    clip.eval()
    last = losses[-20:] or [float("nan")]
    record = {"model": model, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
              "weight_decay": weight_decay, "threads": torch.get_num_threads(), "final_loss": sum(last) / len(last),
              "seconds": time.perf_counter() - start, "torch": torch.__version__}
    return clip, record


PRETRAIN_ARGS = tuple(inspect.signature(pretrain).parameters)


def settings(cfg):
    """The arguments of `pretrain` from a config shaped like configs/pretrain_sandbox.yaml."""
    cfg = OmegaConf.to_container(cfg, resolve=True)
    return {k: cfg[k] for k in PRETRAIN_ARGS}


def recipe(**overrides):
    """The arguments of `pretrain`: configs/pretrain_sandbox.yaml with `overrides`, which must name
    `out` (the file's own default needs the paths group, which only a Hydra run composes)."""
    return settings(OmegaConf.merge(OmegaConf.load(CONFIG), overrides))


def build_if_missing(path, model):
    """Pretrain `model` into `path` with configs/pretrain_sandbox.yaml unless `path` exists."""
    path = Path(path).expanduser()
    if path.is_file():
        return
    log.warning("%s is missing: pretraining it now with %s (minutes on a CPU).", path, CONFIG.name)
    pretrain(**recipe(out=str(path), model=model))


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_sandbox")
def main(cfg: DictConfig):
    out = Path(cfg.out).expanduser()
    if out.is_file() and not cfg.force:
        log.info("%s exists; force=true pretrains it again.", out)
        return
    pretrain(**settings(cfg))


if __name__ == "__main__":
    main()
