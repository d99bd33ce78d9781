"""Contrastive pretraining of a CLIP from random weights on a stream of image-caption batches: how the
sandbox model (model=tiny_pretrained) is made from the synthetic world (datasets/synthetic.py).

Every step takes a fresh batch from `batches(n, generator)` (uint8 images, captions) and an AdamW step
on open_clip's ClipLoss, as open_clip's own training script does (learned temperature clamped at 100, no
weight decay on gains and biases). The result is saved as an open_clip-loadable state dict, with a JSON
record of the run beside it. scripts/pretrain_sandbox.py runs it from configs/pretrain_sandbox.yaml;
main.py runs it when model=tiny_pretrained's checkpoint is missing.
"""
import inspect
import logging
import math
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from tqdm import tqdm

from so.clip.model import build_clip, encode_text, tokenize
from so.files import save_atomic, write_json_atomic

log = logging.getLogger(__name__)


def pretrain(out, model, batches, seed, steps, batch_size, lr, warmup, weight_decay, threads=None):
    """Pretrain `model` from random weights and save its state dict to `out`; returns the run record.
    The caller's torch RNG state and thread count are left as they were."""
    threads_before = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            if threads:
                torch.set_num_threads(threads)
            torch.manual_seed(seed)
            clip, record = train_clip(model, batches, seed, steps, batch_size, lr, warmup, weight_decay,
                                      Path(out).name)
    finally:
        torch.set_num_threads(threads_before)
    out = Path(out).expanduser()
    save_atomic(clip.state_dict(), out)  # readers never see a partial checkpoint
    write_json_atomic(out.with_suffix(".json"), record, indent=2)
    log.info("Saved %s (final loss %.3f, %.0f s)", out, record["final_loss"], record["seconds"])
    return record


RECIPE = tuple(k for k in inspect.signature(pretrain).parameters if k != "batches")  # a config's keys


def train_clip(model, batches, seed, steps, batch_size, lr, warmup, weight_decay, desc):
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
    for _ in (bar := tqdm(range(steps), desc=f"pretrain {desc}", disable=None)):  # no bar when not a TTY
        images, captions = batches(batch_size, generator)
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
