"""One trial: zero-shot evaluation, training (train.py), final evaluation; results.json and W&B.

`run(cfg, parts, run_dir)` takes the composed config and the parts main.py built (`Parts`), and writes
run_dir/results.json: the trial's key, status (finished or diverged), zero-shot and final top-1,
iterations, train seconds, trainable parameters, peak GPU memory and the resolved config. With
base_to_novel, training and `top1` are on the base classes, and the novel classes are evaluated too.
"""
import json
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
from datasets.classes import harmonic_mean
from datasets.pipeline import test_loader
from datasets.test_cache import TestImages
from datasets.test_cache import key as test_key
from so.clip.methods import Method, load_trained, save_trained
from so.clip.runtime import autocast, resolve_precision
from so.clip.step import Prompts
from so.clip.tracking import start_run
from so.clip.updates import UpdateCounts
from so.files import content_key, finite, write_json_atomic

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
    weights_digest: str      # so.clip.model.state_digest of the model before the method changed it
    novel: object = None     # base_to_novel: the novel classes (dataset then holds the base ones)


@torch.no_grad()
def evaluate(model, prompts, loader, precision, device, desc, head=None):
    """Top-1 accuracy in percent over `loader`: CLIP's zero-shot classifier of `prompts` on the model's
    image features, or a head's (so.clip.heads) over the classes of `prompts`."""
    model.eval()
    with autocast(precision, device):
        if head is None:
            text = prompts.embeddings(model)
            score = lambda image: F.normalize(image, dim=-1) @ text.T  # noqa: E731
        else:
            score = head.scorer(model, prompts)
        correct = total = 0
        for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):  # no bar when not a TTY
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            correct += score(model.encode_image(images)).argmax(dim=-1).eq(labels).sum()
            total += labels.numel()
    return 100.0 * float(correct) / max(total, 1)


def eval_subset(records, size, seed):
    """The indices of `size` of the test records, drawn with random.Random(seed), in split order; all
    of them when size is 0 or not smaller than the split."""
    if not size or size >= len(records):
        return list(range(len(records)))
    return sorted(random.Random(seed).sample(range(len(records)), size))


def test_set(name, records, parts, cfg):
    """Batches of the test records: from the split decoded once (datasets.test_cache) unless
    cache_test_split=false or the transform is not open_clip's shape; else streamed and decoded."""
    cached = cfg.cache_test_split and TestImages.of(name, records, parts.eval_transform, cfg.eval_batch_size,
                                                    parts.device, cfg.paths.cache_dir)
    return cached or test_loader(records, parts.eval_transform, cfg.eval_batch_size, cfg.num_workers)


def zeroshot_eval(parts, prompts, records, loader, cfg, desc):
    """Zero-shot top-1, computed once per content: the model's weights before the method changed them,
    the test records (and their files' size and time), the prompts, the transform, the precision and
    the device type key a result under <cache_dir>/zeroshot/, which every later trial reuses."""
    precision = resolve_precision(cfg.precision, parts.device)
    key = content_key(parts.weights_digest, test_key(records, parts.eval_transform, ""), precision, parts.device.type,
                      prompts.tokens.cpu().numpy().tobytes())
    path = Path(cfg.paths.cache_dir).expanduser() / "zeroshot" / f"{key}.json"
    if path.is_file():
        top1 = json.loads(path.read_text())["top1"]
        log.info("%s: top-1 %.2f reused from %s (the same weights, images, prompts and precision).", desc, top1, path)
        return top1
    top1 = evaluate(parts.model, prompts, loader, cfg.precision, parts.device, desc)
    try:
        write_json_atomic(path, {"top1": top1, "images": len(records), "model": cfg.model.name})
    except OSError as e:  # a cache: the trial goes on without it
        log.warning("%s: the result is not cached (%s).", desc, e)
    return top1


def run(cfg, parts, run_dir):
    """One trial; writes run_dir/results.json and returns it."""
    model, method, device = parts.model, parts.method, parts.device
    config = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset, novel, head = parts.dataset, parts.novel, method.head
    wandb_run = start_run(cfg.logger, config, run_dir, f"{dataset.name}-{method.name}-{cfg.shots}shot-seed{cfg.seed}")
    prompts = Prompts(dataset, parts.tokenizer, device)
    loader = test_set(dataset.name, dataset.test, parts, cfg)
    on_novel = None
    if novel is not None:
        novel_prompts = Prompts(novel, parts.tokenizer, device)
        novel_loader = test_set(dataset.name, novel.test, parts, cfg)
        on_novel = lambda desc: evaluate(model, novel_prompts, novel_loader, cfg.precision, device, desc, head)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    zeroshot_top1 = zeroshot_eval(parts, prompts, dataset.test, loader, cfg, "zero-shot eval")
    zeroshot_novel = zeroshot_eval(parts, novel_prompts, novel.test, novel_loader, cfg,
                                   "zero-shot eval, novel classes") if on_novel else None
    log.info("zero-shot top-1: %.2f", zeroshot_top1)
    done, seconds, probe, curve_images, counts = train.Outcome(), 0.0, None, None, None
    if cfg.eval_every:  # the curve's top-1, on the whole test split or a seeded subset of it
        subset = eval_subset(dataset.test, cfg.eval_subset, cfg.seed)
        curve_images = len(subset)
        probe_loader = loader if len(subset) == len(dataset.test) else (
            loader.subset(subset) if isinstance(loader, TestImages) else
            test_loader([dataset.test[i] for i in subset], parts.eval_transform, cfg.eval_batch_size, cfg.num_workers))
        probe = lambda: evaluate(model, prompts, probe_loader, cfg.precision, device, "curve eval", head)  # noqa: E731
    if cfg.eval_only:
        load_trained(method, model, Path(cfg.trained_from or run_dir) / "trained.pt")
    elif method.optimizer is not None:
        if cfg.count_updates and method.counts_updates:
            counts = UpdateCounts(method.optimizer, {p: n for n, p in method.trainable.items()})
        elif cfg.count_updates:
            log.warning("count_updates=true ignored: optimizer=%s keeps no per-entry state to count (only SO does).",
                        cfg.optimizer.name)
        if cfg.compile != "none" and cfg.optimizer.get("sparse_backward"):
            log.info("compile=%s: the layers SO steps with sparse_backward run eagerly (a graph break each): "
                     "their backward calls the optimizer.", cfg.compile)
        start = time.perf_counter()
        done = train.train(cfg, model, prompts, method, dataset.train_x, device, wandb_run, counts, probe)
        seconds = time.perf_counter() - start
    top1 = novel_top1 = None
    if not done.diverged_at:
        if head is not None:
            head.after_training(model)  # Tip-Adapter's alpha/beta search on the val split
            if head.fitted():
                log.info("fitted on the val split: %s", ", ".join(f"{k}={v:.4g}" for k, v in head.fitted().items()))
        top1 = evaluate(model, prompts, loader, cfg.precision, device, "final eval", head)
        novel_top1 = on_novel("final eval, novel classes") if on_novel else None
        log.info("final top-1: %.2f (%d iterations%s)", top1, done.iterations,
                 ", stopped early" if done.stopped_early else "")
        if cfg.save and method.optimizer is not None and not cfg.eval_only:  # after the result is logged,
            save_trained(method, model, run_dir / "trained.pt")  # so that a full disk loses no top-1
        elif cfg.save and method.optimizer is None:
            log.warning("save=true: method=%s trains nothing, so there is no trained.pt to write.", method.name)
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
        "classnames": dataset.classnames,  # what the trained model tells apart, and how it is prompted:
        "templates": dataset.templates,    # scripts/predict.py and export.py need no data
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "device": str(device),
        "config": config,
    }
    if cfg.eval_every:
        results |= {"curve": done.curve, "curve_images": curve_images}
    if head is not None and head.fitted():
        results["fitted"] = head.fitted()  # Tip-Adapter's alpha and beta
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
