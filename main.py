"""Entry point: `python main.py dataset=dtd shots=4 seed=1 method=so paths.data_root=$DATA`.

Composes configs/config.yaml, seeds everything from `seed`, builds dataset, model and method, and runs
one trial (train.run). A trial whose results.json exists is skipped unless force=true, so re-running a
sweep completes only what is missing.
"""
import logging
import random
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import train
from datasets import build_dataset
from scripts.pretrain_sandbox import build_if_missing
from so.methods import build_method
from so.model import build_clip

log = logging.getLogger(__name__)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if (run_dir / "results.json").exists() and not cfg.force:
        log.info("Skipping %s: results.json exists (force=true re-runs it).", run_dir)
        return
    if cfg.dataset.root is None:
        raise ValueError("paths.data_root is not set: pass paths.data_root=/path/to/data or set DATA "
                         "(DATASETS.md#layout).")
    seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    device = train.resolve_device(cfg.device)
    dataset = build_dataset(cfg.dataset.name, cfg.dataset.root, cfg.shots, cfg.seed,
                            Path(cfg.paths.cache_dir).expanduser(), templates=cfg.dataset.templates)
    if cfg.model.get("pretrain_if_missing"):  # model=tiny_pretrained: the sandbox model, built once
        build_if_missing(cfg.model.pretrained, cfg.model.name)
    model, eval_transform, tokenizer = build_clip(cfg.model.name, cfg.model.pretrained, device=device)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    config = OmegaConf.to_container(cfg, resolve=True)
    method = build_method(config["method"], model, seed=cfg.seed)
    results = train.run(cfg, config, model, eval_transform, tokenizer, dataset, method, device, run_dir)
    print(f"{results['dataset']} {results['shots']}-shot seed {results['seed']} {results['method']}: "
          f"zero-shot top-1 {results['zeroshot_top1']:.2f}, final top-1 {results['top1']:.2f} "
          f"({results['iterations']} iterations) -> {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
