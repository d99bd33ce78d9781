"""SO as a torch optimizer: state, resume, seeding, step_in_backward, validation, edge cases."""
import io
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import so.optim
from so import SO, step_in_backward
from so.draws import first_distinct, random_supports, splitmix64, splitmix64_

# tiny tensors (LayerNorm weights at density 0.05) warn by design; test_tiny_tensors checks it
pytestmark = pytest.mark.filterwarnings("ignore:SO. .* floor\\(density")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                         nn.LayerNorm(16), nn.Linear(16, 4))


def _batch(i):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(5, 3, 8, 8, generator=gen), torch.randint(0, 4, (5,), generator=gen)


def _loss(model, i):
    x, y = _batch(i)
    return nn.functional.cross_entropy(model(x), y)


def _optimizer(model, seed=1, weight_decay=0.01, **kw):
    params = [p for n, p in model.named_parameters() if "bias" not in n]
    biases = [p for n, p in model.named_parameters() if "bias" in n]
    return SO([{"params": params}, {"params": biases, "density": 0.5, "refresh_every": 2}],
              lr=1e-2, density=0.05, refresh_every=3, weight_decay=weight_decay,
              generator=torch.Generator().manual_seed(seed), **kw)


def _train(model, opt, iters, start=0, accumulate=1):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for _ in range(start):
        sched.step()
    for i in range(start, start + iters):
        for k in range(accumulate):
            _loss(model, accumulate * i + k).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.mark.parametrize("grad_selection", ["random", "topk"])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])  # 0: the step takes all reads in one op
def test_step_in_backward_equals_plain_loop(grad_selection, accumulate, weight_decay, monkeypatch):
    plain, fused = _model(), _model()
    opt_plain = _optimizer(plain, grad_selection=grad_selection, weight_decay=weight_decay)
    opt_fused = _optimizer(fused, grad_selection=grad_selection, weight_decay=weight_decay)
    _train(plain, opt_plain, 12, accumulate=accumulate)
    handle = step_in_backward(fused, opt_fused)
    seen, draws = [], []
    for p in fused.parameters():  # the dense gradient is gone as soon as it was read
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is None))
    monkeypatch.setattr(so.optim, "random_supports",
                        lambda *a: draws.append(len(a[0])) or random_supports(*a))
    _train(fused, opt_fused, 12, accumulate=accumulate)
    if grad_selection == "random":  # one batch of 4 per group and redraw: steps 1, 4, 7, 10
        assert draws == [4] * 10  # (the 4 weights) and 1, 3, 5, 7, 9, 11 (the 4 biases)
    assert len(seen) == 12 * accumulate * len(list(fused.parameters()))
    # a topk support is drawn from the whole gradient: at its redraws (steps 1, 4, 7, 10 for the
    # 4 weights, 1, 3, 5, 7, 9, 11 for the 4 biases) the gradient stays until the step
    assert seen.count(False) == (accumulate * (4 * 4 + 4 * 6) if grad_selection == "topk" else 0)
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
        assert b.grad is None
    for name in ("support", "kept", "exp_avg", "exp_avg_sq"):
        for a, b in zip(plain.parameters(), fused.parameters()):
            assert torch.equal(opt_plain.state[a][name], opt_fused.state[b][name])
    before = [p.detach().clone() for p in fused.parameters()]
    _loss(fused, 0).backward()  # read and freed (topk: kept, step 13 redraws), not yet applied
    assert all((p.grad is None) == (grad_selection == "random") for p in fused.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, fused.parameters()))
    opt_fused.zero_grad()  # drops what was read, as it drops gradients
    opt_fused.step()
    assert all(torch.equal(a, b) for a, b in zip(before, fused.parameters()))
    _loss(fused, 0).backward()
    handle.remove()
    _loss(fused, 1).backward()  # after the hooks went: added to what was read
    assert all(p.grad is not None for p in fused.parameters())
    opt_fused.step()
    assert all(p.grad is not None for p in fused.parameters())  # torch's convention: the step leaves .grad
    assert not all(torch.equal(a, b) for a, b in zip(before, fused.parameters()))


def test_step_in_backward_leaves_dense_groups_to_the_step():
    torch.manual_seed(0)
    body, head = nn.Linear(20, 30), nn.Linear(30, 3)
    opt = SO([{"params": body.parameters()}, {"params": head.parameters(), "dense": True}],
             lr=1e-2, density=0.1)
    step_in_backward([*body.parameters(), *head.parameters()], opt)
    head(body(torch.randn(4, 20))).square().sum().backward()
    assert body.weight.grad is None and head.weight.grad is not None  # Adam needs all of it
    before = head.weight.detach().clone()
    opt.step()
    assert head.weight.grad is not None and not torch.equal(before, head.weight)
    assert opt.state[head.weight]["exp_avg"].shape == head.weight.shape
    assert opt.state[body.weight]["kept"].numel() == 60


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()")  # fast-forwarded
def test_resume_equals_uninterrupted_run():
    full = _model()
    opt = _optimizer(full)
    _train(full, opt, 11)

    half = _model()
    opt_half = _optimizer(half)
    _train(half, opt_half, 5)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt_half.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _model(seed=7)
    resumed.load_state_dict(saved["model"])
    opt_resumed = _optimizer(resumed, seed=99)  # another seed: the saved one must win
    opt_resumed.load_state_dict(saved["opt"])
    state = opt_resumed.state[next(resumed.parameters())]
    assert state["kept"].dtype == torch.int64 and state["exp_avg"].dtype == torch.float32
    _train(resumed, opt_resumed, 6, start=5)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("copy_", ["deepcopy", "pickle"])
def test_a_copy_trains_on_like_the_original(copy_):
    """copy.deepcopy or torch.save of the optimizer object (not its state_dict) keeps the seed:
    the copy draws the same supports, also for a group added after copying."""
    import copy

    model = _model()
    opt = _optimizer(model)
    _train(model, opt, 4)
    if copy_ == "deepcopy":
        twin_model, twin = copy.deepcopy((model, opt))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        twin_model, twin = torch.load(buffer, weights_only=False)
    assert twin.seed == opt.seed
    for m, o in ((model, opt), (twin_model, twin)):
        extra = nn.Parameter(torch.ones(500))
        o.add_param_group({"params": [extra], "density": 0.02})
        for i in range(4, 7):
            _loss(m, i).backward()
            extra.grad = torch.linspace(-1, 1, 500)
            o.step()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    extra, twin_extra = (o.param_groups[-1]["params"][0] for o in (opt, twin))
    assert torch.equal(opt.state[extra]["support"], twin.state[twin_extra]["support"])


def test_resume_keeps_index_and_moment_dtypes_for_bf16_params():
    p = torch.randn(300, 200).bfloat16().requires_grad_()
    opt = SO([p], density=0.01)
    p.grad = torch.randn_like(p)
    opt.step()
    q = p.detach().clone().requires_grad_()
    opt2 = SO([q], density=0.01)
    opt2.load_state_dict(opt.state_dict())
    for key in ("support", "kept", "exp_avg", "exp_avg_sq"):
        assert torch.equal(opt2.state[q][key], opt.state[p][key]), key
        assert opt2.state[q][key].dtype == opt.state[p][key].dtype


def test_seeding():
    def supports(**kw):
        p = torch.zeros(1000, requires_grad=True)
        opt = SO([p], density=0.01, **kw)
        p.grad = torch.ones(1000)
        opt.step()
        return opt.state[p]["support"]

    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(supports(generator=gen(1)), supports(generator=gen(1)))
    assert not torch.equal(supports(generator=gen(1)), supports(generator=gen(2)))
    torch.manual_seed(3)
    a = supports()
    torch.manual_seed(3)
    assert torch.equal(a, supports())


def test_state_is_O_of_M():
    p = torch.zeros(1000, 1000, requires_grad=True)
    opt = SO([p], density=1e-3, refresh_every=2)
    for _ in range(4):
        p.grad = torch.randn_like(p)
        opt.step()
    state = opt.state[p]
    size = 1000
    assert set(state) == {"step", "seed", "support", "kept", "exp_avg", "exp_avg_sq"}
    assert state["support"].numel() == size and state["kept"].numel() == size
    nbytes = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    assert nbytes == size * (8 + 8 + 4 + 4)
    # the batched step's rows: at most 2M slots of index, m, v, two float masks, g and the
    # update; M positions of G
    assert nbytes < opt.state_bytes() <= nbytes + 2 * size * (8 + 6 * 4) + 8 * size
    assert int((p != 0).sum()) <= 4 * size  # at most 2M entries move per step


def test_tiny_tensors_warn_once_and_still_train():
    tiny, big = torch.zeros(3, requires_grad=True), torch.zeros(5000, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SO([{"params": [tiny, big]}, {"params": [torch.zeros(2, requires_grad=True)]}],
                 density=1e-3, lr=0.1)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "2 of 3 sparse tensors" in messages[0]
    tiny.grad, big.grad = torch.ones(3), torch.ones(5000)
    opt.step()
    assert int((tiny != 0).sum()) == 1 and int((big != 0).sum()) == 5


def test_params_without_grad_and_empty_groups():
    a, b = torch.zeros(100, requires_grad=True), torch.zeros(100, requires_grad=True)
    opt = SO([{"params": []}, {"params": [a, b]}], density=0.1, refresh_every=1, lr=0.1)
    a.grad = torch.ones(100)
    opt.step()
    assert b.grad is None and torch.equal(b, torch.zeros(100)) and not opt.state[b]
    assert opt.state[a]["step"] == 1
    # from now on a and b are at different steps: each goes in its own batch
    twin_a, twin_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    twin = SO([{"params": []}, {"params": [twin_a, twin_b]}], density=0.1, refresh_every=1, lr=0.1)
    twin.load_state_dict(opt.state_dict())
    for i in range(3):
        g = torch.randn(2, 100, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad, twin_a.grad, twin_b.grad = g[0], g[1], g[0].clone(), g[1].clone()
        opt.step()
        twin.read_grad(twin_b)  # as step_in_backward's hooks would, in backward's order
        twin.read_grad(twin_a)
        twin.step()
    assert opt.state[a]["step"] == 4 and opt.state[b]["step"] == 3
    assert torch.equal(a, twin_a) and torch.equal(b, twin_b)


def test_state_written_out_when_read_equals_state_read_every_step():
    """The batched step writes S out of its buffers only when `state` is read: a run that never
    reads it (with redraws, a tensor skipping steps, a resume and read_grad mixed in) ends with
    the same parameters and state as one that reads it after every step."""
    def run(read):
        gen = torch.Generator().manual_seed(8)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in [(30, 20), (600,), (50,)]]
        opt = SO(params, lr=1e-2, density=0.05, refresh_every=4, weight_decay=0.01,
                 generator=torch.Generator().manual_seed(9))
        for t in range(14):
            for i, p in enumerate(params):
                p.grad = None if (i == 2 and t in (5, 6)) else torch.randn(p.shape, generator=gen)
            if t == 10:
                opt.read_grad(params[1])  # read in backward, as step_in_backward does
            opt.step()
            if t == 7:
                saved = opt.state_dict()
                opt = SO(params, lr=1e-2, density=0.05, refresh_every=4, weight_decay=0.01)
                opt.load_state_dict(saved)
            if read:
                assert opt.state[params[0]]["exp_avg"].numel() == 30
        return params, opt.state_dict()["state"]

    (eager, eager_state), (lazy, lazy_state) = run(True), run(False)
    for a, b in zip(eager, lazy):
        assert torch.equal(a, b)
    for key in eager_state:
        assert eager_state[key]["step"] == lazy_state[key]["step"] and eager_state[key]["step"] > 9
        for name in ("support", "kept", "exp_avg", "exp_avg_sq"):
            assert torch.equal(eager_state[key][name], lazy_state[key][name])


def test_lr_change_is_honoured():
    runs = []
    for lr in (0.1, 0.0):
        p = torch.zeros(50, requires_grad=True)
        opt = SO([p], density=0.2, lr=0.1)
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.ones(50)
        opt.step()
        runs.append(p.detach().clone())
    assert int((runs[0] != 0).sum()) == 10 and torch.equal(runs[1], torch.zeros(50))


@pytest.mark.parametrize("kwargs, key", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(lr=-1.0), "lr"),
    (dict(refresh_every=0), "refresh_every"), (dict(refresh_every=2.5), "refresh_every"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(grad_selection="magnitude"), "grad_selection"),
    (dict(moment_selection="all"), "moment_selection"), (dict(support="fixed"), "support"),
    (dict(momentum="yes"), "momentum"),
])
def test_validation(kwargs, key):
    with pytest.raises(ValueError, match=rf"^{key}=.*: expected .* \(SO\)$"):
        SO([torch.zeros(3, requires_grad=True)], **kwargs)


def test_group_validation_names_the_group():
    with pytest.raises(ValueError, match=r"density=2: expected a number in \(0, 1\] \(SO param group 1\)"):
        SO([{"params": [torch.zeros(3, requires_grad=True)]},
            {"params": [torch.zeros(3, requires_grad=True)], "density": 2}])


def test_splitmix_on_tensors_matches_python_ints():
    x = torch.randint(-2**63, 2**63 - 1, (500,), generator=torch.Generator().manual_seed(0))
    want = [splitmix64(int(v) % 2**64) for v in x]
    want = torch.tensor([w - 2**64 if w >= 2**63 else w for w in want])
    assert torch.equal(splitmix64_(x), want)


def test_random_supports_are_uniform_draws_without_replacement():
    numels, sizes = [5, 10**7, 9, 1, 6], [2, 5000, 8, 1, 3]
    out = random_supports(numels, sizes, [1, 2, 3, 4, 5], "cpu")
    for n, m, idx in zip(numels, sizes, out):
        assert idx.numel() == m and torch.equal(idx, idx.unique())
        assert 0 <= idx.min() <= idx.max() < n
    # every entry equally likely: counts over many streams of 2-of-5 and 4-of-6 (complement) draws
    trials = 3000
    for n, m in ((5, 2), (6, 4)):
        drawn = random_supports([n] * trials, [m] * trials, list(range(trials)), "cpu")
        counts = torch.bincount(torch.cat(drawn), minlength=n).double()
        expected = trials * m / n
        assert ((counts - expected).abs() < 5 * expected**0.5).all(), counts
    # a stream that needs more draws than planned is extended; the draw is its first distinct values
    deep = first_distinct([3], [3], [42], "cpu")[0]
    assert deep.tolist() == [0, 1, 2]


def test_import_needs_only_torch():
    code = ("import sys, so; from so import SO, step_in_backward; "
            "bad = [m for m in ('open_clip', 'peft', 'hydra', 'omegaconf') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/tests/", 1)[0])


def _twin_runs(device, in_backward):
    """SO on the CPU and on `device` from the same seed and gradients; on `device` the gradients
    are read as step_in_backward's hooks read them when in_backward. Returns both optimizers and
    their parameters, and the parameters' starting values."""
    gen = torch.Generator().manual_seed(0)
    cpu = [torch.randn(s, generator=gen).requires_grad_() for s in [(64, 32), (100,), (64, 32)]]
    other = [p.detach().to(device).requires_grad_() for p in cpu]
    start = [p.detach().clone() for p in cpu]
    opt_c, opt_o = SO(cpu, density=0.05, lr=1e-2), SO(other, density=0.05, lr=1e-2)
    opt_o.seed = opt_c.seed
    for _ in range(12):
        grads = [torch.randn(p.shape, generator=gen) for p in cpu]
        for p, q, g in zip(cpu, other, grads):
            p.grad, q.grad = g, g.to(device)
            if in_backward:
                opt_o.read_grad(q)
        opt_c.step()
        opt_o.step()
    return opt_c, cpu, opt_o, other, start


@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_device_matches_cpu_draws_and_updates(device, in_backward):
    """The same supports and, to float tolerance, the same parameters on the GPU as on the CPU,
    with the gradients read in backward or not (on the CPU: the reads against the plain loop)."""
    opt_c, cpu, opt_o, other, start = _twin_runs(device, in_backward)
    for p, q, p0 in zip(cpu, other, start):
        assert q.device.type == device and (q.grad is None) == in_backward and not torch.equal(p, p0)
        assert torch.equal(opt_c.state[p]["support"], opt_o.state[q]["support"].cpu())
        assert torch.equal(opt_c.state[p]["kept"], opt_o.state[q]["kept"].cpu())
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


def test_bench_helpers():
    from scripts.bench_optimizer import (bench_relora, clip_shapes, paired_ratio, state_bytes, summary,
                                         time_interleaved, time_step)
    from so.clip.galore import GaLore

    shapes = clip_shapes()
    assert len(shapes) == 96 and sum(a * b for a, b in shapes) == 122_683_392
    params = [torch.zeros(64, 32, requires_grad=True) for _ in range(3)]
    grads = [torch.ones(64, 32) for _ in params]
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt = SO(params, density=0.01)
    times = time_interleaved({"so": (opt, 2)}, params, grads, 2, 1, torch.device("cpu"))
    assert list(times) == ["so"] and [len(r) for r in times["so"]] == [2, 2]
    assert opt.state[params[0]]["step"] == 6
    median, mean, cpu = summary(times["so"])
    assert median > 0 and mean > 0 and cpu >= 0
    so = [[(1.0, 0.5), (3.0, 0.5)], [(8.0, 1.0), (8.0, 1.0)], [(1.0, 1.0), (1.0, 1.0)]]
    adam = [[(20.0, 5.0)], [(80.0, 10.0)], [(5.0, 5.0)]]  # the machine slows down in round 2
    assert summary(so) == (2.0, 22 / 6, 1.0)
    assert paired_ratio(so, adam, 0) == 0.1 and paired_ratio(so, adam, 1) == 0.1
    assert all(int((p != 0).sum()) > 0 for p in params)
    assert state_bytes(opt) == opt.state_bytes() > 3 * 20 * (8 + 8 + 4 + 4)
    opt_twin = SO(twin, density=0.01)
    opt_twin.seed = opt.seed
    read = time_interleaved({"so_in_backward": (opt_twin, 2, True)}, twin, grads, 2, 1,
                            torch.device("cpu"))["so_in_backward"]
    assert [len(step) for steps in read for step in steps] == [3] * 4 and read[0][0][2] > 0
    assert all(torch.equal(p, q) for p, q in zip(params, twin))  # the reads change no number
    adam = torch.optim.Adam(params)
    time_step(adam, params, grads, torch.device("cpu"))
    assert state_bytes(adam) == 3 * 2 * 64 * 32 * 4 + 3 * 4  # two fp32 moments, a step each
    galore = GaLore(params, lr=1e-3, rank=2, update_proj_gap=10, scale=1.0)
    time_step(galore, params, grads, torch.device("cpu"))
    assert state_bytes(galore) == 3 * (2 * 64 * 2 + 2 * 32) * 4  # moments 64 x 2, projection 2 x 32
    row = bench_relora(torch.device("cpu"), 2, {})
    assert (row["optimizer"], row["tensors"], row["numel"]) == ("relora", 144, 184_320)  # LoRA's factors
    assert row["median_ms"] > 0 and row["reset_ms"] > 0 and row["state_bytes"] >= 2 * 184_320 * 4
