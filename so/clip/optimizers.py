"""How the trainable set steps: the `optimizer=` group, one entry per kind (the shape of timm's
optimizer registry).

    so      so.SO; with step_in_backward, each gradient is read at its support inside backward; with
            sparse_backward (methods.build_method applies it), the backward of the linear layers it
            steps computes their weight gradients at the support only (so.sparse_grad)
    adam    torch.optim.Adam (fused on CUDA, foreach elsewhere)
    adamw   torch.optim.AdamW (the same)
    sgd     torch.optim.SGD (the same): the prompt learners' and the probes' (their presets name whose)
    galore  so.clip.galore.GaLore: AdamW in a low-rank projection of each matrix's gradient
    spam    pytorch-optimizer's SPAM: Adam on a random mask redrawn with its moments reset
    mezo    so.clip.mezo.MeZO: zeroth-order steps from two forward passes (and the branch-wise hybrid)
    none    nothing steps (method=zeroshot)

SO's switches also give two rivals as presets (configs/optimizer/): mask_adam (Adam on a fixed random
mask: support=static) and sift (Adam on the top entries of the first gradient: grad_selection=topk,
support=static).

Every key of an optimizer config but name, kind and its kind's options is an argument of its class,
checked against the class's signature. `check_optimizer` builds the optimizer on a probe parameter,
so that every value the class itself checks is checked before any model exists.
"""
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

from so.clip.config import ConfigError

OWN_KEYS = ("name", "kind")  # every optimizer config's; the rest are the class's arguments


def _so():
    from so.optim import SO

    return SO


def _torch(name):
    def cls():
        import torch

        return getattr(torch.optim, name)
    return cls


def _galore():
    from so.clip.galore import GaLore

    return GaLore


def _spam():
    from pytorch_optimizer import SPAM

    return SPAM


def _mezo():
    from so.clip.mezo import MeZO

    return MeZO


@dataclass(frozen=True)
class Kind:
    cls: Callable                # -> the optimizer class (imported when asked for)
    fast_path: bool = False      # torch's fused (CUDA) or foreach kernels
    seeded: bool = False         # takes a torch.Generator: its draws follow the trial's seed
    sparse_state: bool = False   # keeps SO's per-entry state (support, kept): update counts can be read
    adam_moments: bool = False   # keeps exp_avg and exp_avg_sq per parameter that a method may prune in place
    options: tuple = ()          # keys of its config that are not class arguments
    named: bool = False          # takes (name, parameter) pairs (the hybrid tells the towers apart by name)
    closure_step: bool = False   # steps from a closure that returns the loss, no backward of the loop's


KINDS = {"so": Kind(_so, seeded=True, sparse_state=True, options=("step_in_backward", "sparse_backward")),
         "adam": Kind(_torch("Adam"), fast_path=True, adam_moments=True),
         "adamw": Kind(_torch("AdamW"), fast_path=True, adam_moments=True),
         "sgd": Kind(_torch("SGD"), fast_path=True),
         "galore": Kind(_galore, adam_moments=True),
         "spam": Kind(_spam),
         "mezo": Kind(_mezo, seeded=True, named=True, closure_step=True)}
NONE = "none"


def kind_of(cfg):
    """The Kind of an optimizer config (None for kind none), its keys checked."""
    kind = cfg.get("kind")
    if kind == NONE:
        unknown = sorted(set(cfg) - set(OWN_KEYS))
        if unknown:
            raise ConfigError(f"optimizer (kind none) takes no arguments, got {unknown}.")
        return None
    if kind not in KINDS:
        raise ConfigError(f"optimizer.kind={kind!r}: expected one of {[*KINDS, NONE]}.")
    spec = KINDS[kind]
    allowed = sorted(set(inspect.signature(spec.cls()).parameters) - {"params", "generator", "foreach", "fused"})
    unknown = sorted(set(cfg) - set(OWN_KEYS) - set(spec.options) - set(allowed))
    if unknown or "lr" not in cfg:
        raise ConfigError(f"optimizer={cfg.get('name')}: unknown keys {unknown}{'' if 'lr' in cfg else ', lr missing'}; "
                          f"{spec.cls().__name__} takes {allowed}.")
    for key in spec.options:
        if not isinstance(cfg.get(key), bool):
            raise ConfigError(f"optimizer.{key}={cfg.get(key)!r}: expected true or false.")
    return spec


def arguments(cfg):
    """The class's arguments in an optimizer config; betas lists become tuples."""
    spec = KINDS[cfg["kind"]]
    return {k: tuple(v) if k == "betas" else v for k, v in cfg.items()
            if k not in OWN_KEYS and k not in spec.options}


def build_optimizer(cfg, named_params, seed):
    """The optimizer of config `cfg` over `named_params` ({name: parameter}; None for kind none);
    `seed` seeds its draws. Constructor errors are reported with the config key."""
    spec = kind_of(cfg)
    if spec is None:
        return None
    import torch

    params = list(named_params.values())
    fixed = {}
    if spec.seeded:
        fixed["generator"] = torch.Generator(params[0].device).manual_seed(seed)
    if spec.fast_path:
        fixed |= {"fused": True} if all(p.is_cuda for p in params) else {"foreach": True}
    try:
        optimizer = spec.cls()(list(named_params.items()) if spec.named else params, **arguments(cfg), **fixed)
    except (ValueError, TypeError) as e:
        message = str(e)
        raise ConfigError(f"optimizer.{message}" if message.split(":")[0].count("=") == 1
                          else f"optimizer={cfg['name']}: {message}") from None
    if cfg.get("step_in_backward"):
        from so.optim import step_in_backward

        step_in_backward(params, optimizer)
    return optimizer


def reads_in_backward(cfg):
    """Whether the optimizer of config `cfg` takes gradients inside backward, or steps from a closure
    of forward passes: no GradScaler then."""
    spec = KINDS.get(cfg.get("kind"))
    return bool(cfg.get("step_in_backward") or cfg.get("sparse_backward") or (spec and spec.closure_step))


def check_optimizer(cfg):
    """Every check of build_optimizer, on a probe parameter: wrong keys and values fail here, named."""
    if kind_of(cfg) is not None:
        import torch

        with warnings.catch_warnings():  # about the probe's size, not the model's
            warnings.simplefilter("ignore")
            build_optimizer(cfg, {"visual.probe": torch.nn.Parameter(torch.zeros(2, 2))}, seed=0)
