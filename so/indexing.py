"""Index helpers on flat int64 tensors, shared by the support draws and the update cores."""
from itertools import accumulate

import torch

_MASK64 = (1 << 64) - 1


def _signed(x):
    """The int64 with the bits of the unsigned 64-bit int x."""
    return x - (1 << 64) if x >= 1 << 63 else x


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
