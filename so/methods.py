"""Methods: which parameters of CLIP train, and with which optimizer. One small factory per kind.

    so        SO (so/optim.py) on the chosen attention/MLP weights, optionally stepped inside backward
    adam      torch Adam on the same weights (the dense baseline)
    lora      CLIP-LoRA adapters on q, k, v (and o) of the chosen blocks, AdamW; `dora: true` for DoRA
    relora    LoRA's adapters, merged and restarted every `reset_every` steps (so/relora.py)
    galore    AdamW with GaLore's low-rank gradient projection on SO's weights (so/galore.py)
    zeroshot  nothing trains

The harness runs the loop: loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True).
"""
import inspect
import pickle
from dataclasses import dataclass

import torch

from so.galore import GaLore
from so.lora import add_adapters
from so.optim import SO, step_in_backward
from so.relora import ReLoRA
from so.runs import save_atomic

TOWERS = {"text": ["transformer"], "vision": ["visual.transformer"],
          "both": ["visual.transformer", "transformer"]}
POSITIONS = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top3")
WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class Method:
    name: str                                    # cfg.method.name, as written in results.json
    optimizer: torch.optim.Optimizer | None      # None for zeroshot
    trainable: dict[str, torch.nn.Parameter]     # what trains, named as in model.named_parameters()
    merged: tuple[str, ...] = ()                 # frozen weights it changes in place (ReLoRA's merges)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.trainable.values())


def build_method(cfg_method, model, seed):
    """Freeze `model`, add adapters if the method has them, mark what trains and build its optimizer.
    `cfg_method` is a plain mapping (main.py resolves the Hydra config; no omegaconf needed here),
    its `optimizer` the optimizer's arguments; `seed` seeds SO's support draws."""
    cfg = dict(cfg_method)
    name, kind = cfg.pop("name", None), cfg.pop("kind", None)
    if not name:
        raise ValueError("method.name is missing: every configs/method/*.yaml names its method.")
    if kind not in BUILDERS:
        raise ValueError(f"method.kind={kind!r}: expected one of {list(BUILDERS)}.")
    model.requires_grad_(False)
    return BUILDERS[kind](name, cfg, model, seed)


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
    if encoder not in TOWERS:
        raise ValueError(f"method.encoder={encoder!r}: expected one of {list(TOWERS)}.")
    if position not in POSITIONS:
        raise ValueError(f"method.position={position!r}: expected one of {list(POSITIONS)}.")
    blocks = []
    for tower in TOWERS[encoder]:
        depth = len(model.get_submodule(tower).resblocks)
        indices = block_indices(position, depth)
        if not indices:
            raise ValueError(f"method.position={position!r} chooses no block of {tower}, which has {depth}.")
        blocks += [f"{tower}.resblocks.{i}" for i in indices]
    return blocks


def select_weights(model, encoder, position):
    """The SO/Adam trainable set: the four attention/MLP weight matrices of each chosen block."""
    params = dict(model.named_parameters())
    trainable = {f"{block}.{w}": params[f"{block}.{w}"]
                 for block in select_blocks(model, encoder, position) for w in WEIGHTS}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def _check_keys(cfg, kind, required):
    missing = [k for k in required if k not in cfg]
    unknown = [k for k in cfg if k not in required]
    if missing or unknown:
        raise ValueError(f"method (kind {kind}): missing keys {missing}, unknown keys {unknown}; "
                         f"expected {list(required)}.")


def make_optimizer(cls, params, cfg, **fixed):
    """cls(params, **cfg, **fixed) for the `method.optimizer` mapping cfg, its keys checked against
    cls's arguments (less those the method sets itself: `fixed`); betas lists become tuples."""
    allowed = sorted(set(inspect.signature(cls).parameters) - {"params", *fixed})
    unknown = sorted(set(cfg) - set(allowed))
    if unknown or "lr" not in cfg:
        raise ValueError(f"method.optimizer: unknown keys {unknown}{'' if 'lr' in cfg else ', lr missing'}; "
                         f"{cls.__name__} takes {allowed}.")
    return cls(params, **{k: tuple(v) if k == "betas" else v for k, v in cfg.items()}, **fixed)


def torch_fast_path(params):
    """torch.optim's own fast paths: fused on CUDA, foreach elsewhere."""
    return {"fused": True} if all(p.is_cuda for p in params) else {"foreach": True}


def _build_so(name, cfg, model, seed):
    _check_keys(cfg, "so", ("encoder", "position", "step_in_backward", "optimizer"))
    trainable = select_weights(model, cfg["encoder"], cfg["position"])
    params = list(trainable.values())
    generator = torch.Generator(params[0].device).manual_seed(seed)
    optimizer = make_optimizer(SO, params, cfg["optimizer"], generator=generator)
    if cfg["step_in_backward"]:
        step_in_backward(params, optimizer)
    return Method(name, optimizer, trainable)


def _build_adam(name, cfg, model, seed):
    _check_keys(cfg, "adam", ("encoder", "position", "optimizer"))
    trainable = select_weights(model, cfg["encoder"], cfg["position"])
    params = list(trainable.values())
    optimizer = make_optimizer(torch.optim.Adam, params, cfg["optimizer"], **torch_fast_path(params))
    return Method(name, optimizer, trainable)


def _add_lora(cfg, model, kind):
    """LoRA's adapters as the method's config places them; their factors, trainable."""
    _check_keys(cfg, kind, ("encoder", "position", "targets", "rank", "alpha", "dropout", "dora", "optimizer"))
    if not (isinstance(cfg["rank"], int) and cfg["rank"] > 0):
        raise ValueError(f"method.rank={cfg['rank']!r}: expected a positive integer.")
    if not 0 <= cfg["dropout"] < 1:
        raise ValueError(f"method.dropout={cfg['dropout']!r}: expected a probability in [0, 1).")
    add_adapters(model, select_blocks(model, cfg["encoder"], cfg["position"]), cfg["targets"],
                 rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg["dropout"], dora=cfg["dora"])
    model.requires_grad_(False)
    trainable = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def _build_lora(name, cfg, model, seed):
    trainable = _add_lora(cfg, model, "lora")
    params = list(trainable.values())
    optimizer = make_optimizer(torch.optim.AdamW, params, cfg["optimizer"], **torch_fast_path(params))
    return Method(name, optimizer, trainable)


def _build_relora(name, cfg, model, seed):
    if cfg.get("dora"):
        raise ValueError("method.dora=true: ReLoRA merges B A into the weight, which DoRA's magnitude "
                         "vector does not allow; use dora: false.")
    trainable = _add_lora(cfg, model, "relora")
    from peft.tuners.lora import LoraLayer

    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    params = list(trainable.values())
    optimizer = make_optimizer(ReLoRA, params, cfg["optimizer"], adapters=adapters.values(),
                               **torch_fast_path(params))
    return Method(name, optimizer, trainable, merged=tuple(f"{n}.base_layer.weight" for n in adapters))


def _build_galore(name, cfg, model, seed):
    _check_keys(cfg, "galore", ("encoder", "position", "optimizer"))
    trainable = select_weights(model, cfg["encoder"], cfg["position"])
    return Method(name, make_optimizer(GaLore, list(trainable.values()), cfg["optimizer"]), trainable)


def _build_zeroshot(name, cfg, model, seed):
    _check_keys(cfg, "zeroshot", ())
    return Method(name, None, {})


BUILDERS = {"so": _build_so, "adam": _build_adam, "lora": _build_lora, "relora": _build_relora,
            "galore": _build_galore, "zeroshot": _build_zeroshot}


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
