"""Contrastive pretraining of the tiny CLIP on the synthetic world: `python scripts/pretrain_sandbox.py`.

Every step draws a fresh batch of images and captions from the pretraining distribution
(datasets.synthetic.PRETRAIN: some colour-shape pairs and backgrounds are never shown); the loop is
so.clip.pretrain's. Settings: configs/pretrain_sandbox.yaml (`key=value` to change one). main.py runs
the same recipe when model=tiny_pretrained's checkpoint is missing.
"""
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: datasets/ and so/ beside scripts/
from datasets.synthetic import pretraining_batch  # noqa: E402
from so.clip.pretrain import RECIPE, pretrain  # noqa: E402

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_sandbox")
def main(cfg: DictConfig):
    out = Path(cfg.out).expanduser()
    if out.is_file() and not cfg.force:
        log.info("%s exists; force=true pretrains it again.", out)
        return
    recipe = OmegaConf.to_container(cfg, resolve=True)
    pretrain(**{k: recipe[k] for k in RECIPE}, batches=pretraining_batch)


if __name__ == "__main__":
    main()
