"""Steps 2-5 of the rule: the per-tensor core, its batched twin, and the fixed-shape rows that
run the batched step between support redraws. All three give the same numbers."""
import math
from itertools import accumulate

import torch

from so.draws import _random_bits
from so.indexing import _at, _put, _ranges, _repeat, _starts, _where


class _Read:
    """A gradient read at the support in backward (step_in_backward): fp32, weight decay not
    added yet (it is added at the step, once, as for a dense gradient)."""

    def __init__(self, values):
        self.values = values


def _grad_at(flat, grad, index, weight_decay, out=None):
    """(grad + weight_decay * flat) at index, in fp32; written into `out` when given. grad: the
    dense gradient, or a _Read of it at index."""
    if isinstance(grad, _Read):
        g = grad.values
    elif (out is not None and grad.is_contiguous() and grad.dtype == torch.float32
          and not weight_decay):
        return torch.index_select(grad.view(-1), 0, index, out=out)
    else:  # take reads any memory layout in logical order; index_select is 1.6x faster on CPU
        g = grad.view(-1).index_select(0, index) if grad.is_contiguous() else grad.take(index)
        g = g.float()
    if weight_decay:
        g = g + weight_decay * flat.index_select(0, index).float()
    return g if out is None else out.copy_(g)


def _moments(m, v, g, beta1, beta2):
    """Adam's moment updates in place, as torch.optim.Adam computes them (g = 0 outside G)."""
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def _adam_delta(exp_avg, exp_avg_sq, lr, beta1, beta2, eps, step, dead=None, out=None):
    """Adam's update (into `out` when given); `dead` (1.0 where m = v = 0, else 0.0) makes
    those 0 even when eps = 0."""
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = exp_avg_sq.sqrt().div_(math.sqrt(bias2)).add_(eps)
    if dead is not None and not eps:
        denom.add_(dead)
    return torch.mul(exp_avg, lr / bias1, out=out).div_(denom)


def _subtract_at(flat, index, delta):
    """flat[index] -= delta (index unique), computed in at least fp32."""
    if flat.dtype == delta.dtype:
        flat.index_add_(0, index, delta, alpha=-1)
    else:
        work = torch.promote_types(flat.dtype, torch.float32)
        value = flat.index_select(0, index).to(work) - delta.to(work)
        flat.index_copy_(0, index, value.to(flat.dtype))


def _priority(index, exp_avg, selection, stream):
    """Prune priorities as distinct int64 keys (index < 2**32): |m| (or 31 random bits) first,
    then the lower flat index. The IEEE bits of a float >= 0 keep its order."""
    if selection == "topk":
        high = exp_avg.abs().view(torch.int32).long()
    else:
        high = _random_bits(stream, index, 31)
    return high.bitwise_left_shift_(32).sub_(index)


def topk_support(grad, param, size, weight_decay):
    """The `size` largest |grad + weight_decay * param| (ties to the lower index), sorted."""
    g = grad.reshape(-1).float()
    if weight_decay:
        g = g + weight_decay * param.reshape(-1).float()
    key = _priority(torch.arange(g.numel(), device=g.device), g, "topk", None)
    return torch.topk(key, size, sorted=False).indices.sort().values


# ------------------------------------------------------------------------------------------------
# The per-tensor core (steps 2-5) and its batched twin. Both return S in one canonical order: the
# entries of S in G (in G's order), then the others ascending; and kept_in_support, the positions
# in G of the first ones. With those, _Rows lines S up with G until the next redraw.

def so_update(flat, grad, support, kept, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
              weight_decay, size, moment_selection, stream=0):
    """One SO step of one tensor. flat: the parameter viewed flat (updated in place); support: G,
    sorted; kept, exp_avg, exp_avg_sq: S (any order) and its fp32 moments.
    Returns the new (kept, exp_avg, exp_avg_sq, kept_in_support)."""
    g = _grad_at(flat, grad, support, weight_decay)  # 2. gradient read only at G
    union, where = torch.unique(torch.cat([kept, support]), return_inverse=True)  # 3. U = S u G
    in_kept, in_support = where[: kept.numel()], where[kept.numel():]
    m, v, g_union = (torch.zeros(union.numel(), device=flat.device) for _ in range(3))
    m[in_kept], v[in_kept], g_union[in_support] = exp_avg, exp_avg_sq, g
    _moments(m, v, g_union, beta1, beta2)
    _subtract_at(flat, union, _adam_delta(m, v, lr, beta1, beta2, eps, step))  # 4. all of U
    keep = torch.ones(union.numel(), dtype=torch.bool, device=flat.device)
    if moment_selection != "dense" and union.numel() > size:  # 5. prune to the M most important
        best = torch.topk(_priority(union, m, moment_selection, stream), size, sorted=False).indices
        keep = torch.zeros_like(keep).index_fill_(0, best, True)
    from_support = torch.zeros_like(keep).index_fill_(0, in_support, True)
    order = torch.cat([_where(keep & from_support), _where(keep & ~from_support)])
    return union[order], m[order], v[order], _where(keep[in_support])


def so_update_batched(flats, grads, supports, kepts, exp_avgs, exp_avg_sqs, *, step, lr, beta1,
                      beta2, eps, weight_decay, sizes, moment_selection, streams):
    """so_update for a list of tensors at the same step: the same numbers in a few dozen batched
    ops. Tensors of equal size should be adjacent: the prune is one topk per run.
    Returns lists (kept, exp_avg, exp_avg_sq, kept_in_support).

    The U_i = G_i u O_i of all tensors (O_i = S_i minus G_i) lie back to back as [G_i; O_i]; S is
    matched with G by one sort and one searchsorted. SO.step uses it after a support redraw;
    between redraws _Rows runs the same arithmetic without matching."""
    dev, n = flats[0].device, len(flats)
    G = torch.cat(supports)  # flat indices, local to each tensor
    g = torch.cat([_grad_at(f, gr, s, weight_decay) for f, gr, s in zip(flats, grads, supports)])
    K, mK, vK = torch.cat(kepts), torch.cat(exp_avgs), torch.cat(exp_avg_sqs)
    kept_sizes = [k.numel() for k in kepts]
    # 3. U: where each entry of G (to_G) and of S (to_K) goes; S against G in a flat index space
    # shared by all tensors
    offsets = _starts(f.numel() for f in flats)
    ordered, perm = torch.sort(K + _repeat(offsets, kept_sizes, dev))
    G_flat = G + _repeat(offsets, sizes, dev)
    pos = torch.searchsorted(ordered, G_flat)
    hit = _where(_at(torch.cat([ordered, ordered.new_full((1,), -1)]), pos) == G_flat)
    src = _at(_at(torch.cat([perm, perm.new_zeros(1)]), pos), hit)  # in K, of S n G
    in_G = torch.zeros(K.numel(), dtype=torch.bool, device=dev).index_fill_(0, src, True)
    other = _at(perm, _where(~_at(in_G, perm)))  # O in K, ascending in each tensor
    other_sizes = torch.bincount(_at(_repeat(range(n), kept_sizes, dev), other),
                                 minlength=n).tolist()
    u_sizes = [m + o for m, o in zip(sizes, other_sizes)]
    u_start = _starts(u_sizes)
    to_G = _ranges(u_start, sizes, dev)
    to_K = torch.empty(K.numel(), dtype=torch.int64, device=dev)
    _put(to_K, src, _at(to_G, hit))
    _put(to_K, other, _ranges([u + m for u, m in zip(u_start, sizes)], other_sizes, dev))
    total = sum(u_sizes)
    U = _put(_put(torch.empty(total, dtype=torch.int64, device=dev), to_K, K), to_G, G)
    m = _put(torch.zeros(total, device=dev), to_K, mK)
    v = _put(torch.zeros(total, device=dev), to_K, vK)
    _moments(m, v, _put(torch.zeros(total, device=dev), to_G, g), beta1, beta2)
    # 4. update every entry of U
    delta = _adam_delta(m, v, lr, beta1, beta2, eps, step)
    for f, index, d in zip(flats, U.split(u_sizes), delta.split(u_sizes)):
        _subtract_at(f, index, d)
    # 5. prune: keep the M_i best entries of each U_i
    if moment_selection == "dense":
        new_sizes, keep = u_sizes, torch.arange(total, device=dev)
    else:
        stream = _repeat(streams, u_sizes, dev) if moment_selection == "random" else None
        keep = _where(_prune(_priority(U, m, moment_selection, stream), sizes, u_sizes))
        new_sizes = sizes
    # S_i in canonical order is U_i's order: its entries in G_i first, then the others ascending
    local = keep - _repeat(u_start, new_sizes, dev)
    in_G = (local < _repeat(sizes, new_sizes, dev)).long().cumsum_(0)
    ends = torch.tensor(list(accumulate(new_sizes)), device=dev) - 1
    new_in_G = torch.diff(_at(in_G, ends), prepend=in_G.new_zeros(1)).tolist()  # the host sync
    positions = _at(local, _ranges(_starts(new_sizes), new_in_G, dev))
    return (*(_at(x, keep).split(new_sizes) for x in (U, m, v)), positions.split(new_in_G))


def _prune(keys, sizes, u_sizes):
    """Mask of the sizes[i] largest keys in each tensor's run of u_sizes[i] keys, the runs laid
    out as _blocks rows padded with the smallest int64."""
    dev = keys.device
    blocks, starts, padded = _blocks(sizes, u_sizes)
    slot = _ranges(starts, u_sizes, dev)
    keys = _put(torch.full((sum(padded),), torch.iinfo(torch.int64).min, device=dev), slot, keys)
    chosen = _choose(keys, blocks, torch.zeros(sum(padded), dtype=torch.bool, device=dev), True)
    return _at(chosen, slot)


def _blocks(sizes, widths):
    """Tensors of equal size (adjacent) as the rows of one block, padded to its widest row, so
    that the prune is one topk per block. Returns the blocks [(start, rows, width, size)], and
    each tensor's row start and padded width."""
    blocks, starts, padded, total, i = [], [], [], 0, 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        width = max(widths[i:j])
        blocks.append((total, j - i, width, sizes[i]))
        starts += [total + r * width for r in range(j - i)]
        padded += [width] * (j - i)
        total, i = total + (j - i) * width, j
    return blocks, starts, padded


def _choose(keys, blocks, chosen, value):
    """Set `chosen` to `value` at the `size` largest keys of each row of each block."""
    for start, rows, width, size in blocks:
        block = slice(start, start + rows * width)
        if width > size:
            best = torch.topk(keys[block].view(rows, width), size, dim=1, sorted=False).indices
            chosen[block].view(rows, width).scatter_(1, best, value)
        else:  # nothing outside G: keep all
            chosen[block] = value
    return chosen


# ------------------------------------------------------------------------------------------------
# Between redraws.

class _Rows:
    """Steps 2-5 of a batch of tensors between support redraws, on buffers of fixed shape.

    Until G_i is redrawn, U_i = G_i u O_i with O_i = S_i minus G_i, and O_i can only lose
    entries. So after a redraw each tensor gets a row [G_i; O_i] that holds U_i for every step
    until the next one: entries of G_i outside S_i carry m = v = 0; entries of O_i pruned since
    are dead (m = v = 0, update 0, never candidates). Rows are laid out as in _prune (_blocks),
    padded with dead slots. A step is then a fixed
    sequence of ops: nothing is sorted or matched, and the only data-dependent shape is the final
    compaction of S, which waits until the state is read (`write_out`). Same numbers as
    so_update_batched. Built from its outputs (`update`), used while `fits` holds: the SO state
    still holds the tensors this batch wrote."""

    def __init__(self, states, supports, kepts, exp_avgs, exp_avg_sqs, kept_in_supports, sizes,
                 step):
        dev = supports[0].device
        in_G = [p.numel() for p in kept_in_supports]
        kept_sizes = [k.numel() for k in kepts]
        widths = [m + k - c for m, k, c in zip(sizes, kept_sizes, in_G)]
        self.blocks, starts, padded = _blocks(sizes, widths)
        total = sum(padded)
        self.padded, self.sizes, self.widths, self.step = padded, sizes, widths, step
        self.states, self.supports, self.kepts, self.pending = states, supports, kepts, False
        self.at_G = _ranges(starts, sizes, dev)
        # S_i = [G_i[kept_in_support_i]; O_i]: where each entry of S goes
        to_K = _ranges([s + m - c for s, m, c in zip(starts, sizes, in_G)], kept_sizes, dev)
        _put(to_K, _ranges(_starts(kept_sizes), in_G, dev),
             torch.cat(kept_in_supports) + _repeat(starts, in_G, dev))
        self.index = _put(torch.zeros(total, dtype=torch.int64, device=dev), to_K,
                          torch.cat(kepts))
        _put(self.index, self.at_G, torch.cat(supports))
        self.m = _put(torch.zeros(total, device=dev), to_K, torch.cat(exp_avgs))
        self.v = _put(torch.zeros(total, device=dev), to_K, torch.cat(exp_avg_sqs))
        # 1.0 at the slots outside G, and at the dead ones (masks as floats: multiplying by them
        # is 30x faster than masked_fill_ on CPU)
        self.outside_G = torch.ones(total, device=dev).index_fill_(0, self.at_G, 0.0)
        self.dead = self.outside_G.index_fill(0, to_K, 0.0)
        # the gradient at G (zero elsewhere) and the update, with views per tensor made once
        self.g, self.delta = torch.zeros(total, device=dev), torch.empty(total, device=dev)
        self.g_rows = [self.g[s:s + m] for s, m in zip(starts, sizes)]
        self.slots = [(self.index[s:s + w], self.delta[s:s + w]) for s, w in zip(starts, widths)]

    @classmethod
    def update(cls, states, flats, grads, *, sizes, step, **hyper):
        """so_update_batched on the tensors whose SO states are `states` (dicts, written in
        place), and the rows for their steps until the next redraw."""
        cols = [[s[k] for s in states] for k in ("support",) + _MOMENT_STATE]
        out = so_update_batched(flats, grads, *cols, sizes=sizes, step=step, **hyper)
        _write(states, out[:3])
        return cls(states, cols[0], *out, sizes, step)

    def fits(self, states, sizes, step):
        return (step == self.step + 1 and sizes == self.sizes and len(states) == len(self.kepts)
                and all(s["kept"] is k and s["support"] is g
                        for s, k, g in zip(states, self.kepts, self.supports)))

    def bytes(self):
        buffers = [self.index, self.m, self.v, self.outside_G, self.dead, self.g, self.delta,
                   self.at_G] + ([self.keep] if self.pending else [])
        return sum(x.numel() * x.element_size() for x in buffers)

    def _keys(self, moment_selection, streams):
        """Prune priorities; below every live key (> -2**32) at the dead slots."""
        dead = self.dead.long().bitwise_left_shift_(62)
        if moment_selection == "topk":  # m = 0 at the dead slots: their keys are -index
            return _priority(self.index, self.m, "topk", None).sub_(dead)
        stream = _repeat(streams, self.padded, self.m.device)
        keys = _priority(self.index, self.m, "random", stream)
        return keys.masked_fill_(dead.bool(), torch.iinfo(torch.int64).min)

    def __call__(self, flats, grads, *, step, lr, beta1, beta2, eps, weight_decay,
                 moment_selection, streams):
        """One step; the states are written out when read (write_out)."""
        if not weight_decay and all(isinstance(gr, _Read) for gr in grads):  # one op, not one a tensor
            _put(self.g, self.at_G, torch.cat([gr.values for gr in grads]))
        else:
            for f, gr, s, out in zip(flats, grads, self.supports, self.g_rows):
                _grad_at(f, gr, s, weight_decay, out=out)
        _moments(self.m, self.v, self.g, beta1, beta2)  # g: 0 outside G's slots
        _adam_delta(self.m, self.v, lr, beta1, beta2, eps, step, dead=self.dead, out=self.delta)
        for f, (index, delta) in zip(flats, self.slots):
            _subtract_at(f, index, delta)
        if moment_selection == "dense":
            self.keep, self.counts = 1 - self.dead, self.widths
        else:
            keep = _choose(self._keys(moment_selection, streams), self.blocks,
                           torch.zeros_like(self.dead), 1.0)
            self.m.mul_(keep)  # m = v = 0 outside S (-0.0 for some: the same numbers)
            self.v.mul_(keep)
            self.dead = torch.sub(self.outside_G, keep).clamp_(min=0)
            self.keep, self.counts = keep, self.sizes
        self.step, self.pending = step, True

    def write_out(self):
        """Write S and its moments of the last step into the states, in canonical order."""
        at = _where(self.keep.bool())  # row order: G's entries (ascending), then O's
        out = [_at(x, at).split(self.counts) for x in (self.index, self.m, self.v)]
        _write(self.states, out)
        self.kepts, self.pending = out[0], False


_MOMENT_STATE = ("kept", "exp_avg", "exp_avg_sq")


def _write(states, columns):
    for state, values in zip(states, zip(*columns)):
        state.update(zip(_MOMENT_STATE, values))
