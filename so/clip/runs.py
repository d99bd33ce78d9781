"""A trial's identity: the keys of its resolved config that decide its result.

`check_finished(run_dir, config)` is true when run_dir/results.json came from a config with the same
identity, and raises TrialMismatch, listing the keys that differ, when it came from another one. A
results.json written before `method=` and `optimizer=` were two groups (its method held the optimizer's
arguments) is read in today's layout first (`current_layout`), so finished sweeps stay finished.
Standard library only.
"""
import copy
import json
from pathlib import Path

# Keys of the resolved config that do not change a trial's result: where things are, how fast it
# runs, what else is written, and how it is logged. Every other key is the trial's identity.
RUN_ONLY = {"force", "logger", "paths", "device", "num_workers", "eval_batch_size", "save", "cache_test_split",
            "count_updates", "eval_only", "compile", "grad_checkpointing", "dataset.root",
            "optimizer.sparse_backward"}  # the same updates to float rounding, as compile
MATRICES = ("in_proj", "out_proj", "c_fc", "c_proj")  # configs/method/so.yaml's default: all four
# The optimizer each method of the earlier layout stepped with, by its kind there.
EARLIER_OPTIMIZERS = {"adam": "adam", "galore": "galore", "lora": "adamw", "relora": "adamw", "zeroshot": "none"}
RELORA_KEYS = ("reset_every", "restart_warmup", "prune_ratio", "prune_together")


class TrialMismatch(ValueError):
    """A run folder holds the results of another config."""


def flatten(config, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def current_layout(config):
    """A resolved config in today's layout: one of the earlier layout (the method's optimizer
    arguments under method.optimizer) is rewritten as the same trial's config would read now;
    others are returned as they are."""
    method = config.get("method")
    if "optimizer" in config or not isinstance(method, dict) or not isinstance(method.get("optimizer", {}), dict):
        return config
    config, method = copy.deepcopy(config), copy.deepcopy(method)
    arguments, kind, name = method.pop("optimizer", {}), method["kind"], method["name"]
    optimizer_name = name if kind == "so" else EARLIER_OPTIMIZERS[kind]
    optimizer = {"name": optimizer_name, "kind": "so" if kind == "so" else optimizer_name}
    if kind == "so":
        optimizer["step_in_backward"] = method.pop("step_in_backward")
    if kind == "relora":
        method |= {k: arguments.pop(k) for k in RELORA_KEYS}
    if kind in ("so", "adam", "galore"):
        method |= {"kind": "weights", "matrices": list(MATRICES)}
    config["method"] = {**method, "default_optimizer": optimizer_name, "label": name}
    config["optimizer"] = optimizer | arguments
    return config


def identity(config):
    """The keys of a resolved config (a plain dict) that decide the trial's result. A folder dataset's
    root is its content (a benchmark's root is only where it lies): it is kept."""
    folder = isinstance(config.get("dataset"), dict) and config["dataset"].get("loader") == "folder"
    return {k: v for k, v in flatten(current_layout(config)).items()
            if (folder and k == "dataset.root") or not any(k == r or k.startswith(f"{r}.") for r in RUN_ONLY)}


def check_finished(run_dir, config):
    """True when run_dir/results.json exists and came from a config with this identity; raises
    TrialMismatch, listing the keys that differ, when it came from another one."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return False
    try:
        was = identity(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TrialMismatch(f"{path} is not a results.json of main.py ({e}); move it away, or "
                            "pass force=true to run the trial again") from None
    now = identity(config)
    differ = sorted(k for k in was.keys() | now.keys() if was.get(k, "<absent>") != now.get(k, "<absent>"))
    if differ:
        shown = "; ".join(f"{k}: {was.get(k, '<absent>')!r} there, {now.get(k, '<absent>')!r} now"
                          for k in differ[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise TrialMismatch(f"{path} holds the result of another config: {shown}{more}. Give this "
                            "run another name=..., or pass force=true to replace that result")
    return True
