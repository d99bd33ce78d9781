"""The head kinds' config keys and their checks (so/clip/heads.py builds the heads): standard library
only, so that main.py reports a mistake before torch is imported."""
from so.clip.config import ConfigError, choice, expect, integer, number

# Keys of every head kind's config: the authors' schedule and the cached views of the train images.
SCHEDULE_KEYS = ("epochs", "batch_size", "drop_last", "views", "mix_views", "crop_scale", "warmup_epochs", "warmup_lr",
                 "per_dataset")
KIND_KEYS = {"coop": ("n_ctx", "ctx_init", "kg_weight"), "cocoop": ("n_ctx", "ctx_init"),
             "clip_adapter": ("ratio", "reduction"),
             "tip_adapter": ("fine_tune", "search", "alpha", "beta", "search_scale", "search_steps"),
             "taskres": ("alpha",), "linear_probe": ("constraint",)}
PROMPT_LEARNERS = ("coop", "cocoop")  # they score any class set: base-to-novel works


def check_head(cfg):
    """The values of a head kind's keys (their presence is methods.check_method's)."""
    epochs = cfg["epochs"]
    ok = epochs is None or (type(epochs) is int and epochs >= 0) or (
        isinstance(epochs, dict) and epochs and all(type(k) is int and k >= 1 and type(v) is int and v >= 0
                                                    for k, v in epochs.items()))
    expect(ok, "method.epochs", epochs, "an integer >= 0, a map {from this many shots: epochs} (e.g. {1: 50, 2: 100, "
           "8: 200}), or null for the protocol's iteration budget")
    integer("method.batch_size", cfg["batch_size"], 1, allow_none=True)
    for key in ("drop_last", "mix_views"):
        choice(f"method.{key}", cfg[key], (True, False))
    integer("method.views", cfg["views"], 1)
    integer("method.warmup_epochs", cfg["warmup_epochs"], 0)
    scale = cfg["crop_scale"]
    expect(isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
           and 0 < scale[0] <= scale[1] <= 1, "method.crop_scale", scale, "[low, high] with 0 < low <= high <= 1")
    expect(isinstance(cfg["warmup_lr"], (int, float)) and not isinstance(cfg["warmup_lr"], bool)
           and cfg["warmup_lr"] > 0, "method.warmup_lr", cfg["warmup_lr"], "a number > 0")
    per_dataset = cfg["per_dataset"]
    expect(per_dataset is None or (isinstance(per_dataset, dict) and all(isinstance(v, dict) for v in per_dataset.values())),
           "method.per_dataset", per_dataset, "{dataset name: {key: value}}, or null")
    kind = cfg["kind"]
    if kind in PROMPT_LEARNERS:
        integer("method.n_ctx", cfg["n_ctx"], 1)
        expect(cfg["ctx_init"] is None or (isinstance(cfg["ctx_init"], str) and cfg["ctx_init"].strip()),
               "method.ctx_init", cfg["ctx_init"], "words that start every prompt, or null for random context")
    if kind == "coop":
        number("method.kg_weight", cfg["kg_weight"], 0, note=" (0: CoOp; KgCoOp's is 8)")
    if kind == "clip_adapter":
        number("method.ratio", cfg["ratio"], 0, 1)
        integer("method.reduction", cfg["reduction"], 1)
    if kind == "tip_adapter":
        choice("method.fine_tune", cfg["fine_tune"], (True, False))
        choice("method.search", cfg["search"], ("val", "fixed"))
        for key in ("alpha", "beta"):
            number(f"method.{key}", cfg[key], 0)
        for key, kind_of in (("search_scale", (int, float)), ("search_steps", int)):
            value = cfg[key]
            expect(isinstance(value, list) and len(value) == 2 and all(isinstance(v, kind_of) and v > 0 for v in value),
                   f"method.{key}", value, "[for beta, for alpha], two positive numbers")
    if kind == "taskres":
        number("method.alpha", cfg["alpha"], 0)
    if kind == "linear_probe":
        choice("method.constraint", cfg["constraint"], ("none", "class_adaptive"))


def trains(cfg):
    """Whether a head kind's config has anything to step."""
    return not (cfg["kind"] == "tip_adapter" and not cfg["fine_tune"])


def epochs_for(epochs, shots):
    """The epochs of method.epochs at `shots`: an int, or the entry of the largest key <= shots."""
    if not isinstance(epochs, dict):
        return epochs
    keys = [k for k in epochs if k <= shots]
    if not keys:
        raise ConfigError(f"method.epochs={epochs}: no entry for {shots} shots (its smallest key is {min(epochs)}).")
    return epochs[max(keys)]


def apply_per_dataset(cfg, given=()):
    """Write the authors' settings for cfg's dataset (method.per_dataset[<dataset.name>]: method keys,
    or optimizer.<key> when the optimizer is the method's own) into `cfg` (a config or a dict), but
    the keys `given` on the command line. Returns {key: value} of what it wrote."""
    method = cfg["method"]
    entry = (method.get("per_dataset") or {}).get(cfg["dataset"]["name"]) or {}
    written = {}
    for key, value in entry.items():
        section, _, name = key.rpartition(".")
        section = section or "method"
        if section not in ("method", "optimizer") or name not in cfg[section]:
            raise ConfigError(f"method.per_dataset.{cfg['dataset']['name']}.{key}: expected a key of the method "
                              "config, or optimizer.<key> of the optimizer's.")
        if f"{section}.{name}" in given or (section == "optimizer" and
                                             cfg["optimizer"]["name"] != method["default_optimizer"]):
            continue
        cfg[section][name] = value
        written[f"{section}.{name}"] = value
    return written
