"""The fast path of the SO rule, SO(impl="batched") (the default): steps 2-5 of every tensor of a
batch in a few dozen batched ops, with the numbers of so.rule.so_update, bit for bit.

- `batched_update`: the step at a support redraw. The U_i = G_i u O_i of all tensors (O_i = S_i
  minus G_i) lie back to back as [G_i; O_i]; S is matched with G by one sort and a searchsorted.
- `BatchedState`: the steps until the next redraw. G_i stays and O_i can only lose entries, so
  each tensor's row [G_i; O_i] holds U_i for all of them: a step is a fixed sequence of ops on
  fixed-shape buffers, with no sort, no matching and no host sync.
"""
from itertools import accumulate

import torch

from so.flat_index import (concat_aranges, gather, positions, repeat_each, run_starts,
                           scatter)
from so.rule import PRUNES, adam_delta, adam_moments, grad_at, GradAtSupport, subtract_at

INT64_MIN = torch.iinfo(torch.int64).min
MOMENT_STATE = ("kept", "exp_avg", "exp_avg_sq")


def batched_update(flats, grads, supports, kepts, exp_avgs, exp_avg_sqs, *, step, lr, beta1,
                   beta2, eps, weight_decay, sizes, moment_selection, streams):
    """so_update of a list of tensors at the same step. Tensors of equal size should be adjacent:
    the prune is one topk per run of them. Returns lists (kept, exp_avg, exp_avg_sq,
    kept_in_support), as so_update returns them per tensor."""
    dev, n = flats[0].device, len(flats)
    G = torch.cat(supports)  # flat indices, local to each tensor
    g = torch.cat([grad_at(f, gr, s, weight_decay) for f, gr, s in zip(flats, grads, supports)])
    S, m_S, v_S = torch.cat(kepts), torch.cat(exp_avgs), torch.cat(exp_avg_sqs)
    kept_sizes = [k.numel() for k in kepts]
    # 3. U: where each entry of G (to_G) and of S (to_S) goes, matched in one flat index space
    # shared by all tensors
    offsets = run_starts(f.numel() for f in flats)
    ordered, perm = torch.sort(S + repeat_each(offsets, kept_sizes, dev))
    G_global = G + repeat_each(offsets, sizes, dev)
    pos = torch.searchsorted(ordered, G_global)
    hit = positions(gather(torch.cat([ordered, ordered.new_full((1,), -1)]), pos) == G_global)
    S_in_G = gather(gather(torch.cat([perm, perm.new_zeros(1)]), pos), hit)  # positions in S
    is_in_G = torch.zeros(S.numel(), dtype=torch.bool, device=dev).index_fill_(0, S_in_G, True)
    others = gather(perm, positions(~gather(is_in_G, perm)))  # O, ascending in each tensor
    other_sizes = torch.bincount(gather(repeat_each(range(n), kept_sizes, dev), others),
                                 minlength=n).tolist()
    u_sizes = [m + o for m, o in zip(sizes, other_sizes)]
    u_start = run_starts(u_sizes)
    to_G = concat_aranges(u_start, sizes, dev)
    to_S = torch.empty(S.numel(), dtype=torch.int64, device=dev)
    scatter(to_S, S_in_G, gather(to_G, hit))
    scatter(to_S, others, concat_aranges([u + m for u, m in zip(u_start, sizes)], other_sizes,
                                         dev))
    total = sum(u_sizes)
    U = scatter(scatter(torch.empty(total, dtype=torch.int64, device=dev), to_S, S), to_G, G)
    m = scatter(torch.zeros(total, device=dev), to_S, m_S)
    v = scatter(torch.zeros(total, device=dev), to_S, v_S)
    adam_moments(m, v, scatter(torch.zeros(total, device=dev), to_G, g), beta1, beta2)
    # 4. update every entry of U
    delta = adam_delta(m, v, lr, beta1, beta2, eps, step)
    for f, index, d in zip(flats, U.split(u_sizes), delta.split(u_sizes)):
        subtract_at(f, index, d)
    # 5. prune: keep the M_i of highest priority of each U_i
    if moment_selection in PRUNES:
        stream = repeat_each(streams, u_sizes, dev) if PRUNES[moment_selection].random else None
        keys = PRUNES[moment_selection].priority(U, m, stream)
        keep, new_sizes = positions(top_of_each_run(keys, sizes, u_sizes)), sizes
    else:
        keep, new_sizes = torch.arange(total, device=dev), u_sizes
    # S_i in canonical order is U_i's order: its entries in G_i first, then the others ascending
    local = keep - repeat_each(u_start, new_sizes, dev)
    from_G = (local < repeat_each(sizes, new_sizes, dev)).long().cumsum_(0)
    ends = torch.tensor(list(accumulate(new_sizes)), device=dev) - 1
    new_in_G = torch.diff(gather(from_G, ends), prepend=from_G.new_zeros(1)).tolist()  # host sync
    kept_in_support = gather(local, concat_aranges(run_starts(new_sizes), new_in_G, dev))
    return (*(gather(x, keep).split(new_sizes) for x in (U, m, v)),
            kept_in_support.split(new_in_G))


def top_of_each_run(keys, sizes, run_sizes):
    """Mask of the sizes[i] largest keys in each run of run_sizes[i] keys, the runs laid out as
    the rows of `row_blocks`, padded with the smallest int64."""
    dev = keys.device
    blocks, starts, widths = row_blocks(sizes, run_sizes)
    slot = concat_aranges(starts, run_sizes, dev)
    rows = scatter(torch.full((sum(widths),), INT64_MIN, device=dev), slot, keys)
    chosen = mark_top(rows, blocks, torch.zeros(sum(widths), dtype=torch.bool, device=dev), True)
    return gather(chosen, slot)


def row_blocks(sizes, widths):
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


def mark_top(keys, blocks, out, value):
    """Set `out` to `value` at the `size` largest keys of each row of each block."""
    for start, rows, width, size in blocks:
        block = slice(start, start + rows * width)
        if width > size:
            best = torch.topk(keys[block].view(rows, width), size, dim=1, sorted=False).indices
            out[block].view(rows, width).scatter_(1, best, value)
        else:  # nothing outside G: keep all
            out[block] = value
    return out


class BatchedState:
    """The SO state of a batch of tensors between support redraws, as fixed-shape rows.

    After a redraw each tensor gets a row [G_i; O_i] that holds U_i for every step until the next
    one: entries of G_i outside S_i carry m = v = 0; entries of O_i pruned since are dead
    (m = v = 0, update 0, never kept). Rows are laid out as `row_blocks`, padded with dead slots.
    The only data-dependent shape, the compaction of S, waits until the optimizer's state is read
    (`write_to_states`). Built by `after_redraw`, used while `matches` holds (the SO states
    still hold the tensors this batch wrote)."""

    def __init__(self, states, supports, kepts, exp_avgs, exp_avg_sqs, kept_in_supports, sizes,
                 step):
        dev = supports[0].device
        in_G = [p.numel() for p in kept_in_supports]
        kept_sizes = [k.numel() for k in kepts]
        widths = [m + k - c for m, k, c in zip(sizes, kept_sizes, in_G)]
        self.blocks, starts, padded = row_blocks(sizes, widths)
        total = sum(padded)
        self.padded, self.sizes, self.widths, self.step = padded, sizes, widths, step
        self.states, self.supports, self.kepts, self.pending = states, supports, kepts, False
        self.at_G = concat_aranges(starts, sizes, dev)
        # S_i = [G_i[kept_in_support_i]; O_i]: where each entry of S goes
        to_S = concat_aranges([s + m - c for s, m, c in zip(starts, sizes, in_G)], kept_sizes, dev)
        scatter(to_S, concat_aranges(run_starts(kept_sizes), in_G, dev),
                torch.cat(kept_in_supports) + repeat_each(starts, in_G, dev))
        self.index = scatter(torch.zeros(total, dtype=torch.int64, device=dev), to_S,
                             torch.cat(kepts))
        scatter(self.index, self.at_G, torch.cat(supports))
        self.m = scatter(torch.zeros(total, device=dev), to_S, torch.cat(exp_avgs))
        self.v = scatter(torch.zeros(total, device=dev), to_S, torch.cat(exp_avg_sqs))
        # 1.0 at the slots outside G, and at the dead ones (masks as floats: multiplying by them
        # is 30x faster than masked_fill_ on CPU)
        self.outside_G = torch.ones(total, device=dev).index_fill_(0, self.at_G, 0.0)
        self.dead = self.outside_G.index_fill(0, to_S, 0.0)
        # the gradient at G (zero elsewhere) and the update, with views per tensor made once
        self.g, self.delta = torch.zeros(total, device=dev), torch.empty(total, device=dev)
        self.g_rows = [self.g[s:s + m] for s, m in zip(starts, sizes)]
        self.slots = [(self.index[s:s + w], self.delta[s:s + w]) for s, w in zip(starts, widths)]

    @classmethod
    def after_redraw(cls, states, flats, grads, *, sizes, step, **hyper):
        """batched_update on the tensors whose SO states are `states` (dicts, written in place),
        and the rows for their steps until the next redraw."""
        columns = [[s[k] for s in states] for k in ("support",) + MOMENT_STATE]
        out = batched_update(flats, grads, *columns, sizes=sizes, step=step, **hyper)
        _write(states, out[:3])
        return cls(states, columns[0], *out, sizes, step)

    def matches(self, states, sizes, step):
        """Whether these states are the ones this batch wrote, one step ago."""
        return (step == self.step + 1 and sizes == self.sizes and len(states) == len(self.kepts)
                and all(s["kept"] is k and s["support"] is g
                        for s, k, g in zip(states, self.kepts, self.supports)))

    def bytes(self):
        buffers = [self.index, self.m, self.v, self.outside_G, self.dead, self.g, self.delta,
                   self.at_G] + ([self.keep] if self.pending else [])
        return sum(x.numel() * x.element_size() for x in buffers)

    def step_all(self, flats, grads, *, step, lr, beta1, beta2, eps, weight_decay,
                 moment_selection, streams):
        """Steps 2-5 of every tensor of the batch; the states are written when read."""
        if not weight_decay and all(isinstance(gr, GradAtSupport) for gr in grads):
            scatter(self.g, self.at_G, torch.cat([gr.values for gr in grads]))  # one op for all
        else:
            for f, gr, s, out in zip(flats, grads, self.supports, self.g_rows):
                grad_at(f, gr, s, weight_decay, out=out)
        adam_moments(self.m, self.v, self.g, beta1, beta2)  # g: 0 outside G's slots
        adam_delta(self.m, self.v, lr, beta1, beta2, eps, step, dead=self.dead, out=self.delta)
        for f, (index, delta) in zip(flats, self.slots):
            subtract_at(f, index, delta)
        if moment_selection in PRUNES:
            prune = PRUNES[moment_selection]
            stream = repeat_each(streams, self.padded, self.m.device) if prune.random else None
            keys = prune.priority(self.index, self.m, stream).masked_fill_(self.dead.bool(),
                                                                          INT64_MIN)
            keep = mark_top(keys, self.blocks, torch.zeros_like(self.dead), 1.0)
            self.m.mul_(keep)  # m = v = 0 outside S (-0.0 for some: the same numbers)
            self.v.mul_(keep)
            self.dead = torch.sub(self.outside_G, keep).clamp_(min=0)
            self.keep, self.counts = keep, self.sizes
        else:
            self.keep, self.counts = 1 - self.dead, self.widths
        self.step, self.pending = step, True

    def write_to_states(self):
        """Write S and its moments of the last step into the states, in canonical order."""
        at = positions(self.keep.bool())  # row order: G's entries (ascending), then O's
        out = [gather(x, at).split(self.counts) for x in (self.index, self.m, self.v)]
        _write(self.states, out)
        self.kepts, self.pending = out[0], False


def _write(states, columns):
    for state, values in zip(states, zip(*columns)):
        state.update(zip(MOMENT_STATE, values))
