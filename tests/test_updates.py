import pytest
import torch

from so import SO
from so.clip.updates import UpdateCounts


@pytest.mark.parametrize("switches", [{}, {"moment_selection": "random", "refresh_every": 1},
                                      {"moment_selection": "dense", "support": "static"}])
def test_counts_equal_the_steps_in_which_each_entry_moved(switches):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(7, 3, 5))]
    optimizer = SO(params, **{"lr": 1e-2, "density": 0.05, "refresh_every": 3, **switches})
    counts = UpdateCounts(optimizer, {params[0]: "a", params[1]: "b"})
    moved = [torch.zeros(p.shape, dtype=torch.int32) for p in params]
    for _ in range(12):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        counts.update()
        counts.update()  # a second call without a step counts nothing
        for m, p, b in zip(moved, params, before):
            m += (p.detach() != b).int()
    for p, name, m in zip(params, "ab", moved):
        assert torch.equal(counts.counts[p].view(p.shape), m), name
        assert int(m.max()) > 1 and int((m > 0).sum()) < p.numel()  # sparse, and entries move repeatedly


def test_save_writes_counts_shaped_like_the_parameters(tmp_path):
    p = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = SO([p], density=0.25)
    counts = UpdateCounts(optimizer, {p: "w"})
    p.grad = torch.randn_like(p)
    optimizer.step()
    counts.update()
    counts.save(tmp_path / "u.pt")
    saved = torch.load(tmp_path / "u.pt", weights_only=True)
    assert saved["w"].shape == (6, 4) and saved["w"].dtype == torch.int32 and int(saved["w"].sum()) == 6


def test_dense_optimizer_state_is_refused():
    p = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.Adam([p])
    p.grad = torch.randn_like(p)
    optimizer.step()
    with pytest.raises(ValueError, match="w: no SO sparse state"):
        UpdateCounts(optimizer, {p: "w"}).update()
