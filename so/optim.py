"""SO: Sparse Optimization, Adam on a sparse, periodically redrawn gradient support.

The rule, per trainable tensor W viewed flat (N entries, M = max(1, floor(density * N))), step t:
  1. Support: at t = 1 and every `refresh_every` steps after, draw G, M entries of W, uniformly
     without replacement (grad_selection="random") or the M largest |g| (="topk", ties to the
     lower index); support="static" draws once.
  2. Gradient: g = grad + weight_decay * W (coupled L2), read only at G.
  3. Moments on U = S u G, S the kept set: Adam's m and v updates, with g = 0 outside G and
     m = v = 0 outside S.
  4. Update every entry of U: W -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps).
  5. Prune: keep the M entries of U with the largest |m| (ties to the lower index) with their
     m and v; moment_selection="random" keeps M uniform ones, "dense" never prunes.
  6. The dense gradient is freed (param.grad = None).
momentum=False is b1 = 0. A group with dense=True is plain Adam (coupled L2, fp32 moments).

Code: this module holds the optimizer (state, groups, step_in_backward); so.core holds steps 2-5:
`so_update`, the per-tensor core that reads like the rule, `so_update_batched`, which runs them
for all tensors of a group in a few dozen batched ops, and `_Rows`, which does the same between
redraws without matching indices (SO.step uses those two; so_update is the reference the tests
hold them to, and a functional form of the rule). so.draws makes the random draws with a
counter-based hash keyed by (parameter, step, index), so they do not depend on batching or on
the order in which backward hooks fire; torch's generators are sequential streams, which would.
Written by hand because no library implements this optimizer.
"""
import math
import warnings
from itertools import chain

import torch
from torch.optim import Optimizer

from so.core import (_Read, _Rows, _adam_delta, _grad_at, _moments, so_update, so_update_batched,
                     topk_support)
from so.draws import _GAMMA, _MOMENT_DRAW, _SUPPORT_DRAW, _mix64, _stream, random_supports

__all__ = ["SO", "so_update", "so_update_batched", "step_in_backward"]

GRAD_SELECTIONS = ("random", "topk")
MOMENT_SELECTIONS = ("topk", "random", "dense")
SUPPORTS = ("dynamic", "static")

# ------------------------------------------------------------------------------------------------

class SO(Optimizer):
    """Sparse Optimization (SO). Per-group keys: lr, betas, eps, weight_decay, density,
    refresh_every, grad_selection, moment_selection, support, momentum, dense.

    Per-parameter state: step (int), seed (int), support (G, sorted), kept (S: its entries in G
    in G's order, then the others ascending), exp_avg and exp_avg_sq (fp32, aligned with kept).
    Dense groups keep step, seed, exp_avg and exp_avg_sq shaped like the parameter. Between
    redraws, kept, exp_avg and exp_avg_sq are written out of the batched step's buffers when
    `state` is read; to change them, load a state_dict (in-place edits of those tensors are not
    seen by the batched step). `generator` (or the global torch RNG) seeds every draw."""

    def __init__(self, params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 density=5e-4, refresh_every=10, grad_selection="random", moment_selection="topk",
                 support="dynamic", momentum=True, generator=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density,
                        refresh_every=refresh_every, grad_selection=grad_selection,
                        moment_selection=moment_selection, support=support, momentum=momentum,
                        dense=False)
        _check_group(defaults, "SO()")
        self._tiny = [0, 0]  # sparse tensors with floor(density * numel) = 0, and all, as added
        self._rows = {}  # per group: {batch: _Rows}, rebuilt from the state whenever it changed
        self._read = {}  # param -> _Read: its gradient at the support, read in backward
        self._drawn = {}  # param -> the step its support was drawn ahead for, in backward
        self._groups = {}  # id(param) -> its group, for the hooks
        super().__init__(params, defaults)  # sets self.state
        self._warn_tiny()
        device = generator.device if generator is not None else "cpu"
        self.seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))

    @property
    def state(self):
        """Per-parameter state (torch.optim.Optimizer.state); the batched step writes S and its
        moments out of its buffers when this is read."""
        self._write_out()
        return self._state

    @state.setter
    def state(self, state):
        self._state = state

    def __getstate__(self):  # pickling and copy.deepcopy: the seed of later draws goes along
        return {**super().__getstate__(), "seed": self.seed}

    def __setstate__(self, state):  # Optimizer.load_state_dict and unpickling come through here
        state = dict(state)
        if "state" in state:
            self._state = state.pop("state")
        for key in ("_rows", "_read", "_drawn", "_groups"):
            self.__dict__.setdefault(key, {})
        self.__dict__.setdefault("_tiny", [0, 0])
        super().__setstate__(state)

    def _write_out(self):
        for rows in self._rows.values():
            for r in rows.values():
                if r.pending:
                    r.write_out()

    def add_param_group(self, param_group):
        group = {**self.defaults, **param_group}
        _check_group(group, f"param group {len(self.param_groups)}")
        super().add_param_group(param_group)
        if not group["dense"]:
            numels = [p.numel() for p in self.param_groups[-1]["params"]]
            self._tiny[0] += sum(int(group["density"] * n) == 0 for n in numels)
            self._tiny[1] += len(numels)
        if hasattr(self, "seed"):  # a group added after __init__ reports at once
            self._warn_tiny()

    def _warn_tiny(self):
        tiny, total = self._tiny
        if tiny:
            warnings.warn(f"SO: {tiny} of {total} sparse tensors have floor(density * numel) = 0;"
                          " each trains M = 1 entry instead", stacklevel=3)
        self._tiny = [0, 0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None or p in self._read]
            for p in params:
                if p in self._read and p.grad is not None:  # a backward after the hooks went
                    self.read_grad(p)
            if params:
                self._step_group(group, params)
        return loss

    def zero_grad(self, set_to_none=True):
        """Drops the gradients, those read in backward by step_in_backward included."""
        super().zero_grad(set_to_none)
        self._read.clear()

    @torch.no_grad()
    def read_grad(self, param):
        """step_in_backward's hook: read the gradient of `param` at its support (drawn now when
        due) and free it; step() applies it, adding up the reads of several backward passes. A
        dense group's gradient stays until step(): Adam needs all of it; so does a topk support's
        at a redraw, which needs the whole gradient of the step."""
        if param.grad is None:
            return
        if id(param) not in self._groups:
            self._groups = {id(p): g for g in self.param_groups for p in g["params"]}
        group = self._groups.get(id(param))
        if group is None:
            raise ValueError("SO.read_grad: the parameter is not in this optimizer")
        if group["dense"]:
            return
        _check_grad(param)
        (state,) = self._states(group, [param])
        step = state["step"] + 1
        if param not in self._read and _due(group, step) and self._drawn.get(param) != step:
            if group["grad_selection"] == "topk":
                return
            self._draw_ahead(group)
        values = _grad_at(param.view(-1), param.grad, state["support"], 0.0)  # a new tensor
        if param in self._read:
            self._read[param].values += values
        else:
            self._read[param] = _Read(values)
        param.grad = None

    def _draw_ahead(self, group):
        """Draw, in one batch, the supports of every tensor of the group whose next step
        redraws, at the first of their hooks (draws are keyed by step: the same supports)."""
        params = [p for p in group["params"] if p.requires_grad]
        states = self._states(group, params)
        steps = [s["step"] + 1 for s in states]
        due = [i for i, (p, t) in enumerate(zip(params, steps))
               if _due(group, t) and self._drawn.get(p) != t]
        self._draw(group, [params[i] for i in due], [states[i] for i in due],
                   [steps[i] for i in due])
        self._drawn.update((params[i], steps[i]) for i in due)

    def _init_state(self, param, dense, position):
        if not param.is_contiguous():
            raise ValueError(f"SO: parameter of shape {tuple(param.shape)} is not contiguous "
                             "(e.g. channels_last); SO indexes it flat, call .contiguous() first")
        if param.numel() >= 2**32:
            raise ValueError(f"SO: parameter of shape {tuple(param.shape)} has >= 2**32 entries")
        state = self._state[param]
        state["step"] = 0
        state["seed"] = _mix64(self.seed + (position + 1) * _GAMMA)
        if dense:
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            return
        index = dict(dtype=torch.int64, device=param.device)
        state["support"], state["kept"] = torch.empty(0, **index), torch.empty(0, **index)
        state["exp_avg"] = torch.empty(0, device=param.device)
        state["exp_avg_sq"] = torch.empty(0, device=param.device)

    def _states(self, group, params):
        """The params' states, initialised where new."""
        states = [self._state[p] for p in params]
        if not all(states):
            everything = chain(*(g["params"] for g in self.param_groups))
            position = {id(p): i for i, p in enumerate(everything)}
            for p, state in zip(params, states):
                if not state:
                    self._init_state(p, group["dense"], position[id(p)])
        return states

    def _step_group(self, group, params):
        grads = [self._read.pop(p, None) or _check_grad(p) for p in params]
        states = self._states(group, params)
        for s in states:
            s["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = dict(lr=float(group["lr"]), beta1=beta1 if group["momentum"] else 0.0,
                     beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        if group["dense"]:
            for p, s in zip(params, states):
                _adam_dense(p, s, **dict(hyper, beta1=beta1))
                p.grad = None
            return
        sizes = [_size(group, p) for p in params]
        due = {i for i, s in enumerate(states) if _due(group, s["step"])}
        ahead = [self._drawn.pop(p, None) == s["step"] for p, s in zip(params, states)]
        drawn = [i for i in due if not ahead[i]]  # the others drew in backward
        self._draw(group, [params[i] for i in drawn], [states[i] for i in drawn],
                   [states[i]["step"] for i in drawn])
        # Tensors of a group normally share the step and device; the others go in their own batch.
        batches = {}
        for i in sorted(range(len(params)), key=sizes.__getitem__):  # equal sizes adjacent
            batches.setdefault((states[i]["step"], params[i].device), []).append(i)
        rows = {}  # this group's _Rows by batch, for the next step
        for (step, device), idx in batches.items():
            if group["moment_selection"] == "random":
                streams = [_stream(states[i]["seed"], step, _MOMENT_DRAW) for i in idx]
            else:
                streams = [0] * len(idx)
            args = dict(step=step, moment_selection=group["moment_selection"], **hyper)
            flats, batch_grads = [params[i].view(-1) for i in idx], [grads[i] for i in idx]
            batch_states, batch_sizes = [states[i] for i in idx], [sizes[i] for i in idx]
            batch = (device, *(id(params[i]) for i in idx))
            rows[batch] = self._rows.get(id(group), {}).get(batch)
            if idx[0] in due or not (rows[batch] and rows[batch].fits(batch_states, batch_sizes,
                                                                       step)):
                self._write_out()  # the redraw reads S from the states
                rows[batch] = _Rows.update(batch_states, flats, batch_grads, sizes=batch_sizes,
                                           streams=streams, **args)
            else:
                rows[batch](flats, batch_grads, streams=streams, **args)
        self._rows[id(group)] = rows
        for p in params:
            p.grad = None  # 6. nothing dense survives the step

    def _draw(self, group, params, states, steps):
        """Step 1: new supports for these params at these steps."""
        sizes = [_size(group, p) for p in params]
        if group["grad_selection"] == "topk":
            for p, state, size in zip(params, states, sizes):
                state["support"] = topk_support(p.grad, p, size, group["weight_decay"])
            return
        for device in {p.device for p in params}:  # draws are keyed: batching is free
            on = [i for i, p in enumerate(params) if p.device == device]
            streams = [_stream(states[i]["seed"], steps[i], _SUPPORT_DRAW) for i in on]
            drawn = random_supports([params[i].numel() for i in on], [sizes[i] for i in on],
                                    streams, device)
            for i, support in zip(on, drawn):
                states[i]["support"] = support

    def state_bytes(self):
        """Bytes of all optimizer state: the per-parameter state and the batched step's rows."""
        tensors = [v for s in self.state.values() for v in s.values() if torch.is_tensor(v)]
        return (sum(t.numel() * t.element_size() for t in tensors)
                + sum(r.bytes() for rows in self._rows.values() for r in rows.values()))

    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["seed"] = self.seed
        return state_dict

    def load_state_dict(self, state_dict):
        # Optimizer.load_state_dict casts every tensor to the parameter's dtype (int64 indices and
        # fp32 moments included): put the saved tensors back as they were afterwards.
        saved_ids = chain(*(g["params"] for g in state_dict["param_groups"]))
        by_id = dict(zip(saved_ids, chain(*(g["params"] for g in self.param_groups))))
        self._rows, self._read, self._drawn = {}, {}, {}  # they belong to the replaced state
        super().load_state_dict(state_dict)
        for pid, saved in state_dict["state"].items():
            param = by_id[pid]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self._state[param][key] = value.to(device=param.device, copy=True)
        self.seed = int(state_dict.get("seed", self.seed))


def _size(group, param):
    return max(1, int(group["density"] * param.numel()))


def _due(group, step):
    """Whether the support is drawn at this step."""
    every = group["refresh_every"] if group["support"] == "dynamic" else math.inf
    return step == 1 or (step - 1) % every == 0


def _check_grad(param):
    if param.grad.is_sparse:
        raise ValueError("SO does not support sparse gradients")
    return param.grad


def _adam_dense(param, state, *, lr, beta1, beta2, eps, weight_decay):
    """Plain Adam with coupled L2 and fp32 moments, with the arithmetic of the sparse core."""
    g = param.grad.float()
    if weight_decay:
        g = g + weight_decay * param.float()
    _moments(state["exp_avg"], state["exp_avg_sq"], g, beta1, beta2)
    delta = _adam_delta(state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps,
                        state["step"])
    if param.dtype == delta.dtype:
        param.sub_(delta)
    else:
        param.copy_(param.to(torch.promote_types(param.dtype, torch.float32)) - delta)


def _check_group(group, where):
    def fail(key, expected):
        raise ValueError(f"SO: {where}: {key!r} must be {expected}, got {group[key]!r}")

    def number(key):
        return isinstance(group[key], (int, float)) and not isinstance(group[key], bool)

    if not (number("lr") or torch.is_tensor(group["lr"])) or float(group["lr"]) < 0:
        fail("lr", "a number >= 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        fail("betas", "a pair of numbers in [0, 1)")
    if not number("eps") or group["eps"] < 0:
        fail("eps", "a number >= 0")
    if not number("weight_decay") or group["weight_decay"] < 0:
        fail("weight_decay", "a number >= 0")
    if not number("density") or not 0 < group["density"] <= 1:
        fail("density", "a number in (0, 1]")
    every = group["refresh_every"]
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        fail("refresh_every", "an int >= 1")
    for key, choices in (("grad_selection", GRAD_SELECTIONS),
                         ("moment_selection", MOMENT_SELECTIONS), ("support", SUPPORTS)):
        if group[key] not in choices:
            fail(key, f"one of {choices}")
    for key in ("momentum", "dense"):
        if not isinstance(group[key], bool):
            fail(key, "True or False")


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def step_in_backward(model_or_params, optimizer):
    """Read each parameter's gradient inside backward, as soon as it is accumulated, and free it
    at once, so no two full gradients coexist: SO keeps it at the support (M values) and the next
    optimizer.step() applies every update in one batched step, with the same numbers as the plain
    loop (several backward passes before a step add up, as gradients do; optimizer.zero_grad()
    drops them). Dense groups keep their gradients until the step. Not for torch.amp.GradScaler,
    which unscales .grad after backward. Returns a handle with .remove()."""
    if not isinstance(optimizer, SO):
        raise TypeError(f"step_in_backward needs an SO optimizer, got {type(optimizer).__name__}")
    if isinstance(model_or_params, torch.nn.Module):
        model_or_params = model_or_params.parameters()
    wanted = {id(p) for p in model_or_params}
    return _Handles([p.register_post_accumulate_grad_hook(optimizer.read_grad)
                     for g in optimizer.param_groups for p in g["params"]
                     if p.requires_grad and id(p) in wanted])
