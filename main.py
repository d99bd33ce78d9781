"""Entry point: `python main.py dataset=dtd shots=4 seed=1 method=so paths.data_root=$DATA`.

Composes configs/config.yaml, checks it, seeds everything from `seed`, builds dataset, model and
method, and runs one trial (train.run) while holding the run folder's lock. A trial whose
results.json came from the same config is skipped (force=true re-runs it), so re-running a sweep
completes only what is missing; one from another config is an error naming the keys that differ.
Mistakes in the config, the data or the weights print one message (HYDRA_FULL_ERROR=1 shows the
traceback); the checks that need no torch run before it is imported.
"""
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from so.runs import RunLock, check_finished

log = logging.getLogger(__name__)
USER_ERRORS = (ValueError, OSError)  # what a wrong key, data folder or weights file raises


@contextmanager
def reported():
    """A user error: logged (console and main.log) as one line and exit 1; with HYDRA_FULL_ERROR=1,
    or in a multirun (Hydra runs the other trials, then reports it), raised on."""
    try:
        yield
    except USER_ERRORS as e:
        log.error("%s  (HYDRA_FULL_ERROR=1 shows the traceback)", e)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)


def checked_config(cfg):
    """The resolved config as a plain dict, after the checks that need no torch."""
    with open_dict(cfg):
        cfg.name = str(cfg.name)  # name=nan or name=2024 arrive as numbers
    for key, low in (("shots", 1), ("max_iters", 1), ("batch_size", 1), ("eval_batch_size", 1),
                     ("num_workers", 0), ("iters_per_shot", 1), ("eval_every", 0), ("eval_subset", 0)):
        value = cfg[key]
        if (type(value) is not int or value < low) and not (key == "iters_per_shot" and value is None):
            raise ValueError(f"{key}={value!r}: expected an integer >= {low}.")
    if type(cfg.seed) is not int:
        raise ValueError(f"seed={cfg.seed!r}: expected an integer.")
    stop = cfg.stop_loss
    if stop is not None and (not isinstance(stop, (int, float)) or isinstance(stop, bool)
                             or not math.isfinite(stop) or stop < 0):
        raise ValueError(f"stop_loss={stop!r}: expected a number >= 0, or null for no early stop.")
    for key, choices in (("tf32", (True, False)), ("crop_from_original", (True, False)),
                         ("base_to_novel", (True, False))):
        if cfg[key] not in choices or type(cfg[key]) is not type(choices[0]):
            raise ValueError(f"{key}={cfg[key]!r}: expected one of {', '.join(map(str, choices))}.")
    if cfg.dataset.get("test_only") and not cfg.eval_only and cfg.method.kind != "zeroshot":
        raise ValueError(f"dataset={cfg.dataset.name} has no training split: evaluate a saved ImageNet run on "
                         f"it with eval_only=true trained_from=<that run's folder> (README, Domain generalization).")
    if cfg.dataset.root is None:
        raise ValueError("paths.data_root is not set: pass paths.data_root=/path/to/data or set DATA "
                         "(DATASETS.md#layout).")
    root = Path(cfg.dataset.root).expanduser()
    if not cfg.dataset.generated and not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a folder; set paths.data_root "
                                "to the folder that holds the dataset folders (DATASETS.md#layout)")
    return OmegaConf.to_container(cfg, resolve=True)


class OutputFolderCheck(Callback):
    """Names an output folder that cannot be written, before Hydra sets up its log file there."""

    def on_run_start(self, config, **kwargs):
        _check_writable(Path(config.hydra.run.dir))

    def on_multirun_start(self, config, **kwargs):
        _check_writable(Path(config.hydra.sweep.dir))


def _check_writable(folder):
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        print(f"Error: cannot write the output folder {folder}: {existing} is not a folder this process "
              "can write to. Set paths.out_root to one.", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported():
        config = checked_config(cfg)
    lock = RunLock(run_dir)
    with lock as held:
        if not held:
            log.warning("Skipping %s: another process is running this trial (%s); run again when "
                        "it has finished.", run_dir, lock.holder())
            return
        with reported():
            if not cfg.force and check_finished(run_dir, config):
                log.info("Skipping %s: results.json exists, from this config (force=true re-runs it).",
                         run_dir)
                return
            parts = build(cfg, config)
        import train

        results = train.run(cfg, config, *parts, run_dir)
    if results["status"] == "diverged":
        print(f"{results['dataset']} {results['shots']}-shot seed {results['seed']} {results['method']}: "
              f"DIVERGED at iteration {results['diverged_at']} -> {run_dir / 'results.json'}")
        return
    novel = (f" (base), novel {results['zeroshot_novel_top1']:.2f} -> {results['novel_top1']:.2f}, "
             f"HM {results['zeroshot_hm']:.2f} -> {results['hm']:.2f}") if "hm" in results else ""
    print(f"{results['dataset']} {results['shots']}-shot seed {results['seed']} {results['method']}: "
          f"zero-shot top-1 {results['zeroshot_top1']:.2f}, final top-1 {results['top1']:.2f}{novel} "
          f"({results['iterations']} iterations) -> {run_dir / 'results.json'}")


def build(cfg, config):
    """Seed everything, then the trial's parts: (model, eval_transform, tokenizer, dataset, method,
    device). torch and the rest are imported here, after the quick checks."""
    import torch

    import train
    from datasets import build_dataset
    from scripts.pretrain_sandbox import build_if_missing
    from so.methods import build_method
    from so.model import build_clip

    train.seed_everything(cfg.seed)
    train.set_tf32(cfg.tf32)
    device = train.resolve_device(cfg.device)
    train.resolve_precision(cfg.precision, device)  # a wrong value fails here, named
    options = {k: v for k, v in config["dataset"].items()
               if k not in ("name", "root", "templates", "generated", "test_only")}
    dataset = build_dataset(cfg.dataset.name, cfg.dataset.root, cfg.shots, cfg.seed,
                            Path(cfg.paths.cache_dir).expanduser(), templates=cfg.dataset.templates,
                            sampler=cfg.fewshot_sampler, **options)
    if cfg.model.pretrain_if_missing:  # model=tiny_pretrained: the sandbox model, built once
        build_if_missing(cfg.model.pretrained, cfg.model.name)
    model, eval_transform, tokenizer = build_clip(cfg.model.name, cfg.model.pretrained, device=device,
                                                  allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    method = build_method(config["method"], model, seed=cfg.seed)
    return model, eval_transform, tokenizer, dataset, method, device


if __name__ == "__main__":
    main()
