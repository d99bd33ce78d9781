"""The checks of a trial's config that need nothing but the config: standard library only, so that
main.py reports a mistake before torch, open_clip or peft is imported.

Every check raises ConfigError with one message in one style: `key=value: expected ...`, the key as
written on the command line.
"""
import math
import os


class ConfigError(ValueError):
    """A config key holds a value that cannot work; the message names the key."""


def expect(ok, key, value, expected):
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}.")


def integer(key, value, low, allow_none=False):
    expect((value is None and allow_none) or (type(value) is int and value >= low), key, value,
           f"an integer >= {low}{', or null' if allow_none else ''}")


def number(key, value, low, high=None, note=""):
    """A real number (not a bool) >= low, or in [low, high]."""
    expect(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
           and (high is None or value <= high), key, value,
           f"a number {f'>= {low}' if high is None else f'in [{low}, {high}]'}{note}")


def choice(key, value, choices):
    expect(value in choices and type(value) is type(choices[0]), key, value,
           f"one of {', '.join(map(str, choices))}")


def method_label(name, default_optimizer, optimizer):
    """What results.json, the output tree and W&B call a method: its name, or <name>+<optimizer>
    when the optimizer is not the one its preset names."""
    return name if optimizer == default_optimizer else f"{name}+{optimizer}"


def register_resolvers():
    """The config's own interpolations (configs/config.yaml: method.label); idempotent."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("with_optimizer"):
        OmegaConf.register_new_resolver("with_optimizer", method_label)


def check_run(config):
    """The run-level keys of a resolved config (a plain dict) but those check_run_folder checks."""
    for key, low in (("max_iters", 1), ("batch_size", 1), ("eval_batch_size", 1),
                     ("num_workers", 0), ("eval_every", 0), ("eval_subset", 0)):
        integer(key, config[key], low)
    integer("iters_per_shot", config["iters_per_shot"], 1, allow_none=True)
    stop = config["stop_loss"]
    expect(stop is None or (isinstance(stop, (int, float)) and not isinstance(stop, bool) and math.isfinite(stop)
                            and stop >= 0), "stop_loss", stop, "a number >= 0, or null for no early stop")
    for key in ("tf32", "crop_from_original", "base_to_novel", "cache_test_split"):
        choice(key, config[key], (True, False))


def check_run_folder(config, run_dir):
    """The keys that name the run folder (<out_root>/<name>/<dataset>/<method>/<shots>shot/seed<seed>):
    every one names folders under paths.out_root (name may hold several, as ablations/so), none
    climbs out of it or is absolute, and shots and seed are what the trial will accept."""
    integer("shots", config["shots"], 1)
    seed = config["seed"]
    expect(type(seed) is int and 0 <= seed < 2**32, "seed", seed, "an integer in [0, 2**32)")  # numpy's range
    folders = (("name", config["name"], True), ("dataset.name", config["dataset"]["name"], False),
               ("method.name", config["method"]["name"], False), ("optimizer.name", config["optimizer"]["name"], False))
    for key, value, nested in folders:
        parts = str(value).split("/")
        expect(value not in (None, "") and not str(value).startswith("/") and (nested or len(parts) == 1)
               and not {"", ".", ".."} & set(parts), key, value,
               f"{'folder names' if nested else 'a folder name'} under paths.out_root (no '..', '.', empty or absolute "
               "part)")
    out_root = os.path.normpath(os.path.abspath(os.path.expanduser(str(config["paths"]["out_root"]))))
    folder = os.path.normpath(os.path.abspath(str(run_dir)))
    expect(folder.startswith(out_root + os.sep), "paths.out_root", config["paths"]["out_root"],
           f"the folder that holds the run folder {folder}")
