"""Index arithmetic on flat int64 tensors, shared by the support draws and the batched step."""
from itertools import accumulate

import torch

MASK64 = (1 << 64) - 1


def as_int64(x):
    """The int64 with the bits of the unsigned 64-bit int x."""
    return x - (1 << 64) if x >= 1 << 63 else x


def gather(x, index):
    return x.index_select(0, index)


def scatter(out, index, src):
    """out[index] = src for unique indices, in place (scatter_: index_copy_ is 4x slower on CPU)."""
    return out.scatter_(0, index, src)


def positions(mask):
    """The indices where a 1-D mask is true."""
    return mask.nonzero().squeeze(1)


def run_starts(lengths):
    """Where each run starts when runs of these lengths lie back to back."""
    return list(accumulate(lengths, initial=0))[:-1]


def repeat_each(values, lengths, device):
    """Each values[i] repeated lengths[i] times, as a cumsum of jumps (torch.repeat_interleave
    opens a thread pool even for a handful of entries: slow when other processes hold the cores)."""
    at, jumps, previous, position = [], [], 0, 0
    for value, length in zip(values, lengths):
        if length:
            at.append(position)
            jumps.append(as_int64((value - previous) & MASK64))  # the int64 cumsum wraps back
            previous, position = value, position + length
    out = torch.zeros(position, dtype=torch.int64, device=device)
    out[torch.tensor(at, dtype=torch.int64, device=device)] = torch.tensor(
        jumps, dtype=torch.int64, device=device)
    return out.cumsum_(0)


def concat_aranges(starts, lengths, device):
    """cat(arange(s, s + l) for s, l in zip(starts, lengths))."""
    shift = [s - c for s, c in zip(starts, run_starts(lengths))]
    return repeat_each(shift, lengths, device).add_(torch.arange(sum(lengths), device=device))
