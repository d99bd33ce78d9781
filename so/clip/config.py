"""The checks of a trial's config that need nothing but the config: standard library only, so that
main.py reports a mistake before torch, open_clip or peft is imported.

Every check raises ConfigError with one message in one style: `key=value: expected ...`, the key as
written on the command line.
"""
import math


class ConfigError(ValueError):
    """A config key holds a value that cannot work; the message names the key."""


def expect(ok, key, value, expected):
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}.")


def integer(key, value, low, allow_none=False):
    expect((value is None and allow_none) or (type(value) is int and value >= low), key, value,
           f"an integer >= {low}{', or null' if allow_none else ''}")


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
    """The run-level keys of a resolved config (a plain dict)."""
    for key, low in (("shots", 1), ("max_iters", 1), ("batch_size", 1), ("eval_batch_size", 1),
                     ("num_workers", 0), ("eval_every", 0), ("eval_subset", 0)):
        integer(key, config[key], low)
    integer("iters_per_shot", config["iters_per_shot"], 1, allow_none=True)
    seed = config["seed"]
    expect(type(seed) is int and 0 <= seed < 2**32, "seed", seed, "an integer in [0, 2**32)")  # numpy's range
    stop = config["stop_loss"]
    expect(stop is None or (isinstance(stop, (int, float)) and not isinstance(stop, bool) and math.isfinite(stop)
                            and stop >= 0), "stop_loss", stop, "a number >= 0, or null for no early stop")
    for key in ("tf32", "crop_from_original", "base_to_novel"):
        choice(key, config[key], (True, False))
