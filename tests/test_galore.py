"""GaLore (so/galore.py): moments in the projected shape, the projection recomputed exactly every
update_proj_gap steps, and pytorch-optimizer's GaLore on the same gradients and projections."""
import pytest
import torch
from pytorch_optimizer import GaLore as LibraryGaLore

from so.clip.galore import GaLore
from so.clip.methods import build_method
from tests.test_methods import fresh, method_cfg, tiny, train_step  # noqa: F401 (fixture)

SHAPES = [(24, 8), (8, 24), (12, 12), (12,)]  # tall, wide, square matrices and a bias


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def gradients(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g) for s in SHAPES] for _ in range(steps)]


def run(optimizer, ps, grads, each_step=None):
    for step, gs in enumerate(grads):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        optimizer.step()
        if each_step:
            each_step(step)


def test_moments_have_the_projected_shape_on_the_tiny_clip(tiny):
    model = fresh(tiny)
    method = build_method(*method_cfg("galore", "optimizer.lr=1e-3"), model, 0)
    assert method.trainable_params == sum(p.numel() for p in method.trainable.values())
    before = {n: p.detach().clone() for n, p in method.trainable.items()}
    train_step(model, method, tiny)
    rank = 2
    for n, p in method.trainable.items():
        m, n_ = p.shape
        state = method.optimizer.state[p]
        want = (m, rank) if m >= n_ else (rank, n_)  # O(r x max(m, n)) floats per moment
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == want, n
        assert not torch.equal(p, before[n]), n


def test_the_projection_is_recomputed_exactly_every_update_proj_gap_steps():
    ps = params()
    optimizer = GaLore(ps, lr=1e-2, rank=3, update_proj_gap=4, scale=0.5)
    seen = {i: [] for i in range(3)}

    def record(step):
        for i in seen:
            seen[i].append(optimizer.projector(ps[i]).ortho_matrix)

    run(optimizer, ps, gradients(10), record)
    for i, matrices in seen.items():
        refreshed = [s for s in range(10) if s == 0 or matrices[s] is not matrices[s - 1]]
        assert refreshed == [0, 4, 8], i
        m, n = SHAPES[i]
        assert matrices[0].shape == ((3, n) if m >= n else (m, 3))  # Vh_r (right) or U_r (left)
    assert optimizer.projector(ps[3]) is None and optimizer.state[ps[3]]["exp_avg"].shape == (12,)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_it_equals_pytorch_optimizers_galore_on_the_same_gradients_and_projections(weight_decay):
    """update_proj_gap=1: both recompute the projection from every gradient, so the projections are the
    same; the parameters then agree step for step."""
    ours, theirs = params(), params()
    grads = gradients(6)
    run(GaLore(ours, lr=1e-2, rank=3, update_proj_gap=1, scale=0.5, weight_decay=weight_decay), ours, grads)
    library = LibraryGaLore([{"params": theirs[:3], "rank": 3, "update_proj_gap": 1, "scale": 0.5,
                              "projection_type": "std"}, {"params": theirs[3:]}],
                            lr=1e-2, weight_decay=weight_decay, eps=1e-6)
    run(library, theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[0], params()[0])


def test_the_library_counts_steps_from_one():
    """pytorch-optimizer recomputes at steps 1, gap, 2 gap (its first interval is one step short): why
    so/galore.py keeps the official loop."""
    ps = params()
    library = LibraryGaLore([{"params": ps[:1], "rank": 3, "update_proj_gap": 4, "scale": 0.5,
                              "projection_type": "std"}], lr=1e-2)
    steps = []
    run(library, ps[:1], [g[:1] for g in gradients(10)],
        lambda step: steps.append(library.state[ps[0]]["projector"].last_svd_step))
    assert sorted(set(steps)) == [1, 4, 8]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="rank=0: expected an integer >= 1"):
        GaLore(params(), lr=1e-2, rank=0, update_proj_gap=4, scale=1.0)
    with pytest.raises(ValueError, match="update_proj_gap=2.5: expected an integer >= 1"):
        GaLore(params(), lr=1e-2, rank=2, update_proj_gap=2.5, scale=1.0)
