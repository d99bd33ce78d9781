"""Seconds per training iteration, GFLOPs, peak GPU memory and gradient bytes of the harness's train
step, per method and class count, on a randomly initialised CLIP (no weights needed) with synthetic
images and class names.

    python scripts/bench_train_step.py --json                       # ViT-B/16 on CUDA when present
    python scripts/bench_train_step.py --json --device cpu --model tiny
    python scripts/bench_train_step.py --json --methods so,adam,lora --interleave
    python scripts/bench_train_step.py --json --methods so,so:optimizer.sparse_backward=false

One JSON object per line: method, classes, s_per_iter (median over --iters timed iterations after
--warmup), gflops (torch.utils.flop_counter over one more iteration: matmuls and convolutions, forward
and backward), grad_bytes (the bytes of gradient tensors alive when the optimizer steps: .grad of
every parameter, and what SO read in backward), peak_gib (CUDA only), device, model, precision,
batch_size, compile. --methods takes method presets (configs/method/), METHOD+OPTIMIZER pairs (lora+so:
SO on LoRA's factors) and overrides after ':' (so:optimizer.sparse_backward=false); their configs are
composed as main.py composes them. --interleave times the methods in turns, one iteration of each per
round, so that a busy machine slows them alike.
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
from torch.utils.flop_counter import FlopCounterMode

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


def method_config(spec):
    """(method, optimizer) configs of a preset, a METHOD+OPTIMIZER pair, either with ':key=value'
    overrides, as main.py composes them."""
    name, *overrides = spec.split(":")
    method, _, optimizer = name.partition("+")
    cfg = OmegaConf.to_container(compose("dataset=synthetic", f"method={method}", *overrides,
                                         *([f"optimizer={optimizer}"] if optimizer else [])), resolve=True)
    return cfg["method"], cfg["optimizer"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """One method's model, optimizer, prompts and batch, ready to step."""

    def __init__(self, spec, classes, model_name, device, precision, batch_size, compile_mode):
        torch.manual_seed(0)
        self.model, _, tokenizer = build_clip(MODELS[model_name], None, device=device)
        self.method = build_method(*method_config(spec), self.model, seed=0)
        dataset = SimpleNamespace(classnames=class_names(classes), templates=["a photo of a {}."])
        self.prompts = Prompts(dataset, tokenizer, device)
        size = square_size(self.model.visual.image_size)
        self.images = torch.randn(batch_size, 3, size, size, device=device)
        self.labels = torch.randint(classes, (batch_size,), device=device)
        self.text = None
        if all(name.startswith("visual.") for name in self.method.trainable):
            with torch.no_grad(), autocast(precision, device):
                self.text = self.prompts.embeddings(self.model)
        self.model.train()
        self.loss_fn = compiled(forward_loss, compile_mode)  # compiled during the warm-up iterations
        self.precision, self.device, self.times, self.grad_bytes = precision, device, [], 0
        self.method.optimizer.register_step_pre_hook(self.count_grads)
        self.row = {"method": spec, "classes": classes, "device": str(device), "model": model_name,
                    "precision": precision, "batch_size": batch_size, "compile": compile_mode}

    def count_grads(self, optimizer, args, kwargs):
        dense = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        read = sum(r.values.numel() * r.values.element_size() for r in getattr(optimizer, "_reads", {}).values())
        self.grad_bytes = max(self.grad_bytes, dense + read)

    def step(self, timed=True):
        sync(self.device)
        start = time.perf_counter()
        train_step(self.model, self.prompts, self.images, self.labels, self.method.optimizer, self.precision,
                   self.device, self.text, self.loss_fn, closure_step=self.method.closure_step)
        sync(self.device)
        if timed:
            self.times.append(time.perf_counter() - start)

    def gflops(self):
        with FlopCounterMode(display=False) as counter:
            self.step(timed=False)
        return counter.get_total_flops() / 1e9


def bench(specs, classes, args, device):
    """Rows for `specs` at `classes`: one method after the other, or in turns (--interleave)."""
    build = lambda spec: Setup(spec, classes, args.model, device, args.precision, args.batch_size,  # noqa: E731
                               args.compile)
    setups = [build(spec) for spec in specs] if args.interleave else None
    rows = []
    for i, spec in enumerate(specs):
        setup = setups[i] if setups else build(spec)
        if setups is None or i == 0:
            reset_peak(device)
        if setups is None:
            for k in range(args.warmup + args.iters):
                setup.step(timed=k >= args.warmup)
            rows.append(finish(setup, device))
    if setups:
        for k in range(args.warmup + args.iters):
            for setup in setups:
                setup.step(timed=k >= args.warmup)
        rows = [finish(setup, device) for setup in setups]
    return rows


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def finish(setup, device):
    """The row of a setup that has stepped: its timings, its FLOPs over one more iteration, peak memory
    (with --interleave, the peak of all the methods' models together)."""
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {**setup.row, "s_per_iter": statistics.median(setup.times), "gflops": setup.gflops(),
            "grad_bytes": setup.grad_bytes, "peak_gib": peak}


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
    parser.add_argument("--interleave", action="store_true",
                        help="build every method's model first, then time one iteration of each per round")
    args = parser.parse_args()
    device = torch.device(args.device)
    set_tf32(True)  # as main.py sets for trials under the paper's protocol
    for classes in map(int, args.classes.split(",")):
        for row in bench(args.methods.split(","), classes, args, device):
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
                print(f"{row['method']:24s} {classes:5d} classes  {row['s_per_iter'] * 1e3:8.1f} ms/iter  "
                      f"{row['gflops']:8.2f} GFLOP  {row['grad_bytes'] / 2**20:8.1f} MiB of gradients  {peak}")


if __name__ == "__main__":
    main()
