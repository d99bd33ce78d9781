"""One trial: zero-shot evaluation, training (train.py), final evaluation; results.json and W&B.

`run(cfg, parts, run_dir)` takes the composed config and the parts main.py built (`Parts`), and writes
run_dir/results.json: the trial's key, status (finished or diverged), zero-shot and final top-1,
iterations, train seconds, trainable parameters, peak GPU memory and the resolved config. With
base_to_novel, training and `top1` are on the base classes, and the novel classes are evaluated too.
"""
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

import train
from datasets.classes import base_and_novel, harmonic_mean
from datasets.pipeline import test_loader
from so.clip.methods import Method, load_trained, save_trained
from so.clip.runtime import autocast
from so.clip.step import Prompts
from so.clip.tracking import start_run
from so.clip.updates import UpdateCounts
from so.files import finite, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """What main.py builds for a trial."""
    model: torch.nn.Module
    eval_transform: object   # open_clip's eval preprocess
    tokenizer: object
    dataset: object          # datasets.FewShotDataset
    method: Method
    device: torch.device


@torch.no_grad()
def evaluate(model, prompts, loader, precision, device, desc):
    """Top-1 accuracy in percent over `loader`."""
    model.eval()
    with autocast(precision, device):
        text = prompts.embeddings(model)
        correct = total = 0
        for images, labels in tqdm(loader, desc=desc, leave=False):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            image = F.normalize(model.encode_image(images), dim=-1)
            correct += (image @ text.T).argmax(dim=-1).eq(labels).sum()
            total += labels.numel()
    return 100.0 * float(correct) / max(total, 1)


def eval_subset(records, size, seed):
    """`size` of the test records, drawn with random.Random(seed), in split order; all of them when
    size is 0 or not smaller than the split."""
    if not size or size >= len(records):
        return records
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), size))]


def run(cfg, parts, run_dir):
    """One trial; writes run_dir/results.json and returns it."""
    model, method, device = parts.model, parts.method, parts.device
    config = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset, novel = base_and_novel(parts.dataset) if cfg.base_to_novel else (parts.dataset, None)
    wandb_run = start_run(cfg.logger, config, run_dir, f"{dataset.name}-{method.name}-{cfg.shots}shot-seed{cfg.seed}")
    prompts = Prompts(dataset, parts.tokenizer, device)
    loader = test_loader(dataset.test, parts.eval_transform, cfg.eval_batch_size, cfg.num_workers)
    on_novel = None
    if novel is not None:
        novel_prompts = Prompts(novel, parts.tokenizer, device)
        novel_loader = test_loader(novel.test, parts.eval_transform, cfg.eval_batch_size, cfg.num_workers)
        on_novel = lambda desc: evaluate(model, novel_prompts, novel_loader, cfg.precision, device, desc)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    zeroshot_top1 = evaluate(model, prompts, loader, cfg.precision, device, "zero-shot eval")
    zeroshot_novel = on_novel("zero-shot eval, novel classes") if on_novel else None
    log.info("zero-shot top-1: %.2f", zeroshot_top1)
    done, seconds, probe, curve_images, counts = train.Outcome(), 0.0, None, None, None
    if cfg.eval_every:  # the curve's top-1, on the whole test split or a seeded subset of it
        subset = eval_subset(dataset.test, cfg.eval_subset, cfg.seed)
        curve_images = len(subset)
        probe_loader = loader if subset is dataset.test else test_loader(subset, parts.eval_transform,
                                                                         cfg.eval_batch_size, cfg.num_workers)
        probe = lambda: evaluate(model, prompts, probe_loader, cfg.precision, device, "curve eval")  # noqa: E731
    if cfg.eval_only:
        load_trained(method, model, Path(cfg.trained_from or run_dir) / "trained.pt")
    elif method.optimizer is not None:
        if cfg.count_updates and method.counts_updates:
            counts = UpdateCounts(method.optimizer, {p: n for n, p in method.trainable.items()})
        elif cfg.count_updates:
            log.warning("count_updates=true ignored: optimizer=%s keeps no per-entry state to count (only SO does).",
                        cfg.optimizer.name)
        start = time.perf_counter()
        done = train.train(cfg, model, prompts, method, dataset.train_x, device, wandb_run, counts, probe)
        seconds = time.perf_counter() - start
    top1 = novel_top1 = None
    if not done.diverged_at:
        top1 = evaluate(model, prompts, loader, cfg.precision, device, "final eval")
        novel_top1 = on_novel("final eval, novel classes") if on_novel else None
        log.info("final top-1: %.2f (%d iterations%s)", top1, done.iterations,
                 ", stopped early" if done.stopped_early else "")
        if cfg.save and method.optimizer is not None and not cfg.eval_only:  # after the result is logged,
            save_trained(method, model, run_dir / "trained.pt")  # so that a full disk loses no top-1
    if counts is not None:
        counts.save(run_dir / "update_counts.pt")

    results = {
        "dataset": dataset.name,
        "shots": cfg.shots,
        "seed": cfg.seed,
        "method": method.name,
        "name": cfg.name,
        "status": "diverged" if done.diverged_at else "finished",
        "diverged_at": done.diverged_at,
        "zeroshot_top1": zeroshot_top1,
        "top1": top1,
        "iterations": done.iterations,
        "stopped_early": done.stopped_early,
        "final_loss": done.final_loss,
        "train_seconds": seconds,
        "trainable_params": method.trainable_params,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "device": str(device),
        "config": config,
    }
    if cfg.eval_every:
        results |= {"curve": done.curve, "curve_images": curve_images}
    if novel is not None:  # top1 and zeroshot_top1 are the base classes'
        results |= {"base_classes": len(dataset.classnames), "novel_classes": len(novel.classnames),
                    "zeroshot_novel_top1": zeroshot_novel, "novel_top1": novel_top1,
                    "zeroshot_hm": harmonic_mean(zeroshot_top1, zeroshot_novel),
                    "hm": None if top1 is None else harmonic_mean(top1, novel_top1)}
    write_json_atomic(run_dir / "results.json", results, indent=2)  # atomic, strict JSON
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in finite(results).items() if k != "config"})
        wandb_run.finish()
    return results
