"""What trains: the `method=` group, one small factory per kind. How it steps is the optimizer
(so/clip/optimizers.py, the `optimizer=` group); any kind works with any optimizer that can step it.

    weights   CLIP's own attention/MLP weight matrices of the chosen blocks (SO's trainable set)
    lora      CLIP-LoRA adapters on q, k, v (and o) of the chosen blocks; `dora: true` for DoRA
    relora    LoRA's adapters, merged and restarted every `reset_every` steps (so/clip/relora.py)
    zeroshot  nothing trains
    coop, cocoop, clip_adapter, tip_adapter, taskres, linear_probe
              a head on frozen image features (so/clip/heads.py): prompt learners, adapters, probes,
              trained with their authors' schedule (method.epochs, batch_size, warm-up) on cached
              features (features.py)

The presets (configs/method/) name both: so, so_reference_cli, adam and galore train `weights` with
their optimizer; lora and dora train adapters with AdamW; relora restarts them. The harness asks the
Method for what its loop needs: the optimizer, its learning-rate schedule, whether gradients are read
inside backward, whether SO's update counts can be read.
"""
import pickle
from dataclasses import dataclass

import torch

from so.clip import head_kinds as heads
from so.clip.config import ConfigError, choice, expect, method_label
from so.clip.lora import TARGETS, add_adapters
from so.clip.optimizers import build_optimizer, kind_of, reads_in_backward
from so.clip.relora import Restarts, check_restarts
from so.files import save_atomic

TOWERS = {"text": ["transformer"], "vision": ["visual.transformer"],
          "both": ["visual.transformer", "transformer"]}
POSITIONS = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top3")
MATRICES = {"in_proj": "attn.in_proj_weight", "out_proj": "attn.out_proj.weight", "c_fc": "mlp.c_fc.weight",
            "c_proj": "mlp.c_proj.weight"}
OWN_KEYS = ("name", "kind", "default_optimizer", "label")  # every method config's
PLACEMENT = ("encoder", "position")
LORA_KEYS = (*PLACEMENT, "targets", "rank", "alpha", "dropout", "dora")
RESTART_KEYS = ("reset_every", "restart_warmup", "prune_ratio", "prune_together")
KINDS = {"weights": (*PLACEMENT, "matrices"), "lora": LORA_KEYS, "relora": (*LORA_KEYS, *RESTART_KEYS),
         "zeroshot": (), **{kind: (*heads.SCHEDULE_KEYS, *keys) for kind, keys in heads.KIND_KEYS.items()}}


@dataclass
class Method:
    name: str                                    # method.label: the name results.json writes
    trainable: dict[str, torch.nn.Parameter]     # what trains, named as in model.named_parameters()
    optimizer: torch.optim.Optimizer | None      # None for zeroshot
    merged: tuple[str, ...] = ()                 # frozen weights it changes in place (ReLoRA's merges)
    reads_in_backward: bool = False              # gradients are read inside backward (no GradScaler)
    counts_updates: bool = False                 # the optimizer keeps SO's per-entry state (update_counts)
    restarts: Restarts | None = None             # ReLoRA's
    closure_step: bool = False                   # the optimizer steps from a closure of forward passes (MeZO)
    head: torch.nn.Module | None = None          # a head on frozen image features (so.clip.heads), or None
    epochs: object = None                        # a head's schedule: method.epochs (int or {shots: epochs}),
    batch_size: int | None = None                # its batch, and a constant warm-up of warmup_epochs passes
    warmup_epochs: int = 0                       # at warmup_lr before the cosine (None, 0: the protocol's
    warmup_lr: float = 0.0                       # iteration budget, batch_size and early stop)
    drop_last: bool = False                      # a head's pass: full batches only (Dassl's loader)
    mix_views: bool = False                      # a head's batches drawn from all its views' features

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.trainable.values())

    def scheduler(self, total, eta_min, pass_steps=1):
        """The learning rate over `total` steps down to `eta_min`: the cosine (the released code's and
        CLIP-LoRA's), ReLoRA's jagged cosine, or a head's constant warm-up of warmup_epochs passes of
        `pass_steps` steps at warmup_lr, then the cosine over `total` (Dassl's ConstantWarmupScheduler,
        per step)."""
        if self.restarts is not None:
            return self.restarts.scheduler(total, eta_min)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total, eta_min=eta_min)
        warmup = self.warmup_epochs * pass_steps
        if not warmup:
            return cosine
        lr = self.optimizer.param_groups[0]["lr"]
        constant = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self.warmup_lr / lr)
        return torch.optim.lr_scheduler.SequentialLR(self.optimizer, [constant, cosine], milestones=[warmup])


def check_method(cfg, cfg_optimizer):
    """Every check of the method config and of its pairing with the optimizer config that needs no
    model: keys, values, and combinations that cannot work (one message naming both keys)."""
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"method.kind={kind!r}: expected one of {', '.join(KINDS)}.")
    missing = [k for k in KINDS[kind] if k not in cfg]
    unknown = sorted(set(cfg) - set(KINDS[kind]) - set(OWN_KEYS))
    if missing or unknown or not cfg.get("name"):
        raise ConfigError(f"method={cfg.get('name')} (kind {kind}): missing keys {missing}, unknown keys {unknown}; "
                          f"expected name, kind, default_optimizer and {list(KINDS[kind])}.")
    if kind in heads.KIND_KEYS:
        heads.check_head(cfg)
    elif kind != "zeroshot":
        choice("method.encoder", cfg["encoder"], list(TOWERS))
        choice("method.position", cfg["position"], POSITIONS)
    if kind == "weights":
        matrices = cfg["matrices"]
        expect(isinstance(matrices, list) and matrices and set(matrices) <= MATRICES.keys()
               and len(set(matrices)) == len(matrices), "method.matrices", matrices,
               f"a non-empty list of distinct names among {list(MATRICES)}")
    if kind in ("lora", "relora"):
        targets = cfg["targets"]
        expect(isinstance(targets, list) and targets and set(targets) <= TARGETS.keys(), "method.targets", targets,
               f"a non-empty subset of {list(TARGETS)}")
        expect(type(cfg["rank"]) is int and cfg["rank"] > 0, "method.rank", cfg["rank"], "a positive integer")
        expect(isinstance(cfg["alpha"], (int, float)) and not isinstance(cfg["alpha"], bool), "method.alpha",
               cfg["alpha"], "a number")
        expect(isinstance(cfg["dropout"], (int, float)) and 0 <= cfg["dropout"] < 1, "method.dropout", cfg["dropout"],
               "a probability in [0, 1)")
        choice("method.dora", cfg["dora"], (True, False))
    if kind == "relora":
        check_restarts(cfg["reset_every"], cfg["restart_warmup"], cfg["prune_ratio"])
        choice("method.prune_together", cfg["prune_together"], (True, False))
        if cfg["dora"]:
            raise ConfigError("method.dora=true: ReLoRA merges B A into the weight, which DoRA's magnitude "
                              "vector does not allow; use dora: false.")
    spec, optimizer = kind_of(cfg_optimizer), cfg_optimizer.get("name")
    trains_nothing = kind == "zeroshot" or (kind in heads.KIND_KEYS and not heads.trains(cfg))
    if trains_nothing != (spec is None):
        raise ConfigError(f"method={cfg['name']} with optimizer={optimizer}: " + (
            f"{'zero-shot' if kind == 'zeroshot' else 'this method'} trains nothing, so nothing can step; use "
            "optimizer=none." if trains_nothing else
            "nothing would step what this method trains; choose an optimizer (e.g. its preset's, "
            f"optimizer={cfg.get('default_optimizer')})."))
    if kind in heads.KIND_KEYS and spec is not None and spec.closure_step:
        raise ConfigError(f"method={cfg['name']} with optimizer={optimizer}: MeZO perturbs CLIP's linear layers in "
                          "their forward, and this method trains a head on frozen image features; use a "
                          f"first-order optimizer (e.g. its preset's, optimizer={cfg.get('default_optimizer')}).")
    if kind == "relora" and not spec.adam_moments:
        raise ConfigError(f"method={cfg['name']} with optimizer={optimizer}: ReLoRA prunes the optimizer's Adam "
                          "moments (exp_avg, exp_avg_sq) of every factor at each restart, and this optimizer keeps "
                          "none it can prune in place; use optimizer=adamw (the preset's), adam or galore.")


def build_method(cfg, cfg_optimizer, model, seed, task=None):
    """Freeze `model`, add adapters or a head if the method has them, mark what trains and build the
    optimizer that steps it. `cfg` and `cfg_optimizer` are plain mappings (main.py resolves the Hydra
    config; no omegaconf needed here); `seed` seeds SO's support draws; `task` (heads.HeadTask) is what
    a head kind is built from."""
    check_method(cfg, cfg_optimizer)
    kind = cfg["kind"]
    model.requires_grad_(False)
    if kind == "weights":
        trainable = select_weights(model, cfg["encoder"], cfg["position"], cfg["matrices"])
    elif kind in ("lora", "relora"):
        trainable = _add_lora(cfg, model)
    elif kind in heads.KIND_KEYS:
        if task is None:
            raise ValueError(f"method={cfg['name']} trains a head on image features: build_method needs its task.")
        trainable = _add_head(cfg, model, task)
    else:
        trainable = {}
    optimizer = build_optimizer(cfg_optimizer, trainable, seed) if trainable else None
    spec = kind_of(cfg_optimizer)
    if optimizer is not None and cfg_optimizer.get("sparse_backward"):
        from so.sparse_grad import sparse_backward

        sparse_backward(model, optimizer)
    if optimizer is not None and spec.closure_step:
        from so.clip.mezo import perturb_in_forward

        perturb_in_forward(model, optimizer)
    method = Method(method_label(cfg["name"], cfg.get("default_optimizer"), cfg_optimizer["name"]), trainable,
                    optimizer, reads_in_backward=reads_in_backward(cfg_optimizer),
                    counts_updates=bool(spec and spec.sparse_state), closure_step=bool(spec and spec.closure_step))
    if kind in heads.KIND_KEYS:
        method.head = model.head
        method.epochs, method.batch_size = cfg["epochs"], cfg["batch_size"]
        method.warmup_epochs, method.warmup_lr = cfg["warmup_epochs"], cfg["warmup_lr"]
        method.drop_last, method.mix_views = cfg["drop_last"], cfg["mix_views"]
    if kind == "relora":
        from peft.tuners.lora import LoraLayer

        adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        method.restarts = Restarts(adapters.values(), optimizer,
                                   **{k: cfg[k] for k in RESTART_KEYS})
        method.merged = tuple(f"{n}.base_layer.weight" for n in adapters)
    return method


def block_indices(position, depth):
    """The blocks of method.position in a tower of `depth` blocks: thirds (bottom, mid, up) split at
    round(depth / 3) and round(2 depth / 3), halves at depth // 2, top3 the last three. For 12 blocks,
    the released code's ranges: 0-3, 4-7, 8-11; 0-5, 6-11; 9-11."""
    third, half = round(depth / 3), round(2 * depth / 3)
    return {"all": range(depth), "bottom": range(0, third), "mid": range(third, half), "up": range(half, depth),
            "half-bottom": range(depth // 2), "half-up": range(depth // 2, depth),
            "top3": range(max(0, depth - 3), depth)}[position]


def select_blocks(model, encoder, position):
    """Names of the residual blocks chosen by method.encoder and method.position."""
    choice("method.encoder", encoder, list(TOWERS))
    choice("method.position", position, POSITIONS)
    blocks = []
    for tower in TOWERS[encoder]:
        depth = len(model.get_submodule(tower).resblocks)
        indices = block_indices(position, depth)
        if not indices:
            raise ConfigError(f"method.position={position!r} chooses no block of {tower}, which has {depth}.")
        blocks += [f"{tower}.resblocks.{i}" for i in indices]
    return blocks


def select_weights(model, encoder, position, matrices=tuple(MATRICES)):
    """The `weights` trainable set: the chosen weight matrices of each chosen block."""
    params = dict(model.named_parameters())
    trainable = {f"{block}.{MATRICES[m]}": params[f"{block}.{MATRICES[m]}"]
                 for block in select_blocks(model, encoder, position) for m in MATRICES if m in matrices}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def _add_lora(cfg, model):
    """LoRA's adapters as the method's config places them; their factors, trainable."""
    add_adapters(model, select_blocks(model, cfg["encoder"], cfg["position"]), cfg["targets"],
                 rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg["dropout"], dora=cfg["dora"])
    model.requires_grad_(False)
    trainable = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def _add_head(cfg, model, task):
    """The head of a head kind's config over `task` (heads.HeadTask), attached as model.head; its
    parameters, trainable. (Imported here: open_clip's import is seconds, and a config error comes first.)"""
    from so.clip.adapters import CLIPAdapter, LinearProbe, TaskRes, TipAdapter
    from so.clip.prompt_learners import CoCoOp, CoOp

    kinds = {"coop": CoOp, "cocoop": CoCoOp, "clip_adapter": CLIPAdapter, "tip_adapter": TipAdapter,
             "taskres": TaskRes, "linear_probe": LinearProbe}
    model.head = kinds[cfg["kind"]](cfg, model, task).to(task.train.features.device)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return {f"head.{n}": p for n, p in model.head.named_parameters()}


def save_trained(method, model, path):
    """Write only what the method trained (trainable tensors or adapter weights, and the weights it
    merged into) to one file."""
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().cpu() for n in saved_names(method)}
    save_atomic({"method": method.name, "tensors": tensors}, path)


def saved_names(method):
    return set(method.trainable) | set(method.merged)


def load_trained(method, model, path):
    """Load a save_trained file into `model`, which build_method has prepared for the same method."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no trained weights here (run with save=true first).") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot be read ({str(e).splitlines()[0]}); train again with "
                         "save=true force=true.") from None
    if not isinstance(saved, dict) or saved.keys() != {"method", "tensors"}:
        raise ValueError(f"{path}: not a file written by save_trained.")
    if saved["method"] != method.name:
        raise ValueError(f"{path}: holds method {saved['method']!r}, expected {method.name!r}.")
    tensors, params, names = saved["tensors"], dict(model.named_parameters()), saved_names(method)
    missing = sorted(names - tensors.keys())
    unknown = sorted(tensors.keys() - names)
    if missing or unknown:
        raise ValueError(f"{path}: does not match method {method.name!r}: missing {missing[:3]} "
                         f"({len(missing)}), unexpected {unknown[:3]} ({len(unknown)}).")
    wrong = [n for n, t in tensors.items() if t.shape != params[n].shape]
    if wrong:
        raise ValueError(f"{path}: shape mismatch for {wrong[:3]} ({len(wrong)}), e.g. {wrong[0]}: "
                         f"file {tuple(tensors[wrong[0]].shape)}, model {tuple(params[wrong[0]].shape)}.")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
