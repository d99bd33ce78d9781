"""The SO rule for one tensor, as the paper writes it: the reference path, SO(impl="reference").

W is one trainable tensor viewed flat (N entries), M = max(1, floor(density * N)) its budget, t
the step. The optimizer (so.optim) draws the support G (step 1) and frees the gradient (step 6);
`so_update` is steps 2-5:
  2. g = grad + weight_decay * W, read only at G (coupled L2).
  3. Adam's moments on U = S u G, S the kept set: g = 0 outside G, m = v = 0 outside S.
  4. W -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps) on every entry of U.
  5. Keep the M entries of U of highest prune priority (|m| for moment_selection="topk"), with
     their m and v; "dense" never prunes.
The fast path (so.batched) computes the same numbers for many tensors at once; the arithmetic
below (moments, update, priorities) is shared by both.
"""
import math
from typing import Callable, NamedTuple

import torch

from so.draws import random_bits
from so.flat_index import positions


class GradAtSupport:
    """A gradient already read at the support, in backward (step_in_backward): fp32, weight
    decay not added yet (it is added at the step, once, as for a dense gradient)."""

    def __init__(self, values):
        self.values = values


def grad_at(flat, grad, support, weight_decay, out=None):
    """Step 2: (grad + weight_decay * flat) at `support`, in fp32; written into `out` when given.
    grad: the dense gradient, or a GradAtSupport."""
    if isinstance(grad, GradAtSupport):
        g = grad.values
    elif (out is not None and grad.is_contiguous() and grad.dtype == torch.float32
          and not weight_decay):
        return torch.index_select(grad.view(-1), 0, support, out=out)
    else:  # take reads any memory layout in logical order; index_select is 1.6x faster on CPU
        g = grad.view(-1).index_select(0, support) if grad.is_contiguous() else grad.take(support)
        g = g.float()
    if weight_decay:
        g = g + weight_decay * flat.index_select(0, support).float()
    return g if out is None else out.copy_(g)


def adam_moments(m, v, g, beta1, beta2):
    """Step 3: Adam's moment updates in place, as torch.optim.Adam computes them."""
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def adam_delta(m, v, lr, beta1, beta2, eps, step, dead=None, out=None):
    """Step 4: Adam's update, bias-corrected for the global step (into `out` when given);
    `dead` (1.0 where m = v = 0, else 0.0) makes those 0 even when eps = 0."""
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = v.sqrt().div_(math.sqrt(bias2)).add_(eps)
    if dead is not None and not eps:
        denom.add_(dead)
    return torch.mul(m, lr / bias1, out=out).div_(denom)


def subtract_at(flat, index, delta):
    """flat[index] -= delta (index unique), computed in at least fp32."""
    if flat.dtype == delta.dtype:
        flat.index_add_(0, index, delta, alpha=-1)
    else:
        work = torch.promote_types(flat.dtype, torch.float32)
        value = flat.index_select(0, index).to(work) - delta.to(work)
        flat.index_copy_(0, index, value.to(flat.dtype))


# Step 5's prune priorities: distinct int64 keys (flat index < 2**32), the entries with the largest
# keys are kept. The score fills the high 32 bits (the IEEE bits of a float >= 0 keep its order),
# the lower flat index wins ties.

def topk_priority(index, exp_avg, stream):
    """moment_selection="topk": the largest |m| first."""
    return exp_avg.abs().view(torch.int32).long().bitwise_left_shift_(32).sub_(index)


def random_priority(index, exp_avg, stream):
    """moment_selection="random": M of U drawn uniformly, from 31 random bits per entry."""
    return random_bits(stream, index, 31).bitwise_left_shift_(32).sub_(index)


class Prune(NamedTuple):
    priority: Callable  # (flat index, m, random stream) -> keys; the largest are kept
    random: bool        # whether it reads the random stream


PRUNES = {"topk": Prune(topk_priority, False), "random": Prune(random_priority, True)}
MOMENT_SELECTIONS = (*PRUNES, "dense")  # dense: never prune


def topk_support(grad, param, size, weight_decay):
    """grad_selection="topk": the `size` largest |grad + weight_decay * param| (ties to the
    lower index), sorted."""
    g = grad.reshape(-1).float()
    if weight_decay:
        g = g + weight_decay * param.reshape(-1).float()
    key = topk_priority(torch.arange(g.numel(), device=g.device), g, None)
    return torch.topk(key, size, sorted=False).indices.sort().values


def so_update(flat, grad, support, kept, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
              weight_decay, size, moment_selection, stream=0):
    """Steps 2-5 of one tensor. flat: the parameter viewed flat (updated in place); support: G,
    sorted; kept, exp_avg, exp_avg_sq: S (any order) and its fp32 moments; size: M; stream: the
    random stream of a random prune. Returns the new (kept, exp_avg, exp_avg_sq, kept_in_support):
    S in canonical order (its entries in G in G's order, then the others ascending) and the
    positions in G of the first ones."""
    g = grad_at(flat, grad, support, weight_decay)  # 2. the gradient, only at G
    union, where = torch.unique(torch.cat([kept, support]), return_inverse=True)  # 3. U = S u G
    in_kept, in_support = where[: kept.numel()], where[kept.numel():]
    m, v, g_union = (torch.zeros(union.numel(), device=flat.device) for _ in range(3))
    m[in_kept], v[in_kept], g_union[in_support] = exp_avg, exp_avg_sq, g
    adam_moments(m, v, g_union, beta1, beta2)
    subtract_at(flat, union, adam_delta(m, v, lr, beta1, beta2, eps, step))  # 4. all of U moves
    keep = torch.ones(union.numel(), dtype=torch.bool, device=flat.device)
    if moment_selection in PRUNES and union.numel() > size:  # 5. keep the M of highest priority
        keys = PRUNES[moment_selection].priority(union, m, stream)
        keep = torch.zeros_like(keep).index_fill_(0, torch.topk(keys, size, sorted=False).indices,
                                                  True)
    from_support = torch.zeros_like(keep).index_fill_(0, in_support, True)
    order = torch.cat([positions(keep & from_support), positions(keep & ~from_support)])
    return union[order], m[order], v[order], positions(keep[in_support])


def adam_update(param, grad, state, *, lr, beta1, beta2, eps, weight_decay):
    """A dense group's step: plain Adam with coupled L2 and fp32 moments, with the arithmetic of
    the sparse rule."""
    g = grad.float()
    if weight_decay:
        g = g + weight_decay * param.float()
    adam_moments(state["exp_avg"], state["exp_avg_sq"], g, beta1, beta2)
    delta = adam_delta(state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps,
                       state["step"])
    if param.dtype == delta.dtype:
        param.sub_(delta)
    else:
        param.copy_(param.to(torch.promote_types(param.dtype, torch.float32)) - delta)
