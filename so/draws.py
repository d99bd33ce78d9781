"""The random draws of SO: SplitMix64 (Steele et al. 2014) on Python ints and on int64 tensors,
keyed by (parameter, step, index), and uniform supports drawn without replacement in O(M) work.

Keyed draws do not depend on batching or on the order in which backward hooks fire; torch's
generators are sequential streams, which would. Written by hand: no library offers keyed draws.
"""
import torch

from so.flat_index import (MASK64, as_int64, concat_aranges, gather, positions, repeat_each,
                           run_starts)

GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
SUPPORT_DRAW, MOMENT_DRAW = 1, 2  # what a stream is for: the gradient support, the moment prune


def splitmix64(x):
    """SplitMix64's finalizer on a Python int; returns an unsigned 64-bit int."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & MASK64
    return x ^ (x >> 31)


def param_seed(optimizer_seed, position):
    """The seed of the parameter at this position among all the optimizer's parameters."""
    return splitmix64(optimizer_seed + (position + 1) * GOLDEN_GAMMA)


def stream_key(seed, step, purpose):
    """Key (int64) of the random stream of one parameter at one step, for one purpose."""
    return as_int64(splitmix64(splitmix64(seed ^ purpose) + step))


def _shift_right(z, s):
    """Logical right shift of the bits of an int64 tensor."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def splitmix64_(z):
    """splitmix64 on the bits of an int64 tensor, in place (int64 arithmetic wraps like uint64)."""
    z.bitwise_xor_(_shift_right(z, 30)).mul_(as_int64(_MIX1))
    z.bitwise_xor_(_shift_right(z, 27)).mul_(as_int64(_MIX2))
    return z.bitwise_xor_(_shift_right(z, 31))


def random_bits(stream, counter, bits):
    """Uniform `bits`-bit ints >= 0: the counter-th outputs of the SplitMix64 streams `stream`."""
    z = (counter + 1).mul_(as_int64(GOLDEN_GAMMA)).add_(stream)
    return _shift_right(splitmix64_(z), 64 - bits)


def first_distinct(numels, counts, streams, device):
    """For each tensor i, the first counts[i] distinct values of r_j = bits_j % numels[i],
    j = 0, 1, ... of its stream: a uniform draw without replacement, sorted. O(counts) work."""
    out = [torch.empty(0, dtype=torch.int64, device=device) for _ in numels]
    todo = [i for i in range(len(numels)) if counts[i] > 0]
    draws = {i: counts[i] + 2 * -(-counts[i] ** 2 // numels[i]) + 16 for i in todo}
    while todo:  # a tensor whose draws held too few distinct values goes again with twice as many
        k, c = len(todo), [draws[i] for i in todo]
        tensor_of = repeat_each(range(k), c, device)
        offsets = run_starts(numels[i] for i in todo)
        value = random_bits(repeat_each([streams[i] for i in todo], c, device),
                            concat_aranges([0] * k, c, device), 63)
        value.remainder_(repeat_each([numels[i] for i in todo], c, device))
        value += repeat_each(offsets, c, device)  # tensors in disjoint ranges
        ordered, order = torch.sort(value, stable=True)  # equal values keep their draw order
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        new = torch.empty_like(first).scatter_(0, order, first)  # first occurrences, draw order
        rank = torch.cumsum(new, 0)
        before = torch.cat([rank.new_zeros(1), rank[:-1]])
        rank -= gather(gather(before, torch.tensor(run_starts(c), device=device)), tensor_of)
        take = new & (rank <= repeat_each([counts[i] for i in todo], c, device))
        taken = gather(ordered, positions(gather(take, order)))  # sorted, tensor by tensor
        got = torch.zeros(k, dtype=torch.int64, device=device).index_add_(0, tensor_of,
                                                                          take.long())
        got = got.tolist()
        taken -= repeat_each(offsets, got, device)
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
    for n, c, index in zip(numels, complement, first_distinct(numels, counts, streams, device)):
        if c:
            keep = torch.ones(n, dtype=torch.bool, device=device)
            keep[index] = False
            index = positions(keep)
        out.append(index)
    return out
