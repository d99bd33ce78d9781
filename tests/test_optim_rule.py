"""SO against an independent, deliberately simple float64 reference of the rule (mask based).

The reference reads the random draws from the optimizer's state after each step
(state["support"], and state["kept"] where the rule itself is random), checks them, and computes
everything else itself.
"""
import math

import pytest
import torch

from so import SO
from so.batched import BatchedState, batched_update
from so.rule import so_update

SHAPES = [(40,), (12, 10), (3, 4, 5, 2)]
STEPS = 50


class Reference:
    """SO for one tensor, float64, dense vectors and masks; W is stored at the parameter's dtype."""

    def __init__(self, param, density, refresh_every, weight_decay, betas, eps, grad_selection,
                 moment_selection, support, momentum):
        self.dtype, self.n = param.dtype, param.numel()
        self.w = param.detach().reshape(-1).double()
        self.m = torch.zeros(self.n, dtype=torch.float64)
        self.v = torch.zeros(self.n, dtype=torch.float64)
        self.kept = torch.zeros(self.n, dtype=torch.bool)
        self.support = None
        self.size = max(1, math.floor(density * self.n))
        self.refresh_every, self.weight_decay, self.eps = refresh_every, weight_decay, eps
        self.beta1, self.beta2 = (betas[0] if momentum else 0.0), betas[1]
        self.grad_selection, self.moment_selection, self.static = (
            grad_selection, moment_selection, support == "static")

    def step(self, t, lr, grad, opt_support, opt_kept):
        g_all = grad.reshape(-1).double() + self.weight_decay * self.w
        # 1. support: redrawn at t = 1 and every T steps (dynamic), else the previous one
        drawn = t == 1 or (not self.static and (t - 1) % self.refresh_every == 0)
        assert opt_support.numel() == self.size and torch.equal(opt_support, opt_support.unique())
        assert 0 <= int(opt_support.min()) and int(opt_support.max()) < self.n
        if not drawn:
            assert torch.equal(opt_support, self.support), f"support changed at step {t}"
        elif self.grad_selection == "topk":
            self._assert_top(g_all.abs(), opt_support, torch.ones(self.n, dtype=torch.bool))
        self.support = opt_support.clone()
        in_g = torch.zeros(self.n, dtype=torch.bool)
        in_g[self.support] = True
        # 2-3. moments on U = S u G
        g = torch.where(in_g, g_all, 0.0)
        union = self.kept | in_g
        b1, b2 = self.beta1, self.beta2
        self.m = torch.where(self.kept, b1 * self.m, 0.0) + torch.where(in_g, (1 - b1) * g, 0.0)
        self.v = torch.where(self.kept, b2 * self.v, 0.0) + torch.where(in_g, (1 - b2) * g * g, 0.0)
        # 4. update all of U with the bias corrections of the global step t
        bias1, bias2 = 1 - self.beta1**t, 1 - self.beta2**t
        delta = lr / bias1 * self.m / ((self.v / bias2).sqrt() + self.eps)
        self.w = torch.where(union, self.w - delta, self.w).to(self.dtype).double()
        # 5. prune
        if self.moment_selection == "dense" or int(union.sum()) <= self.size:
            new_kept = union
        else:
            new_kept = torch.zeros(self.n, dtype=torch.bool)
            new_kept[opt_kept] = True
            assert int(new_kept.sum()) == self.size and not (new_kept & ~union).any()
            if self.moment_selection == "topk":
                self._assert_top(self.m.abs(), opt_kept, union)
        self.kept = new_kept
        self.m, self.v = torch.where(self.kept, self.m, 0.0), torch.where(self.kept, self.v, 0.0)

    def _assert_top(self, score, chosen, among):
        """`chosen` is a top-|chosen| set of `score` over `among` (ties to the lower index),
        allowing only near-ties between the float32 and float64 scores."""
        candidates = torch.nonzero(among).squeeze(1).tolist()
        order = sorted(candidates, key=lambda i: (-float(score[i]), i))
        want = set(order[: chosen.numel()])
        got = set(chosen.tolist())
        if got != want:
            cut = float(score[order[chosen.numel() - 1]])
            for i in got ^ want:
                assert abs(float(score[i]) - cut) <= 1e-5 * cut, (sorted(got), sorted(want))


def _assert_canonical_order(kept, support):
    """kept = [its entries in the support, in support order (ascending); the rest ascending]."""
    in_support = torch.isin(kept, support)
    count = int(in_support.sum())
    assert in_support[:count].all() and not in_support[count:].any()
    for part in (kept[:count], kept[count:]):
        assert torch.equal(part, part.sort().values)


# density, refresh_every, weight_decay, grad_selection, moment_selection, support, momentum
CASES = [
    (0.05, 10, 0.0, "random", "topk", "dynamic", True),
    (0.2, 3, 0.1, "random", "topk", "dynamic", True),
    (0.5, 1, 0.0, "random", "topk", "dynamic", True),
    (0.7, 4, 0.0, "random", "topk", "dynamic", True),
    (0.2, 5, 0.1, "topk", "topk", "dynamic", True),
    (0.2, 4, 0.0, "random", "random", "dynamic", True),
    (0.2, 4, 0.1, "random", "dense", "dynamic", True),
    (0.2, 4, 0.0, "random", "topk", "static", True),
    (0.2, 4, 0.1, "random", "topk", "dynamic", False),
    (0.1, 2, 0.05, "topk", "random", "static", False),
    (0.3, 7, 0.0, "topk", "dense", "dynamic", False),
]


def _grads(params, gen):
    # a per-tensor scale spread keeps |m| ties away from the prune boundary
    return [torch.randn(p.shape, generator=gen) * (1 + i) for i, p in enumerate(params)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(case):
    density, refresh_every, wd, grad_sel, moment_sel, support, momentum = case
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    start = [p.detach().clone() for p in params]
    betas, eps = (0.9, 0.999), 1e-8
    opt = SO(params, lr=1e-2, betas=betas, eps=eps, weight_decay=wd, density=density,
             refresh_every=refresh_every, grad_selection=grad_sel, moment_selection=moment_sel,
             support=support, momentum=momentum, generator=torch.Generator().manual_seed(1))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4)
    refs = [Reference(p, density, refresh_every, wd, betas, eps, grad_sel, moment_sel, support,
                      momentum) for p in params]
    for t in range(1, STEPS + 1):
        lr = opt.param_groups[0]["lr"]
        grads = _grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
        for p, g, ref in zip(params, grads, refs):
            state = opt.state[p]
            assert torch.equal(p.grad, g) and state["step"] == t  # torch's convention: .grad as it was
            ref.step(t, lr, g, state["support"], state["kept"])
            kept = state["kept"]
            assert torch.equal(kept.sort().values, torch.nonzero(ref.kept).squeeze(1))
            _assert_canonical_order(kept, state["support"])
            torch.testing.assert_close(p.detach().reshape(-1).double(), ref.w, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(state["exp_avg"].double(), ref.m[kept], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state["exp_avg_sq"].double(), ref.v[kept], rtol=1e-5,
                                       atol=1e-9)
    for p, p0, ref in zip(params, start, refs):  # the test must have trained something
        assert int((p != p0).sum()) >= ref.size


@pytest.mark.parametrize("in_backward", [False, True], ids=["after-backward", "in-backward"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_and_batched_paths_agree_bit_for_bit(case, in_backward):
    """SO(impl="reference") runs so_update tensor by tensor, SO(impl="batched") the fast path:
    same seed and gradients, every switch, redraws and steps between them, a tensor that skips
    steps, tensors of equal size, a bf16 one: the same parameters and state at every step."""
    density, refresh_every, wd, grad_sel, moment_sel, support, momentum = case
    gen = torch.Generator().manual_seed(2)
    shapes = SHAPES + [(12, 10), (7, 11)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    start[-1] = start[-1].bfloat16()
    runs = {}
    for impl in ("reference", "batched"):
        params = [p.clone().requires_grad_() for p in start]
        opt = SO(params, lr=1e-2, weight_decay=wd, density=density, refresh_every=refresh_every,
                 grad_selection=grad_sel, moment_selection=moment_sel, support=support,
                 momentum=momentum, impl=impl, generator=torch.Generator().manual_seed(7))
        runs[impl] = params, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 25)
    for t in range(1, 26):
        grads = [None if (i == 1 and t in (4, 5)) else torch.randn(s, generator=gen).to(p.dtype)
                 for i, (s, p) in enumerate(zip(shapes, start))]
        for params, opt, schedule in runs.values():
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
                if in_backward and g is not None:
                    opt.read_grad(p)
            opt.step()
            schedule.step()
        (ref, ref_opt, _), (fast, fast_opt, _) = runs["reference"], runs["batched"]
        for p, q in zip(ref, fast):
            assert torch.equal(p, q), f"step {t}"
            a, b = ref_opt.state[p], fast_opt.state[q]
            assert a.keys() == b.keys() and a["step"] == b["step"]
            for key in ("support", "kept", "exp_avg", "exp_avg_sq"):
                assert torch.equal(a[key], b[key]), f"step {t}: {key}"
    assert all(not torch.equal(p.detach(), p0) for p, p0 in zip(fast, start))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
    opt = SO(params, lr=1e-2, density=0.2, refresh_every=3, weight_decay=0.1)
    refs = [Reference(p, 0.2, 3, 0.1, (0.9, 0.999), 1e-8, "random", "topk", "dynamic", True)
            for p in params]
    for t in range(1, 21):
        grads = _grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
        for p, g, ref in zip(params, grads, refs):
            assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == torch.float32
            ref.step(t, 1e-2, g.to(dtype), opt.state[p]["support"], opt.state[p]["kept"])
            ulp = torch.finfo(dtype).eps  # one rounding step of the stored parameter
            torch.testing.assert_close(p.detach().reshape(-1).double(), ref.w, rtol=ulp, atol=ulp)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_density_one_is_adam(weight_decay):
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    so = SO(ours, lr=1e-2, density=1.0, weight_decay=weight_decay)
    adam = torch.optim.Adam(theirs, lr=1e-2, weight_decay=weight_decay)
    for _ in range(30):
        grads = _grads(params, gen)
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        so.step()
        adam.step()
    for a, b in zip(ours, theirs):
        assert so.state[a]["kept"].numel() == a.numel()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dense_group_is_adam_next_to_sparse_group():
    gen = torch.Generator().manual_seed(5)
    dense, sparse = torch.randn(6, 5, generator=gen), torch.randn(50, generator=gen)
    ours, theirs = dense.clone().requires_grad_(), dense.clone().requires_grad_()
    sp = sparse.clone().requires_grad_()
    so = SO([{"params": [ours], "dense": True}, {"params": [sp]}], lr=1e-2, density=0.1,
            weight_decay=0.05)
    adam = torch.optim.Adam([theirs], lr=1e-2, weight_decay=0.05)
    for _ in range(10):
        g, h = torch.randn(6, 5, generator=gen), torch.randn(50, generator=gen)
        ours.grad, theirs.grad, sp.grad = g.clone(), g.clone(), h
        so.step()
        adam.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert so.state[ours]["exp_avg"].shape == ours.shape and "support" not in so.state[ours]
    assert so.state[sp]["kept"].numel() == 5 and (sp != sparse).sum() <= 10


@pytest.mark.parametrize("moment_selection", ["topk", "random", "dense"])
def test_batched_core_equals_per_tensor_core(moment_selection):
    """Nine steps on tensors of equal and different sizes, the supports redrawn every third step
    (batched_update), BatchedState in between; the first kept sets are arbitrary (unsorted,
    overlapping the supports). eps = 0: the dead slots of the rows must not turn into 0 / 0."""
    gen = torch.Generator().manual_seed(6)
    numels, sizes = [20, 31, 31, 64, 9], [7, 5, 5, 7, 6]
    flats = [torch.randn(n, generator=gen) for n in numels]
    twins = [f.clone() for f in flats]
    state = [[torch.randperm(n, generator=gen)[:m] for n, m in zip(numels, sizes)],
             [torch.randn(m, generator=gen) for m in sizes],
             [torch.rand(m, generator=gen) for m in sizes]]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.1,
                 moment_selection=moment_selection)
    streams = [11, -12, 13, 14, 15]
    for step in range(1, 10):
        grads = [torch.randn(n, generator=gen) for n in numels]
        states = [dict(zip(("kept", "exp_avg", "exp_avg_sq"), x)) for x in zip(*state)]
        if step % 3 == 1:
            supports = [torch.randperm(n, generator=gen)[:m].sort().values
                        for n, m in zip(numels, sizes)]
            for s, g in zip(states, supports):
                s["support"] = g
            rows = BatchedState.after_redraw(states, twins, grads, step=step, sizes=sizes, streams=streams,
                                **hyper)
        else:
            for s, g in zip(states, supports):
                s["support"] = g
            rows.states = states
            assert rows.matches(states, sizes, step)
            rows.step_all(twins, grads, step=step, streams=streams, **hyper)
            assert rows.pending and states[0]["kept"] is state[0][0]  # not written out yet
            rows.write_to_states()
        out = [[s[k] for s in states] for k in ("kept", "exp_avg", "exp_avg_sq")]
        for i in range(len(numels)):
            one = so_update(flats[i], grads[i], supports[i], state[0][i], state[1][i], state[2][i],
                            step=step, size=sizes[i], stream=streams[i], **hyper)
            assert torch.equal(flats[i], twins[i])
            for a, b in zip(one, (x[i] for x in out)):
                assert torch.equal(a, b)
            union = torch.cat([state[0][i], supports[i]]).unique()
            assert one[0].numel() == (union.numel() if moment_selection == "dense" else sizes[i])
        state = out


def test_prune_ties_go_to_the_lower_index():
    flat, grad = torch.zeros(10), torch.ones(10)
    kept, support = torch.tensor([5, 7]), torch.tensor([2, 3])
    m, v = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])
    # beta1 = 0.5: kept entries decay to 0.5, new entries get 0.5 * 1: a four-way tie
    hyper = dict(step=1, lr=1e-2, beta1=0.5, beta2=0.5, eps=1e-8, weight_decay=0.0, size=2,
                 moment_selection="topk")
    one = so_update(flat.clone(), grad, support, kept, m, v, **hyper)
    assert one[0].tolist() == [2, 3] and one[1].tolist() == [0.5, 0.5]
    hyper.pop("size")
    batched = batched_update([flat.clone()], [grad], [support], [kept], [m], [v], sizes=[2],
                                streams=[0], **hyper)
    assert batched[0][0].tolist() == [2, 3]


def test_topk_gradient_support_ties_go_to_the_lower_index():
    p = torch.zeros(10, requires_grad=True)
    opt = SO([p], density=0.3, grad_selection="topk")
    p.grad = torch.tensor([1.0, 2, 2, 1, 2, 2, 0, 0, 3, 0])
    opt.step()
    assert opt.state[p]["support"].tolist() == [1, 2, 8]
