"""Seconds per training iteration and peak GPU memory of the harness's train step, per method and
class count, on a randomly initialised CLIP (no weights needed) with synthetic images and class names.

    python scripts/bench_train_step.py --json                       # ViT-B/16 on CUDA when present
    python scripts/bench_train_step.py --json --device cpu --model tiny
    python scripts/bench_train_step.py --json --model vit_l14        # any configs/model/ backbone

One JSON object per line: method, classes, s_per_iter (median over --iters timed iterations after
--warmup), peak_gib (CUDA only), device, model, precision, batch_size, compile. --methods takes method
presets (configs/method/) and METHOD+OPTIMIZER pairs (e.g. lora+so: SO on LoRA's factors); their
configs are composed as main.py composes them.
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.pipeline import square_size  # noqa: E402
from main import compose  # noqa: E402
from so.clip.methods import build_method  # noqa: E402
from so.clip.model import build_clip  # noqa: E402
from so.clip.runtime import COMPILE_MODES, autocast, compiled, set_tf32  # noqa: E402
from so.clip.step import Prompts, forward_loss, train_step  # noqa: E402

MODELS = {"vit_b16": "ViT-B-16-quickgelu", "vit_b32": "ViT-B-32-quickgelu", "vit_l14": "ViT-L-14-quickgelu",
          "vit_b16_laion": "ViT-B-16", "tiny": "so-tiny", "tiny_l14": "so-tiny-l14"}  # configs/model/ names
WORDS = ("red", "striped", "small", "aircraft", "garden", "wooden", "spotted", "river", "old", "cat")


def class_names(count, seed=0):
    """Names of 1 to 4 words, so prompt lengths vary like a real benchmark's."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) + f" {i}" for i in range(count)]


def method_config(name):
    """(method, optimizer) configs of a preset name or a METHOD+OPTIMIZER pair, as main.py composes them."""
    method, _, optimizer = name.partition("+")
    cfg = OmegaConf.to_container(compose("dataset=synthetic", f"method={method}",
                                         *([f"optimizer={optimizer}"] if optimizer else [])), resolve=True)
    return cfg["method"], cfg["optimizer"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(method_name, classes, model_name, device, precision, batch_size, iters, warmup, compile_mode):
    torch.manual_seed(0)
    model, _, tokenizer = build_clip(MODELS[model_name], None, device=device)
    method = build_method(*method_config(method_name), model, seed=0)
    dataset = SimpleNamespace(classnames=class_names(classes), templates=["a photo of a {}."])
    prompts = Prompts(dataset, tokenizer, device)
    size = square_size(model.visual.image_size)
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(classes, (batch_size,), device=device)
    text = None
    if all(name.startswith("visual.") for name in method.trainable):
        with torch.no_grad(), autocast(precision, device):
            text = prompts.embeddings(model)
    model.train()
    loss_fn = compiled(forward_loss, compile_mode)  # compiled during the warm-up iterations
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        train_step(model, prompts, images, labels, method.optimizer, precision, device, text, loss_fn)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"method": method_name, "classes": classes, "s_per_iter": statistics.median(times),
            "peak_gib": peak, "device": str(device), "model": model_name, "precision": precision,
            "batch_size": batch_size, "compile": compile_mode}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_b16")
    parser.add_argument("--methods", default="so,adam,lora,relora,galore")
    parser.add_argument("--classes", default="47,397,1000")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                        help="torch.compile the forward and backward (compiled during warm-up)")
    args = parser.parse_args()
    device = torch.device(args.device)
    set_tf32(True)  # as main.py sets for trials under the paper's protocol
    for method_name in args.methods.split(","):
        for classes in map(int, args.classes.split(",")):
            row = bench(method_name, classes, args.model, device, args.precision, args.batch_size,
                        args.iters, args.warmup, args.compile)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
                print(f"{method_name:8s} {classes:5d} classes  {row['s_per_iter'] * 1e3:8.1f} ms/iter  {peak}")


if __name__ == "__main__":
    main()
