"""Entry point: `python main.py dataset=dtd shots=4 seed=1 method=so paths.data_root=$DATA`.

Composes configs/config.yaml (the datasets' configs come from datasets/catalog.py), checks it, says what
it will build, seeds everything from `seed`, builds dataset, model and method, and runs one trial
(trial.run) while holding the run folder's lock. A trial whose results.json came from the same config
is skipped (force=true re-runs it), so re-running a sweep completes only what is missing; one from
another config is an error naming the keys that differ. Mistakes in the config, the data or the
weights print one message (HYDRA_FULL_ERROR=1 shows the traceback); the checks that need no torch run
before it is imported, those that need no model or data before the model and data are built.
"""
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from datasets.catalog import register_configs
from so.clip.config import check_run, choice, register_resolvers
from so.clip.runs import check_finished
from so.files import RunLock

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
USER_ERRORS = (ValueError, OSError)  # what a wrong key, data folder or weights file raises
SANDBOX_RECIPE = ROOT / "configs" / "pretrain_sandbox.yaml"
register_configs()
register_resolvers()


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
    """The resolved config as a plain dict, after the checks that need nothing but the config."""
    from datasets.base import SAMPLERS, TEMPLATES

    with open_dict(cfg):
        cfg.name = str(cfg.name)  # name=nan or name=2024 arrive as numbers
    config = OmegaConf.to_container(cfg, resolve=True)
    check_run(config)
    choice("dataset.templates", config["dataset"]["templates"], TEMPLATES)
    choice("fewshot_sampler", config["fewshot_sampler"], SAMPLERS)
    if config["dataset"].get("test_only") and not config["eval_only"] and config["method"]["kind"] != "zeroshot":
        raise ValueError(f"dataset={config['dataset']['name']} has no training split: evaluate a saved ImageNet run "
                         "on it with eval_only=true trained_from=<that run's folder> (README, Domain generalization).")
    if config["dataset"]["root"] is None:
        raise ValueError("paths.data_root is not set: pass paths.data_root=/path/to/data or set DATA "
                         "(DATASETS.md#layout).")
    root = Path(config["dataset"]["root"]).expanduser()
    if not config["dataset"]["generated"] and not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a folder; set paths.data_root "
                                "to the folder that holds the dataset folders (DATASETS.md#layout)")
    return config


def check_parts(config):
    """The checks that need torch but no model or data: the method, the optimizer, their pairing,
    precision, compile, the logger."""
    from so.clip.methods import check_method
    from so.clip.optimizers import check_optimizer
    from so.clip.runtime import COMPILE_MODES, check_precision
    from so.clip.tracking import resolve_mode

    check_method(config["method"], config["optimizer"])
    check_optimizer(config["optimizer"])
    check_precision(config["precision"], bool(config["optimizer"].get("step_in_backward")))
    choice("compile", config["compile"], COMPILE_MODES)
    resolve_mode(config["logger"]["mode"])


def describe(config, run_dir):
    """One line: what this trial builds and where it writes."""
    method, optimizer, model = config["method"], config["optimizer"], config["model"]
    trains = {"weights": "CLIP's weight matrices", "lora": "LoRA adapters", "relora": "ReLoRA adapters",
              "zeroshot": "nothing"}.get(method["kind"], method["kind"])
    steps = f", stepped by optimizer={optimizer['name']}" if method["kind"] != "zeroshot" else ""
    weights = model["pretrained"] or "random weights"
    return (f"{config['dataset']['name']} {config['shots']}-shot seed {config['seed']}: method={method['name']} "
            f"({trains}{steps}), model {model['name']} ({weights}), protocol "
            f"{HydraConfig.get().runtime.choices.get('protocol')} -> {run_dir}")


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
        log.info("%s", describe(config, run_dir))
        check_parts(config)
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
            parts = build(cfg)
        import trial

        results = trial.run(cfg, parts, run_dir)
    if results["status"] == "diverged":
        print(f"{results['dataset']} {results['shots']}-shot seed {results['seed']} {results['method']}: "
              f"DIVERGED at iteration {results['diverged_at']} -> {run_dir / 'results.json'}")
        return
    novel = (f" (base), novel {results['zeroshot_novel_top1']:.2f} -> {results['novel_top1']:.2f}, "
             f"HM {results['zeroshot_hm']:.2f} -> {results['hm']:.2f}") if "hm" in results else ""
    print(f"{results['dataset']} {results['shots']}-shot seed {results['seed']} {results['method']}: "
          f"zero-shot top-1 {results['zeroshot_top1']:.2f}, final top-1 {results['top1']:.2f}{novel} "
          f"({results['iterations']} iterations) -> {run_dir / 'results.json'}")


def build(cfg):
    """Seed everything, then the trial's parts (trial.Parts). torch and the rest are imported here,
    after the checks."""
    from datasets import build_dataset
    from so.clip.methods import build_method
    from so.clip.model import build_clip
    from so.clip.runtime import resolve_device, resolve_precision, seed_everything, set_tf32
    from trial import Parts

    seed_everything(cfg.seed)
    set_tf32(cfg.tf32)
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)
    config = OmegaConf.to_container(cfg, resolve=True)
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
    method = build_method(config["method"], config["optimizer"], model, seed=cfg.seed)
    return Parts(model, eval_transform, tokenizer, dataset, method, device)


def recipe(**overrides):
    """The arguments of so.clip.pretrain.pretrain but `batches`: configs/pretrain_sandbox.yaml with
    `overrides`, which must name `out` (the file's own default needs the paths group, which only a
    Hydra run composes)."""
    from so.clip.pretrain import RECIPE

    config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(SANDBOX_RECIPE), overrides), resolve=True)
    return {k: config[k] for k in RECIPE}


def build_if_missing(path, model):
    """Pretrain the sandbox model `model` into `path` on the synthetic world with
    configs/pretrain_sandbox.yaml, unless `path` exists."""
    from datasets.synthetic import pretraining_batch
    from so.clip import pretrain

    path = Path(path).expanduser()
    if path.is_file():
        return
    log.warning("%s is missing: pretraining it now with %s (minutes on a CPU).", path, SANDBOX_RECIPE.name)
    pretrain.pretrain(**recipe(out=str(path), model=model), batches=pretraining_batch)


def compose(*overrides):
    """The trial config of `overrides`, composed as `python main.py` would (for tests and benchmarks)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("config", list(overrides))


if __name__ == "__main__":
    main()
