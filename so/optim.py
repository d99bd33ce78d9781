"""SO: Sparse Optimization, Adam on a sparse, periodically redrawn gradient support.

The rule, per trainable tensor W viewed flat (N entries, M = max(1, floor(density * N))), step t:
  1. Support: at t = 1 and every `refresh_every` steps after, draw G, M entries of W, uniformly
     without replacement (grad_selection="random") or the M largest |g| (="topk", ties to the
     lower index); support="static" draws once.
  2.-5. so.rule.so_update: Adam's moments on U = S u G (S the kept set), every entry of U
     updated, then the M entries of largest |m| kept (moment_selection="random": M uniform ones,
     "dense": no prune).
  6. With free_grads=True the dense gradient is freed (param.grad = None), as the paper's code
     does; by default .grad is left alone, as every torch.optim optimizer leaves it.
momentum=False is b1 = 0. A group with dense=True is plain Adam (coupled L2, fp32 moments).

impl="reference" runs so.rule.so_update tensor by tensor: the rule as written. impl="batched"
(the default) runs so.batched: the same numbers, all tensors of a group in a few dozen ops.
Written by hand because no library implements this optimizer.
"""
import math
import warnings
from itertools import chain

import torch
from torch.optim import Optimizer

from so.batched import BatchedState
from so.draws import MOMENT_DRAW, SUPPORT_DRAW, param_seed, random_supports, stream_key
from so.rule import (MOMENT_SELECTIONS, PRUNES, GradAtSupport, adam_update, grad_at, so_update,
                     topk_support)

GRAD_SELECTIONS = ("random", "topk")
SUPPORTS = ("dynamic", "static")
IMPLS = ("batched", "reference")


class SO(Optimizer):
    """Sparse Optimization (SO). Per-group keys: lr, betas, eps, weight_decay, density,
    refresh_every, grad_selection, moment_selection, support, momentum, dense, impl.

    Per-parameter state: step (int), seed (int), support (G, sorted), kept (S: its entries in G
    in G's order, then the others ascending), exp_avg and exp_avg_sq (fp32, aligned with kept).
    Dense groups keep step, seed, exp_avg and exp_avg_sq shaped like the parameter. With
    impl="batched", kept and the moments are written out of the batch's buffers when `state` is
    read; to change them, load a state_dict (in-place edits of those tensors are not seen).
    `generator` (or the global torch RNG) seeds every draw. `free_grads=True` sets .grad to None
    once a step has read it (torch's optimizers never touch .grad, the default here too): the
    memory of a loop that zeroes its gradients only before the next backward.

    Indices are flat positions in the parameter's memory order (its logical order when it is
    contiguous), so channels_last weights and transposed views work as they are. Complex
    parameters are refused (SO's support indexes real entries); sparse gradients raise
    RuntimeError, as in torch.optim."""

    def __init__(self, params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 density=5e-4, refresh_every=10, grad_selection="random", moment_selection="topk",
                 support="dynamic", momentum=True, impl="batched", generator=None, free_grads=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density,
                        refresh_every=refresh_every, grad_selection=grad_selection,
                        moment_selection=moment_selection, support=support, momentum=momentum,
                        dense=False, impl=impl)
        check_group(defaults, "SO")
        device = generator.device if generator is not None else "cpu"
        self.seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))
        self._batches = {}  # id(group) -> {batch key: BatchedState} (impl="batched")
        self._reads = {}  # param -> GradAtSupport: its gradient read in backward
        self._drawn_ahead = {}  # param -> the step its support was drawn for, in backward
        self._group_of = {}  # id(param) -> its group, for the hooks
        self._warn_now = False  # add_param_group warns at once after __init__
        self.reads_in_backward = False  # step_in_backward's hooks are on
        if not isinstance(free_grads, bool):
            raise ValueError(f"free_grads={free_grads!r}: expected True or False (SO)")
        self.free_grads = free_grads
        super().__init__(params, defaults)
        warn_tiny(self.param_groups)
        self._warn_now = True

    @property
    def state(self):
        """Per-parameter state (torch.optim.Optimizer.state); pending batches write S and its
        moments out when this is read."""
        self._write_pending()
        return self._state

    @state.setter
    def state(self, state):
        self._state = state

    def _write_pending(self):
        for batches in self._batches.values():
            for batch in batches.values():
                if batch.pending:
                    batch.write_to_states()

    def __getstate__(self):  # pickling and copy.deepcopy: the seed of later draws goes along
        return {**super().__getstate__(), "seed": self.seed, "free_grads": self.free_grads}

    def __setstate__(self, state):  # Optimizer.load_state_dict and unpickling come through here
        state = dict(state)
        if "state" in state:
            self._state = state.pop("state")
        for key in ("_batches", "_reads", "_drawn_ahead", "_group_of"):
            self.__dict__.setdefault(key, {})
        self.__dict__.setdefault("_warn_now", True)
        self.__dict__.setdefault("reads_in_backward", False)
        self.__dict__.setdefault("free_grads", False)
        super().__setstate__(state)

    def add_param_group(self, param_group):
        check_group({**self.defaults, **param_group}, f"SO param group {len(self.param_groups)}")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            check_param(p)
        if self._warn_now:
            warn_tiny(self.param_groups[-1:])

    def zero_grad(self, set_to_none=True):
        """Drops the gradients, those read in backward by step_in_backward included."""
        super().zero_grad(set_to_none)
        self._reads.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None or p in self._reads]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group, params):
        """One step of the group's tensors that have a gradient, phase by phase."""
        grads = self._take_grads(params)
        states = self._advance_steps(group, params)
        if group["dense"]:
            for p, g, s in zip(params, grads, states):
                adam_update(p, g, s, **_hyper(group, momentum=True))
        else:
            grads = [g if isinstance(g, GradAtSupport) else flat(g, p) for p, g in zip(params, grads)]
            self._redraw_due(group, params, states)
            run = self._run_reference if group["impl"] == "reference" else self._run_batched
            run(group, params, grads, states)
        if self.free_grads:
            for p in params:
                p.grad = None  # 6. nothing dense survives the step

    def _take_grads(self, params):
        """Each tensor's gradient: the one read in backward (step_in_backward), else .grad."""
        for p in params:
            if p in self._reads and p.grad is not None:  # a backward after the hooks ran
                self.read_grad(p, free=self.free_grads)
        return [self._reads.pop(p, None) or check_grad(p) for p in params]

    def _advance_steps(self, group, params):
        """The step counters, the states created where new."""
        states = self._states(group, params)
        for s in states:
            s["step"] += 1
        return states

    def _redraw_due(self, group, params, states):
        """1. New supports where due, except those drawn ahead in backward for this step."""
        ahead = [self._drawn_ahead.pop(p, None) == s["step"] for p, s in zip(params, states)]
        due = [i for i, s in enumerate(states) if is_due(group, s["step"]) and not ahead[i]]
        self._draw(group, [params[i] for i in due], [states[i] for i in due],
                   [states[i]["step"] for i in due])

    def _run_reference(self, group, params, grads, states):
        """2.-5. so_update, tensor by tensor."""
        hyper = _hyper(group, momentum=group["momentum"])
        for p, g, s in zip(params, grads, states):
            stream = stream_key(s["seed"], s["step"], MOMENT_DRAW)
            s["kept"], s["exp_avg"], s["exp_avg_sq"], _ = so_update(
                flat(p, p), g, s["support"], s["kept"], s["exp_avg"], s["exp_avg_sq"],
                step=s["step"], size=support_size(group, p),
                moment_selection=group["moment_selection"], stream=stream, **hyper)

    def _run_batched(self, group, params, grads, states):
        """2.-5. in batches of tensors at the same step on the same device: after a redraw a new
        BatchedState, else a step of the batch's existing one."""
        sizes = [support_size(group, p) for p in params]
        previous, current = self._batches.get(id(group), {}), {}
        hyper = dict(_hyper(group, momentum=group["momentum"]),
                     moment_selection=group["moment_selection"])
        random_prune = group["moment_selection"] in PRUNES and PRUNES[
            group["moment_selection"]].random
        for (step, device), idx in _batches(params, states, sizes).items():
            streams = [stream_key(states[i]["seed"], step, MOMENT_DRAW) if random_prune else 0
                       for i in idx]
            flats, batch_grads = [flat(params[i], params[i]) for i in idx], [grads[i] for i in idx]
            batch_states, batch_sizes = [states[i] for i in idx], [sizes[i] for i in idx]
            key = (device, *(id(params[i]) for i in idx))
            batch = previous.get(key)
            if is_due(group, step) or not (batch and batch.matches(batch_states, batch_sizes,
                                                                   step)):
                self._write_pending()  # the redraw reads S from the states
                batch = BatchedState.after_redraw(batch_states, flats, batch_grads,
                                                  sizes=batch_sizes, streams=streams, step=step,
                                                  **hyper)
            else:
                batch.step_all(flats, batch_grads, streams=streams, step=step, **hyper)
            current[key] = batch
        self._batches[id(group)] = current

    def _draw(self, group, params, states, steps):
        """1. New supports for these params at these steps."""
        sizes = [support_size(group, p) for p in params]
        if group["grad_selection"] == "topk":
            for p, state, size in zip(params, states, sizes):
                state["support"] = topk_support(flat(p.grad, p), flat(p, p), size, group["weight_decay"])
            return
        for device in {p.device for p in params}:  # draws are keyed: batching is free
            on = [i for i, p in enumerate(params) if p.device == device]
            streams = [stream_key(states[i]["seed"], steps[i], SUPPORT_DRAW) for i in on]
            drawn = random_supports([params[i].numel() for i in on], [sizes[i] for i in on],
                                    streams, device)
            for i, support in zip(on, drawn):
                states[i]["support"] = support

    @torch.no_grad()
    def read_grad(self, param, free=True):
        """step_in_backward's hook: read the gradient of `param` at its support (drawn now when
        due) and free it (`free`); step() applies it, adding up the reads of several backward
        passes. A dense group's gradient stays until step(): Adam needs all of it; so does a topk
        support's at a redraw, which needs the whole gradient of the step."""
        if param.grad is None:
            return
        check_grad(param)
        support = self.backward_support(param)
        if support is None:
            return
        self.add_grad_at_support(param, grad_at(flat(param, param), flat(param.grad, param), support, 0.0))
        if free:
            param.grad = None

    def backward_support(self, param):
        """The support (flat indices in `param`'s memory order) at which the next step reads its
        gradient, drawn now where that step redraws (draws are keyed by step: the same supports
        step() would draw); None where the step needs the whole gradient: a dense group, or a topk
        support at its redraw. For so.sparse_grad and the hooks of step_in_backward."""
        if id(param) not in self._group_of:
            self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        group = self._group_of.get(id(param))
        if group is None:
            raise ValueError("SO: the parameter is not in this optimizer")
        if group["dense"]:
            return None
        (state,) = self._states(group, [param])
        step = state["step"] + 1
        if (param not in self._reads and is_due(group, step)
                and self._drawn_ahead.get(param) != step):
            if group["grad_selection"] == "topk":
                return None
            self._draw_ahead(group)
        return state["support"]

    def add_grad_at_support(self, param, values):
        """Add `values`, the gradient at backward_support(param) in fp32 (weight decay not added), to
        what the next step applies; several backward passes add up, as gradients do."""
        if param in self._reads:
            self._reads[param].values += values
        else:
            self._reads[param] = GradAtSupport(values)

    def _draw_ahead(self, group):
        """Draw, in one batch, the supports of every tensor of the group whose next step
        redraws, at the first of their hooks (draws are keyed by step: the same supports)."""
        params = [p for p in group["params"] if p.requires_grad]
        states = self._states(group, params)
        steps = [s["step"] + 1 for s in states]
        due = [i for i, (p, t) in enumerate(zip(params, steps))
               if is_due(group, t) and self._drawn_ahead.get(p) != t]
        self._draw(group, [params[i] for i in due], [states[i] for i in due],
                   [steps[i] for i in due])
        self._drawn_ahead.update((params[i], steps[i]) for i in due)

    def _states(self, group, params):
        """The params' states, created where new."""
        states = [self._state[p] for p in params]
        if not all(states):
            everything = chain(*(g["params"] for g in self.param_groups))
            position = {id(p): i for i, p in enumerate(everything)}
            for p, state in zip(params, states):
                if not state:
                    state.update(_new_state(p, group["dense"], param_seed(self.seed,
                                                                          position[id(p)])))
        return states

    def state_bytes(self):
        """Bytes of all optimizer state: the per-parameter state and the batches' buffers."""
        tensors = [v for s in self.state.values() for v in s.values() if torch.is_tensor(v)]
        return (sum(t.numel() * t.element_size() for t in tensors)
                + sum(b.bytes() for batches in self._batches.values() for b in batches.values()))

    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["seed"] = self.seed
        return state_dict

    def load_state_dict(self, state_dict):
        # Optimizer.load_state_dict casts every tensor to the parameter's dtype (int64 indices and
        # fp32 moments included): put the saved tensors back as they were afterwards.
        saved_ids = chain(*(g["params"] for g in state_dict["param_groups"]))
        by_id = dict(zip(saved_ids, chain(*(g["params"] for g in self.param_groups))))
        self._batches, self._reads, self._drawn_ahead = {}, {}, {}  # of the replaced state
        super().load_state_dict(state_dict)
        for pid, saved in state_dict["state"].items():
            param = by_id[pid]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self._state[param][key] = value.to(device=param.device, copy=True)
        self.seed = int(state_dict.get("seed", self.seed))


def check_param(param):
    """What SO can index: a real tensor under 2**32 entries, dense in memory in some order."""
    if param.is_complex():
        raise ValueError(f"SO: parameter of shape {tuple(param.shape)} is complex; SO's supports index real "
                         "entries: train torch.view_as_real of it as a real parameter, or use torch.optim.Adam")
    if param.numel() >= 2**32:
        raise ValueError(f"SO: parameter of shape {tuple(param.shape)} has >= 2**32 entries")
    if not param.permute(memory_order(param)).is_contiguous():
        raise ValueError(f"SO: parameter of shape {tuple(param.shape)} and strides {param.stride()} overlaps "
                         "itself or has gaps in memory; call .contiguous() first")


def memory_order(t):
    """t's dimensions from the outermost to the innermost in memory."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))


def flat(t, param):
    """`t` (the parameter itself, or a tensor shaped like it) as one dimension in the parameter's
    memory order: a view of the parameter, whose writes reach it; a view or a copy of the others."""
    if param.is_contiguous():
        return t.reshape(-1)
    return t.permute(memory_order(param)).reshape(-1)


def _new_state(param, dense, seed):
    if dense:
        return dict(step=0, seed=seed, exp_avg=torch.zeros_like(param, dtype=torch.float32),
                    exp_avg_sq=torch.zeros_like(param, dtype=torch.float32))
    index = dict(dtype=torch.int64, device=param.device)
    return dict(step=0, seed=seed, support=torch.empty(0, **index), kept=torch.empty(0, **index),
                exp_avg=torch.empty(0, device=param.device),
                exp_avg_sq=torch.empty(0, device=param.device))


def _hyper(group, momentum):
    beta1, beta2 = group["betas"]
    return dict(lr=float(group["lr"]), beta1=beta1 if momentum else 0.0, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"])


def _batches(params, states, sizes):
    """Indices of the tensors by (step, device), equal sizes adjacent (the prune is one topk per
    run of them). Tensors of a group normally share both."""
    batches = {}
    for i in sorted(range(len(params)), key=sizes.__getitem__):
        batches.setdefault((states[i]["step"], params[i].device), []).append(i)
    return batches


def support_size(group, param):
    """M: the entries of G and the most entries of S."""
    return max(1, int(group["density"] * param.numel()))


def is_due(group, step):
    """Whether the support is drawn at this step."""
    every = group["refresh_every"] if group["support"] == "dynamic" else math.inf
    return step == 1 or (step - 1) % every == 0


def check_grad(param):
    if param.grad.is_sparse:
        raise RuntimeError("SO does not support sparse gradients")  # torch.optim's error type
    return param.grad


def warn_tiny(groups):
    """One warning for the sparse tensors where floor(density * numel) = 0."""
    numels = [(g["density"], p.numel()) for g in groups if not g["dense"] for p in g["params"]]
    tiny = sum(int(density * n) == 0 for density, n in numels)
    if tiny:
        warnings.warn(f"SO: {tiny} of {len(numels)} sparse tensors have floor(density * numel) = "
                      "0; each trains M = 1 entry instead", stacklevel=3)


def check_group(group, where):
    def fail(key, expected):
        raise ValueError(f"{key}={group[key]!r}: expected {expected} ({where})")

    def number(key):
        return isinstance(group[key], (int, float)) and not isinstance(group[key], bool)

    lr = group["lr"]
    if not (number("lr") or (torch.is_tensor(lr) and lr.numel() == 1)) or float(lr) < 0:
        fail("lr", "a number >= 0 or a one-element tensor")
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
                         ("moment_selection", MOMENT_SELECTIONS), ("support", SUPPORTS),
                         ("impl", IMPLS)):
        if group[key] not in choices:
            fail(key, f"one of {choices}")
    for key in ("momentum", "dense"):
        if not isinstance(group[key], bool):
            fail(key, "True or False")


class _Handles:
    def __init__(self, optimizer, handles):
        self.optimizer, self.handles = optimizer, handles
        optimizer.reads_in_backward = True

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.optimizer.reads_in_backward = False


def step_in_backward(model_or_params, optimizer):
    """Read each parameter's gradient inside backward, as soon as it is accumulated, and free it
    at once, so no two full gradients coexist: SO keeps it at the support (M values) and the next
    optimizer.step() applies every update, with the same numbers as the plain loop (several
    backward passes before a step add up, as gradients do; optimizer.zero_grad() drops them).
    Dense groups keep their gradients until the step. Not for torch.amp.GradScaler, which
    unscales .grad after backward. Returns a handle with .remove()."""
    if not isinstance(optimizer, SO):
        raise TypeError(f"step_in_backward needs an SO optimizer, got {type(optimizer).__name__}")
    if isinstance(model_or_params, torch.nn.Module):
        model_or_params = model_or_params.parameters()
    wanted = {id(p) for p in model_or_params}
    return _Handles(optimizer, [p.register_post_accumulate_grad_hook(optimizer.read_grad)
                                for g in optimizer.param_groups for p in g["params"]
                                if p.requires_grad and id(p) in wanted])
