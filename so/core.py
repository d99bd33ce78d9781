"""Steps 2-5 of the rule: the per-tensor core (so_update), and the batched step on fixed-shape
rows that SO.step runs (_Rows). Both give the same numbers."""
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
# The per-tensor core (steps 2-5). It returns S in one canonical order: the entries of S in G (in
# G's order), then the others ascending.

def so_update(flat, grad, support, kept, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
              weight_decay, size, moment_selection, stream=0):
    """One SO step of one tensor. flat: the parameter viewed flat (updated in place); support: G,
    sorted; kept, exp_avg, exp_avg_sq: S (any order) and its fp32 moments.
    Returns the new (kept, exp_avg, exp_avg_sq)."""
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
    return union[order], m[order], v[order]


def _match(kept, support, kept_sizes, sizes, numels):
    """The entries of each tensor's S that are in its G: their positions in `kept` and in
    `support` (both all tensors back to back; S in any order, G sorted). A bucket table of G
    filters S first, so that only a few percent of it is looked up by binary search."""
    dev = kept.device
    offsets = _starts(numels)  # one flat index space for all tensors: G is sorted in it
    G = support + _repeat(offsets, sizes, dev)
    S = kept + _repeat(offsets, kept_sizes, dev)
    shift = max(0, (sum(numels) - 1).bit_length() - (32 * G.numel()).bit_length())
    table = torch.zeros(((sum(numels) - 1) >> shift) + 1, dtype=torch.bool, device=dev)
    table.index_fill_(0, G >> shift, True)  # about 3% of the buckets hold an entry of G
    maybe = _where(_at(table, S >> shift))
    query = _at(S, maybe)
    pos = torch.searchsorted(G, query).clamp_(max=G.numel() - 1)
    hit = _where(_at(G, pos) == query)
    return _at(maybe, hit), _at(pos, hit)


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
# The batched step.

class _Rows:
    """Steps 2-5 of a batch of tensors (equal sizes adjacent), in a few dozen batched ops on
    buffers of fixed shape. Same numbers as so_update.

    Until G_i is redrawn, U_i = G_i u O_i with O_i = S_i minus G_i, and O_i can only lose
    entries. So each tensor gets a row [G_i; O_i], built when G_i is drawn, that holds U_i for
    every step until the next draw: entries of G_i outside S_i carry m = v = 0; entries of O_i
    pruned since are dead (m = v = 0, update 0, never candidates). Rows are laid out as _blocks,
    padded with dead slots. A step is then a fixed sequence of ops: nothing is sorted or matched,
    and the only data-dependent shape is the compaction of S, which waits until the state is read
    (`write_out`) or G is redrawn (`kept`). Used while `fits` holds: the SO state still holds the
    tensors this batch wrote."""

    def __init__(self, states, numels, sizes, kept, exp_avg, exp_avg_sq, kept_sizes):
        """Rows for the tensors whose SO states are `states` (dicts, written by write_out): G from
        state["support"]; S and its moments (kept, exp_avg, exp_avg_sq: all tensors back to back,
        kept_sizes entries each, in any order) from the state or from the previous rows."""
        dev = kept.device
        self.states, self.sizes, self.step, self.pending = states, sizes, None, False
        self.supports = [s["support"] for s in states]
        self.kepts = [s["kept"] for s in states]  # what the states hold: see fits
        support = torch.cat(self.supports)
        in_G, at_G = _match(kept, support, kept_sizes, sizes, numels)  # S n G
        tensor = torch.searchsorted(torch.tensor(list(accumulate(kept_sizes)), device=dev), in_G,
                                    right=True)
        hits = torch.bincount(tensor, minlength=len(sizes)).tolist()
        other_sizes = [k - h for k, h in zip(kept_sizes, hits)]
        self.widths = [m + o for m, o in zip(sizes, other_sizes)]
        self.blocks, starts, self.padded = _blocks(sizes, self.widths)
        total = sum(self.padded)
        self.at_G = _ranges(starts, sizes, dev)
        at_O = _ranges([s + m for s, m in zip(starts, sizes)], other_sizes, dev)
        # O_i ascending (as write_out hands it out): one sort in the flat space of _match
        other = _where(torch.ones(kept.numel(), dtype=torch.bool, device=dev)
                       .index_fill_(0, in_G, False))
        flat = _at(kept, other) + _repeat(_starts(numels), other_sizes, dev)
        other = _at(other, torch.sort(flat).indices)
        self.index = _put(_put(torch.zeros(total, dtype=torch.int64, device=dev), self.at_G,
                               support), at_O, _at(kept, other))
        to_G = _at(self.at_G, at_G)
        self.m, self.v = (_put(_put(torch.zeros(total, device=dev), at_O, _at(x, other)), to_G,
                               _at(x, in_G)) for x in (exp_avg, exp_avg_sq))
        # 1.0 at the slots outside G, and at the dead ones (masks as floats: multiplying by them
        # is 30x faster than masked_fill_ on CPU)
        self.outside_G = torch.ones(total, device=dev).index_fill_(0, self.at_G, 0.0)
        self.dead = self.outside_G.index_fill(0, at_O, 0.0)
        # the gradient at G (zero elsewhere) and the update, with views per tensor made once
        self.g, self.delta = torch.zeros(total, device=dev), torch.empty(total, device=dev)
        self.g_rows = [self.g[s:s + m] for s, m in zip(starts, sizes)]
        self.slots = [(self.index[s:s + w], self.delta[s:s + w])
                      for s, w in zip(starts, self.widths)]

    @staticmethod
    def kept_of(states):
        """S and its moments as __init__ takes them, from the states."""
        columns = [torch.cat([s[k] for s in states]) for k in _MOMENT_STATE]
        return (*columns, [s["kept"].numel() for s in states])

    def kept(self):
        """S and its moments after the last step as __init__ takes them, in row order: each
        tensor's entries in G (ascending), then the others (ascending)."""
        at = _where(self.keep.bool())
        return (*(_at(x, at) for x in (self.index, self.m, self.v)), self.counts)

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
        *columns, counts = self.kept()
        out = [x.split(counts) for x in columns]
        _write(self.states, out)
        self.kepts, self.pending = out[0], False


_MOMENT_STATE = ("kept", "exp_avg", "exp_avg_sq")


def _write(states, columns):
    for state, values in zip(states, zip(*columns)):
        state.update(zip(_MOMENT_STATE, values))
