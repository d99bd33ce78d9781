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

Code: `so_update` is the per-tensor core and reads like the rule; `so_update_batched` runs steps
2-5 for all tensors of a group in a few dozen batched ops and gives the same numbers, and `_Rows`
does the same between redraws without matching indices (SO.step uses those two; so_update is
the reference the tests hold them to, and a functional form of the rule). Random draws come from
a counter-based hash keyed by (parameter, step, index), so they do not depend on batching or on
the order in which backward hooks fire; torch's generators are sequential streams, which would.
Written by hand because no library implements this optimizer.
"""
import math
import warnings
from itertools import accumulate, chain

import torch
from torch.optim import Optimizer

__all__ = ["SO", "so_update", "so_update_batched", "step_in_backward"]

GRAD_SELECTIONS = ("random", "topk")
MOMENT_SELECTIONS = ("topk", "random", "dense")
SUPPORTS = ("dynamic", "static")

# ------------------------------------------------------------------------------------------------
# Counter-based randomness: SplitMix64 (Steele et al. 2014) on Python ints and on int64 tensors.

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SUPPORT_DRAW, _MOMENT_DRAW = 1, 2


def _signed(x):
    """The int64 with the bits of the unsigned 64-bit int x."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64(x):
    """SplitMix64 finalizer on a Python int; returns an unsigned 64-bit int."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _shr(z, s):
    """Logical right shift of the bits of an int64 tensor."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def _mix64_tensor(z):
    """_mix64 on the bits of an int64 tensor, in place (int64 arithmetic wraps like uint64)."""
    z.bitwise_xor_(_shr(z, 30)).mul_(_signed(_MIX1))
    z.bitwise_xor_(_shr(z, 27)).mul_(_signed(_MIX2))
    return z.bitwise_xor_(_shr(z, 31))


def _stream(seed, step, purpose):
    """Key (int64) of the random stream of one parameter at one step."""
    return _signed(_mix64(_mix64(seed ^ purpose) + step))


def _random_bits(stream, counter, bits):
    """Uniform `bits`-bit ints >= 0: the counter-th outputs of the SplitMix64 streams `stream`."""
    return _shr(_mix64_tensor((counter + 1).mul_(_signed(_GAMMA)).add_(stream)), 64 - bits)


def _first_distinct(numels, counts, streams, device):
    """For each tensor i, the first counts[i] distinct values of r_j = bits_j % numels[i],
    j = 0, 1, ... of its stream: a uniform draw without replacement, sorted. O(counts) work."""
    out = [torch.empty(0, dtype=torch.int64, device=device) for _ in numels]
    todo = [i for i in range(len(numels)) if counts[i] > 0]
    draws = {i: counts[i] + 2 * -(-counts[i] ** 2 // numels[i]) + 16 for i in todo}
    while todo:  # a tensor whose draws held too few distinct values goes again with twice as many
        k, c = len(todo), [draws[i] for i in todo]
        seg = _repeat(range(k), c, device)
        offsets = _starts(numels[i] for i in todo)
        value = _random_bits(_repeat([streams[i] for i in todo], c, device),
                             _ranges([0] * k, c, device), 63)
        value.remainder_(_repeat([numels[i] for i in todo], c, device))
        value += _repeat(offsets, c, device)  # tensors in disjoint ranges
        ordered, order = torch.sort(value, stable=True)  # equal values keep their draw order
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        new = torch.empty_like(first).scatter_(0, order, first)  # first occurrences, draw order
        rank = torch.cumsum(new, 0)
        before = torch.cat([rank.new_zeros(1), rank[:-1]])
        rank -= _at(before, torch.tensor(_starts(c), device=device))[seg]  # rank in its tensor
        take = new & (rank <= _repeat([counts[i] for i in todo], c, device))
        taken = ordered[_at(take, order)]  # sorted, tensor by tensor
        got = torch.zeros(k, dtype=torch.int64, device=device).index_add_(0, seg, take.long())
        got = got.tolist()
        for i, part, offset, n in zip(todo, taken.split(got), offsets, got):
            if n == counts[i]:
                out[i] = part - offset
        todo = [i for i, n in zip(todo, got) if n < counts[i]]
        for i in todo:
            draws[i] *= 2
    return out


def random_supports(numels, sizes, streams, device):
    """Uniform supports: sizes[i] distinct sorted flat indices of a tensor of numels[i] entries.
    When more than half the entries are wanted, the complement is drawn instead."""
    complement = [2 * m > n for n, m in zip(numels, sizes)]
    counts = [n - m if c else m for n, m, c in zip(numels, sizes, complement)]
    out = []
    for n, c, index in zip(numels, complement, _first_distinct(numels, counts, streams, device)):
        if c:
            keep = torch.ones(n, dtype=torch.bool, device=device)
            keep[index] = False
            index = _where(keep)
        out.append(index)
    return out


def topk_support(grad, param, size, weight_decay):
    """The `size` largest |grad + weight_decay * param| (ties to the lower index), sorted."""
    g = grad.reshape(-1).float()
    if weight_decay:
        g = g + weight_decay * param.reshape(-1).float()
    key = _priority(torch.arange(g.numel(), device=g.device), g, "topk", None)
    return torch.topk(key, size, sorted=False).indices.sort().values


# ------------------------------------------------------------------------------------------------
# Index helpers.

def _at(x, index):
    return x.index_select(0, index)


def _put(out, index, src):
    """out[index] = src for unique indices, in place (scatter_: index_copy_ is 4x slower on CPU)."""
    return out.scatter_(0, index, src)


def _where(mask):
    return mask.nonzero().squeeze(1)


def _starts(lengths):
    return list(accumulate(lengths, initial=0))[:-1]


def _repeat(values, lengths, device):
    """Each values[i] repeated lengths[i] times, as a cumsum of jumps (torch.repeat_interleave
    opens a thread pool even for a handful of entries: slow when other processes hold the cores)."""
    at, jumps, previous, position = [], [], 0, 0
    for value, length in zip(values, lengths):
        if length:
            at.append(position)
            jumps.append(_signed((value - previous) & _MASK64))  # the int64 cumsum wraps back
            previous, position = value, position + length
    out = torch.zeros(position, dtype=torch.int64, device=device)
    out[torch.tensor(at, dtype=torch.int64, device=device)] = torch.tensor(
        jumps, dtype=torch.int64, device=device)
    return out.cumsum_(0)


def _ranges(starts, lengths, device):
    """cat(arange(s, s + l) for s, l in zip(starts, lengths))."""
    shift = [s - c for s, c in zip(starts, _starts(lengths))]
    return _repeat(shift, lengths, device).add_(torch.arange(sum(lengths), device=device))


# ------------------------------------------------------------------------------------------------
# Arithmetic shared by every path.

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
    """Mask of the sizes[i] largest keys in each tensor's run of u_sizes[i] keys. Tensors of equal
    size are rows of one topk, padded with the smallest int64."""
    dev = keys.device
    row_start, blocks, total, i = [], [], 0, 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        width = max(u_sizes[i:j])
        row_start += [total + r * width for r in range(j - i)]
        blocks.append((total, j - i, width, sizes[i]))
        total, i = total + (j - i) * width, j
    slot = _ranges(row_start, u_sizes, dev)
    padded = torch.full((total,), torch.iinfo(torch.int64).min, device=dev)
    _put(padded, slot, keys)
    chosen = torch.zeros(total, dtype=torch.bool, device=dev)
    for start, rows, width, size in blocks:
        block = slice(start, start + rows * width)
        if width > size:
            best = torch.topk(padded[block].view(rows, width), size, dim=1, sorted=False).indices
            chosen[block].view(rows, width).scatter_(1, best, True)
        else:  # nothing outside G: keep all
            chosen[block] = True
    return _at(chosen, slot)


# ------------------------------------------------------------------------------------------------
# Between redraws.

class _Rows:
    """Steps 2-5 of a batch of tensors between support redraws, on buffers of fixed shape.

    Until G_i is redrawn, U_i = G_i u O_i with O_i = S_i minus G_i, and O_i can only lose
    entries. So after a redraw each tensor gets a row [G_i; O_i] that holds U_i for every step
    until the next one: entries of G_i outside S_i carry m = v = 0; entries of O_i pruned since
    are dead (m = v = 0, update 0, never candidates). Rows of tensors with equal M share one width
    (padded with dead slots) so that the prune is one topk per width. A step is then a fixed
    sequence of ops: nothing is sorted or matched, and the only data-dependent shape is the final
    compaction of S, which waits until the state is read (`write_out`). Same numbers as
    so_update_batched. Built from its outputs (`update`), used while `fits` holds: the SO state
    still holds the tensors this batch wrote."""

    def __init__(self, states, supports, kepts, exp_avgs, exp_avg_sqs, kept_in_supports, sizes,
                 step):
        dev, n = supports[0].device, len(supports)
        in_G = [p.numel() for p in kept_in_supports]
        kept_sizes = [k.numel() for k in kepts]
        widths = [m + k - c for m, k, c in zip(sizes, kept_sizes, in_G)]
        padded, self.blocks, total, i = [], [], 0, 0  # blocks: (start, rows, width, size)
        while i < n:
            j = i
            while j < n and sizes[j] == sizes[i]:
                j += 1
            width = max(widths[i:j])
            self.blocks.append((total, j - i, width, sizes[i]))
            padded += [width] * (j - i)
            total, i = total + (j - i) * width, j
        starts = _starts(padded)
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
        for f, gr, s, out in zip(flats, grads, self.supports, self.g_rows):
            _grad_at(f, gr, s, weight_decay, out=out)
        _moments(self.m, self.v, self.g, beta1, beta2)  # g: 0 outside G's slots
        _adam_delta(self.m, self.v, lr, beta1, beta2, eps, step, dead=self.dead, out=self.delta)
        for f, (index, delta) in zip(flats, self.slots):
            _subtract_at(f, index, delta)
        if moment_selection == "dense":
            self.keep, self.counts = 1 - self.dead, self.widths
        else:
            keys = self._keys(moment_selection, streams)
            keep = torch.zeros_like(self.dead)
            for start, rows, width, size in self.blocks:
                block = slice(start, start + rows * width)
                if width > size:
                    best = torch.topk(keys[block].view(rows, width), size, dim=1,
                                      sorted=False).indices
                    keep[block].view(rows, width).scatter_(1, best, 1.0)
                else:  # nothing outside G: keep all
                    keep[block] = 1.0
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

    def __setstate__(self, state):  # Optimizer.load_state_dict and unpickling come through here
        state = dict(state)
        if "state" in state:
            self._state = state.pop("state")
        self.__dict__.setdefault("_rows", {})
        self.__dict__.setdefault("_read", {})
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

    @torch.no_grad()
    def read_grad(self, param):
        """step_in_backward's hook: read the gradient of `param` at its support (drawn now when
        due) and free it; step() applies it, adding up the reads of several backward passes. A
        dense group's gradient stays until step(): Adam needs all of it; so does a topk support's
        at a redraw, which needs the whole gradient of the step."""
        if param.grad is None:
            return
        group = next((g for g in self.param_groups if any(p is param for p in g["params"])), None)
        if group is None:
            raise ValueError("SO.read_grad: the parameter is not in this optimizer")
        if group["dense"]:
            return
        _check_grad(param)
        (state,) = self._states(group, [param])
        if param not in self._read:
            if _due(group, state["step"] + 1):
                if group["grad_selection"] == "topk":
                    return
                self._draw(group, [param], [state], [state["step"] + 1])
        values = _grad_at(param.view(-1), param.grad, state["support"], 0.0)  # a new tensor
        if param in self._read:
            self._read[param].values += values
        else:
            self._read[param] = _Read(values)
        param.grad = None

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
        drawn = [i for i in due if not isinstance(grads[i], _Read)]  # the others drew in backward
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
        self._rows, self._read = {}, {}  # they belong to the state being replaced
        super().load_state_dict(state_dict)
        for pid, saved in state_dict["state"].items():
            param = by_id[pid]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self.state[param][key] = value.to(device=param.device, copy=True)
        self.seed = int(state_dict.get("seed", self.seed))


class _Read:
    """A gradient read at the support in backward (step_in_backward): fp32, weight decay not
    added yet (it is added at the step, once, as for a dense gradient)."""

    def __init__(self, values):
        self.values = values


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
    loop (several backward passes before a step add up, as gradients do). Dense groups keep their
    gradients until the step. Returns a handle with .remove()."""
    if not isinstance(optimizer, SO):
        raise TypeError(f"step_in_backward needs an SO optimizer, got {type(optimizer).__name__}")
    if isinstance(model_or_params, torch.nn.Module):
        model_or_params = model_or_params.parameters()
    wanted = {id(p) for p in model_or_params}
    return _Handles([p.register_post_accumulate_grad_hook(optimizer.read_grad)
                     for g in optimizer.param_groups for p in g["params"]
                     if p.requires_grad and id(p) in wanted])
