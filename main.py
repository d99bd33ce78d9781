"""Entry point: `python main.py dataset=dtd shots=4 seed=1 method=so paths.data_root=$DATA`.

Composes configs/config.yaml (the datasets' configs come from datasets/catalog.py), checks it, says what
it will build, seeds everything from `seed`, builds dataset, model and method, and runs one trial
(trial.run) while holding the run folder's lock. A trial whose results.json came from the same config
is skipped and its result printed (force=true re-runs it), so re-running a sweep completes only what
is missing; one from another config is an error naming the keys that differ, and that trial's files
stay as they were. Mistakes in the config, the data or the weights print one message
(HYDRA_FULL_ERROR=1 shows the traceback); the checks that need no torch run before it is imported,
those that need no model or data before the model and data are built, and a config whose run folder
would be invalid (shots=0, name=../..) creates none.
"""
import json
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
from so.clip.config import ConfigError, check_run, check_run_folder, choice, register_resolvers
from so.clip.runs import check_finished
from so.files import RunLock, remove_stale_temporaries, write_atomic

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
USER_ERRORS = (ValueError, OSError)  # what a wrong key, data folder or weights file raises
SANDBOX_RECIPE = ROOT / "configs" / "pretrain_sandbox.yaml"
register_configs()
register_resolvers()


def one_line(error):
    """An error's own message; for one a DataLoader worker raised, the original's, not the traceback
    torch wraps around it."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


@contextmanager
def reported(cleanup=None):
    """A user error: logged (console, and main.log once the run folder is the trial's) as one line and
    exit 1; with HYDRA_FULL_ERROR=1, or in a multirun (Hydra runs the other trials, then reports it),
    raised on. `cleanup()` runs first (the folders Hydra made for a run that has none)."""
    try:
        yield
    except USER_ERRORS as e:
        if cleanup:
            cleanup()
        log.error("%s  (HYDRA_FULL_ERROR=1 shows the traceback)", one_line(e))
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)


def task_config(cfg):
    """The trial's config (no hydra key) resolved to a plain dict; name is a string even when given
    as a number (name=nan, name=2024)."""
    config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    return config | {"name": str(config["name"])}


def checked_config(config, run_dir):
    """The checks that need nothing but the config (and what it names on disk)."""
    from datasets import templates
    from datasets.base import SAMPLERS
    from so.clip.head_kinds import KIND_KEYS, PROMPT_LEARNERS

    refuse_added_keys()
    check_run(config)
    templates.check(config["dataset"]["templates"])
    choice("fewshot_sampler", config["fewshot_sampler"], SAMPLERS)
    if config["dataset"].get("test_only") and not config["eval_only"] and config["method"]["kind"] != "zeroshot":
        raise ValueError(f"dataset={config['dataset']['name']} has no training split: evaluate a saved ImageNet run "
                         "on it with eval_only=true trained_from=<that run's folder> (README, Domain generalization).")
    method = config["method"]
    if method["kind"] in KIND_KEYS and config["eval_only"]:
        raise ValueError(f"method={method['name']} with eval_only=true: a head on image features is evaluated in "
                         "the trial that trains it (its cache and classifier are built from the training classes).")
    if method["kind"] in KIND_KEYS and config["base_to_novel"] and method["kind"] not in PROMPT_LEARNERS:
        raise ValueError(f"method={method['name']} with base_to_novel=true: it learns one vector per training class "
                         "and cannot score the novel classes; the prompt learners can (coop, cocoop, kgcoop).")
    if config["eval_only"]:
        trained = Path(config["trained_from"] or run_dir).expanduser() / "trained.pt"
        if not trained.is_file():
            raise FileNotFoundError(f"eval_only=true: {trained} does not exist; train the trial with save=true "
                                    "first, or set trained_from=<a run folder that holds trained.pt>.")
    folder = config["dataset"].get("loader") == "folder"  # dataset.root is your images' folder
    if config["dataset"]["root"] is None:
        raise ValueError("dataset.root is not set: pass dataset.root=/path/to/your/images (DATASETS.md#your-own-data)."
                         if folder else "paths.data_root is not set: pass paths.data_root=/path/to/data or set DATA "
                         "(DATASETS.md#layout).")
    root = Path(config["dataset"]["root"]).expanduser()
    if not config["dataset"]["generated"] and not root.is_dir():
        raise FileNotFoundError(f"dataset.root={root}: not a folder (DATASETS.md#your-own-data)" if folder else
                                f"data root {root} does not exist or is not a folder; set paths.data_root "
                                "to the folder that holds the dataset folders (DATASETS.md#layout)")


def task_overrides():
    """The command line's overrides of this run, parsed by Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))


def refuse_added_keys():
    """+key=value adds a key no code reads (and it would enter the trial's identity): refused. Adding a
    config group (+experiment=demo) is fine."""
    groups = HydraConfig.get().runtime.choices
    for override in task_overrides():
        if (override.is_add() or override.is_force_add()) and override.key_or_group not in groups:
            raise ConfigError(f"{override.input_line}: adds the key {override.key_or_group!r}, which nothing reads; "
                              "set a key that exists without '+' (python main.py dataset=<name> --cfg job lists them).")


def per_dataset_settings(cfg):
    """The method's per-dataset settings (method.per_dataset: its authors' for some datasets) written
    into `cfg`, but the keys given on the command line; returns what was written."""
    if not cfg.method.get("per_dataset"):
        return {}
    from so.clip.head_kinds import apply_per_dataset

    return apply_per_dataset(cfg, {o.key_or_group for o in task_overrides()})


def check_parts(config):
    """The checks that need torch but no model or data: the method, the optimizer, their pairing,
    precision, compile, the logger."""
    from so.clip.methods import check_method
    from so.clip.optimizers import check_optimizer, reads_in_backward
    from so.clip.runtime import COMPILE_MODES, check_precision
    from so.clip.tracking import resolve_mode

    check_method(config["method"], config["optimizer"])
    check_optimizer(config["optimizer"])
    check_precision(config["precision"], reads_in_backward(config["optimizer"]))
    choice("compile", config["compile"], COMPILE_MODES)
    resolve_mode(config["logger"]["mode"])


def describe(config, run_dir):
    """One line: what this trial builds and where it writes."""
    method, optimizer, model = config["method"], config["optimizer"], config["model"]
    trains = {"weights": "CLIP's weight matrices", "lora": "LoRA adapters", "relora": "ReLoRA adapters",
              "zeroshot": "nothing", "coop": "a prompt context", "cocoop": "a prompt context and its meta-net",
              "clip_adapter": "an adapter on image features", "tip_adapter": "a cache model of image features",
              "taskres": "a residual on the text classifier", "linear_probe": "a linear probe on image features",
              }.get(method["kind"], method["kind"])
    if method["kind"] == "tip_adapter" and not method["fine_tune"]:
        trains = "nothing: a cache model of image features"
    steps = f", stepped by optimizer={optimizer['name']}" if optimizer["kind"] != "none" else ""
    weights = model["pretrained"] or "random weights"
    return (f"{config['dataset']['name']} {config['shots']}-shot seed {config['seed']}: method={method['name']} "
            f"({trains}{steps}), model {model['name']} ({weights}), protocol "
            f"{HydraConfig.get().runtime.choices.get('protocol')} -> {run_dir}")


def result_line(results, path):
    """What a finished trial prints on stdout."""
    head = f"{results['dataset']} {results['shots']}-shot seed {results['seed']} {results['method']}:"
    if results["status"] == "diverged":
        return f"{head} DIVERGED at iteration {results['diverged_at']} -> {path}"
    novel = (f" (base), novel {results['zeroshot_novel_top1']:.2f} -> {results['novel_top1']:.2f}, "
             f"HM {results['zeroshot_hm']:.2f} -> {results['hm']:.2f}") if "hm" in results else ""
    return (f"{head} zero-shot top-1 {results['zeroshot_top1']:.2f}, final top-1 {results['top1']:.2f}{novel} "
            f"({results['iterations']} iterations) -> {path}")


class LogFile:
    """The job log's file handlers (main.log), held off the root logger until the run folder is this
    trial's: a run refused before it starts, or skipped, writes nothing into a folder."""

    def __init__(self):
        root = logging.getLogger()
        self.handlers = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        for handler in self.handlers:
            root.removeHandler(handler)

    def attach(self):
        for handler in self.handlers:
            logging.getLogger().addHandler(handler)
        self.handlers = []


def remove_empty_folders(folder, out_root):
    """The empty folders from `folder` up to, not including, out_root: what Hydra made for a run that
    was refused."""
    folder, out_root = Path(folder).absolute(), Path(out_root).expanduser().absolute()
    while folder != out_root and out_root in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def write_hydra_files(cfg, run_dir):
    """.hydra/config.yaml and overrides.yaml, as Hydra writes them, once the trial is accepted."""
    hydra_dir = Path(run_dir) / ".hydra"
    write_atomic(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    write_atomic(hydra_dir / "overrides.yaml",
                 OmegaConf.to_yaml(OmegaConf.create(list(HydraConfig.get().overrides.task))).encode())


class OutputFolderCheck(Callback):
    """Names an output folder that cannot be written, or that the config would put outside
    paths.out_root, before Hydra creates it."""

    def on_run_start(self, config, **kwargs):
        run_dir = Path(config.hydra.run.dir)
        _check_writable(run_dir)
        try:
            check_run_folder(task_config(config), run_dir)
        except ConfigError as e:
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(1)

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
    log_file = LogFile()
    with open_dict(cfg):
        cfg.name = str(cfg.name)  # name=nan or name=2024 arrive as numbers
        with reported():
            authors = per_dataset_settings(cfg)
    config = task_config(cfg)
    with reported(cleanup=lambda: remove_empty_folders(run_dir, config["paths"]["out_root"])):
        check_run_folder(config, run_dir)
    finished = (run_dir / "results.json").is_file()
    if not finished:
        log_file.attach()
    with reported():
        checked_config(config, run_dir)
        log.info("%s", describe(config, run_dir))
        if authors:
            log.info("method=%s on %s, as its authors ran it: %s", config["method"]["name"], config["dataset"]["name"],
                     ", ".join(f"{k}={v}" for k, v in authors.items()))
    lock = RunLock(run_dir)
    with lock as held:
        if not held:
            log.warning("Skipping %s: another process is running this trial (%s); run again when "
                        "it has finished.", run_dir, lock.holder())
            return
        with reported():
            if finished and not cfg.force and check_finished(run_dir, config):  # before torch: a re-run
                log.info("Skipping %s: results.json exists, from this config (force=true re-runs it).", run_dir)
                print(result_line(json.loads((run_dir / "results.json").read_text()), run_dir / "results.json"),
                      "(already run)")  # of a finished sweep skips each trial in a second
                return
            log_file.attach()
            check_parts(config)
            for stale in remove_stale_temporaries(run_dir):
                log.info("Removed %s, left by a write that was killed.", stale.name)
            write_hydra_files(cfg, run_dir)
            parts = build(cfg)
            import trial

            results = trial.run(cfg, parts, run_dir)
    print(result_line(results, run_dir / "results.json"))


def build(cfg):
    """Seed everything, then the trial's parts (trial.Parts). torch and the rest are imported here,
    after the checks."""
    from datasets import build_dataset
    from datasets.classes import base_and_novel
    from so.clip.head_kinds import KIND_KEYS
    from features import head_task
    from so.clip.methods import build_method
    from so.clip.model import build_clip, state_digest
    from so.clip.runtime import resolve_device, resolve_precision, seed_everything, set_tf32
    from trial import Parts

    seed_everything(cfg.seed)
    set_tf32(cfg.tf32)
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)
    config = OmegaConf.to_container(cfg, resolve=True)
    options = {k: v for k, v in config["dataset"].items()
               if k not in ("name", "loader", "root", "templates", "generated", "test_only")}
    dataset = build_dataset(config["dataset"].get("loader", cfg.dataset.name), cfg.dataset.root, cfg.shots, cfg.seed,
                            Path(cfg.paths.cache_dir).expanduser(), templates=cfg.dataset.templates,
                            sampler=cfg.fewshot_sampler, **options)
    dataset, novel = base_and_novel(dataset) if cfg.base_to_novel else (dataset, None)
    if cfg.model.pretrain_if_missing:  # model=tiny_pretrained: the sandbox model, built once
        build_if_missing(cfg.model.pretrained, cfg.model.name)
    model, eval_transform, tokenizer = build_clip(cfg.model.name, cfg.model.pretrained, device=device,
                                                  allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    weights = state_digest(model)  # before the method adds or changes anything: zero-shot's cache key
    task = (head_task(config, model, dataset, tokenizer, eval_transform, device, weights)
            if config["method"]["kind"] in KIND_KEYS else None)  # a head trains on cached image features
    method = build_method(config["method"], config["optimizer"], model, seed=cfg.seed, task=task)
    return Parts(model, eval_transform, tokenizer, dataset, method, device, weights, novel)


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
