"""Zeroth-order training from forward passes: MeZO's two-point SPSA (Malladi et al., 2023, "Fine-Tuning
Language Models with Just Forward Passes"), and the branch-wise hybrid of "Branch, or Layer?
Zeroth-Order Optimization for Continual Learning of Vision-Language Models" (AAAI 2026).

Each step draws a direction z ~ N(0, I) over the parameters it steps zeroth-order, regenerated from
(seed, step, parameter) whenever it is needed, never stored, and evaluates the loss at W + eps z and
W - eps z; the projected gradient c = (L+ - L-) / (2 eps) gives the estimate g = c z, applied as
    sgd:   W -= lr (g + weight_decay W)                  (MeZO's ZO-SGD)
    adam:  Adam's moments and step on g + weight_decay W (a ZO-Adam variant)
    sign:  W -= lr sign(g)                               (ZO-signSGD, the sign normalisation MoZO uses)
The perturbation is added in the forward, not to the weights: a layer computes F.linear(x, W, b) +
s F.linear(x, z) with s = +-eps (the same function as perturbing W), so the weights stay exactly as
they were through both evaluations, and no copy of them is kept; the memory is inference's. Only the
weights of nn.Linear and nn.MultiheadAttention layers can be stepped this way.

zeroth_order=vision|text is the branch-wise hybrid: that tower's parameters are stepped as above, the
other tower's by Adam on their gradient (one backward of the unperturbed loss per step). Written by
hand: no library implements in-forward SPSA for torch modules. MoZO's vision perturbation constraint
is not implemented.
"""
import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from so.draws import param_seed, stream_key
from so.rule import adam_update
from so.sparse_grad import ProjectedAttention, ProjectedLinear, swap_layers

UPDATES = ("sgd", "adam", "sign")
DIRECTION_DRAW = 3  # the purpose key of z's random stream (so.draws: 1 and 2 are SO's supports and prunes)
BRANCHES = ("both", "vision", "text")


class MeZO(Optimizer):
    """Zeroth-order steps on the parameters of groups with zeroth_order=True, Adam on the others
    (the hybrid's first-order tower); see the module docstring. step() needs a closure that returns
    the loss (computed without backward: step decides what needs gradients)."""

    def __init__(self, params, lr, eps=1e-3, update="sgd", betas=(0.9, 0.999), adam_eps=1e-8,
                 weight_decay=0.0, zeroth_order="both", first_order_lr=2e-4, generator=None):
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps={eps!r}: expected a number > 0 (MeZO)")
        if update not in UPDATES:
            raise ValueError(f"update={update!r}: expected one of {', '.join(UPDATES)} (MeZO)")
        if not (isinstance(lr, (int, float)) and lr >= 0) or not (isinstance(first_order_lr, (int, float))
                                                                  and first_order_lr >= 0):
            raise ValueError(f"lr={lr!r}, first_order_lr={first_order_lr!r}: expected numbers >= 0 (MeZO)")
        defaults = dict(lr=lr, eps=eps, update=update, betas=tuple(betas), adam_eps=adam_eps,
                        weight_decay=weight_decay, zeroth_order=True)
        device = generator.device if generator is not None else "cpu"
        self.seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))
        self.scale = None  # +-eps while a perturbed forward runs
        self.steps = 0
        params = list(params)
        if params and isinstance(params[0], tuple):  # (name, parameter): the towers split by name
            params = tower_groups(dict(params), zeroth_order, first_order_lr)
        elif zeroth_order != "both":
            raise ValueError(f"zeroth_order={zeroth_order!r}: the towers are told apart by name; pass "
                             "(name, parameter) pairs (MeZO)")
        super().__init__(params, defaults)
        self.index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            for p in group["params"]:
                p.requires_grad_(not group["zeroth_order"])  # no backward reaches a zeroth-order weight
                if group["zeroth_order"] and p.is_complex():
                    raise ValueError("MeZO: complex parameters are not supported")

    def __getstate__(self):  # pickling and copy.deepcopy: the seed and the step count go along
        return {**super().__getstate__(), "seed": self.seed, "steps": self.steps, "scale": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def zeroth_order_params(self):
        return [p for g in self.param_groups if g["zeroth_order"] for p in g["params"]]

    def direction(self, param):
        """z for `param` at this step: N(0, 1) entries from the generator keyed by (seed, step, param)."""
        key = stream_key(param_seed(self.seed, self.index[id(param)]), self.steps, DIRECTION_DRAW)
        generator = torch.Generator(param.device).manual_seed(key)
        return torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def estimate(self, closure):
        """(projected gradient c, mean of the two losses) at this step's direction; the weights are not
        touched: the perturbation is added in the layers' forward."""
        eps = self.param_groups[0]["eps"]
        try:
            self.scale = eps
            plus = closure()
            self.scale = -eps
            minus = closure()
        finally:
            self.scale = None
        return (plus - minus) / (2 * eps), (plus + minus) / 2

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("MeZO.step needs a closure that returns the loss: it evaluates the loss itself")
        self.steps += 1
        first_order = [p for g in self.param_groups if not g["zeroth_order"] for p in g["params"]]
        loss = None
        if first_order:  # the hybrid: the other tower's gradient, from the unperturbed loss
            with torch.enable_grad():
                loss = closure()
                loss.backward()
        projected, mean = self.estimate(closure)
        with torch.no_grad():
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if group["zeroth_order"]:
                        self._zeroth_order_update(p, projected * self.direction(p), group)
                    elif p.grad is not None:
                        state = self.state[p]
                        if not state:
                            state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                         exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                        state["step"] += 1
                        adam_update(p, p.grad, state, lr=group["lr"], beta1=beta1, beta2=beta2,
                                    eps=group["adam_eps"], weight_decay=group["weight_decay"])
        return mean if loss is None else loss.detach()

    def _zeroth_order_update(self, p, estimate, group):
        if group["weight_decay"] and group["update"] != "sign":
            estimate = estimate + group["weight_decay"] * p
        if group["update"] == "sgd":
            p.sub_((group["lr"] * estimate).to(p.dtype))
        elif group["update"] == "sign":
            p.sub_((group["lr"] * estimate.sign()).to(p.dtype))
        else:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                             exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
            state["step"] += 1
            beta1, beta2 = group["betas"]
            adam_update(p, estimate, state, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["adam_eps"],
                        weight_decay=0.0)


@torch.compiler.disable  # reads the optimizer's perturbation state: torch.compile leaves these layers eager
def perturbed(module, x, weight, bias):
    """F.linear(x, weight, bias), plus scale F.linear(x, z) while the module's MeZO evaluates a
    perturbed loss and steps this weight zeroth-order."""
    y = F.linear(x, weight, bias)
    optimizer = module._so_optimizer
    if optimizer.scale is not None and id(weight) in module._so_weights:
        y = y + optimizer.scale * F.linear(x, optimizer.direction(weight).to(x.dtype))
    return y


class PerturbedLinear(ProjectedLinear):
    def project(self, x, weight, bias):
        return perturbed(self, x, weight, bias)


class PerturbedAttention(ProjectedAttention):
    def project(self, x, weight, bias):
        return perturbed(self, x, weight, bias)


def perturb_in_forward(model, optimizer):
    """Make `model`'s linear layers whose weights `optimizer` steps zeroth-order add its perturbation
    in their forward; every such weight must be one of them. Returns a handle with .remove()."""
    wanted = {id(p) for p in optimizer.zeroth_order_params()}
    handle = swap_layers(model, wanted, PerturbedLinear, PerturbedAttention, _so_optimizer=optimizer)
    covered = set().union(*(m._so_weights for m, _ in handle.modules)) if handle.modules else set()
    if covered != wanted:
        handle.remove()
        raise ValueError(f"optimizer=mezo perturbs the weights of nn.Linear and nn.MultiheadAttention layers; "
                         f"{len(wanted - covered)} of the parameters it steps zeroth-order are not such weights")
    return handle


def tower_groups(named_params, zeroth_order, first_order_lr):
    """Param groups of a MeZO over the trainable parameters by name: zeroth_order=both steps all of
    them zeroth-order; vision (or text) that tower zeroth-order and the other first-order, by Adam at
    first_order_lr (a group's lr: the schedule scales it as it scales lr)."""
    if zeroth_order not in BRANCHES:
        raise ValueError(f"zeroth_order={zeroth_order!r}: expected one of {', '.join(BRANCHES)} (MeZO)")
    vision = [p for n, p in named_params.items() if n.startswith("visual.")]
    text = [p for n, p in named_params.items() if not n.startswith("visual.")]
    if zeroth_order == "both":
        return [{"params": vision + text}]
    zo, fo = (vision, text) if zeroth_order == "vision" else (text, vision)
    return [group for group in ({"params": zo}, {"params": fo, "zeroth_order": False, "lr": first_order_lr})
            if group["params"]]
