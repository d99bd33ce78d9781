"""The random draws of SO: SplitMix64 (Steele et al. 2014) on Python ints and on int64 tensors,
keyed by (parameter, step, index), and uniform supports drawn without replacement in O(M) work."""
import torch

from so.indexing import _MASK64, _at, _ranges, _repeat, _signed, _starts, _where

_GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SUPPORT_DRAW, _MOMENT_DRAW = 1, 2


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
        rank -= _at(_at(before, torch.tensor(_starts(c), device=device)), seg)  # in its tensor
        take = new & (rank <= _repeat([counts[i] for i in todo], c, device))
        taken = _at(ordered, _where(_at(take, order)))  # sorted, tensor by tensor
        got = torch.zeros(k, dtype=torch.int64, device=device).index_add_(0, seg, take.long())
        got = got.tolist()
        taken -= _repeat(offsets, got, device)
        for i, part, n in zip(todo, taken.split(got), got):
            if n == counts[i]:
                out[i] = part
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
