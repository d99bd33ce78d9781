"""ReLoRA (so/relora.py) on the tiny CLIP: a merge keeps the outputs, a reset re-initialises the factors
and prunes their moments, the accumulated update outgrows LoRA's rank, resets and the jagged cosine
fall where ReLoRA's training loop puts them."""
import math

import pytest
import torch

import train
from so.clip.methods import build_method, load_trained, save_trained
from so.clip.relora import jagged_cosine, magnitude_prune_
from tests.test_methods import fresh, method_cfg, outputs, snapshot, tiny, train_step  # noqa: F401 (fixture)

Q = "visual.transformer.resblocks.0.attn.q_proj"  # one adapted layer of the tiny model (width 64)


def relora(tiny, *overrides):
    model = fresh(tiny)
    return model, build_method(*method_cfg("relora", "optimizer.lr=1e-2", *overrides), model, 0)


def factors(model):
    layer = model.get_submodule(Q)
    return layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()


def test_a_reset_merges_without_changing_outputs_and_restarts_the_factors(tiny):
    model, method = relora(tiny, "method.reset_every=1000")
    for _ in range(3):
        train_step(model, method, tiny)
    a, b = factors(model)
    assert b.abs().max() > 0  # the adapter has learnt something to merge
    moments = {p: {k: method.optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
               for p in method.trainable.values()}
    before = outputs(model, tiny)
    weight = model.get_submodule(Q).base_layer.weight.detach().clone()
    method.restarts.reset()
    torch.testing.assert_close(outputs(model, tiny), before, rtol=1e-6, atol=1e-6)  # fp32 rounding of W + B A
    new_a, new_b = factors(model)
    assert torch.equal(new_b, torch.zeros_like(b)) and not torch.equal(new_a, a)
    assert new_a.abs().max() <= 1 / math.sqrt(64)  # kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in)
    torch.testing.assert_close(model.get_submodule(Q).base_layer.weight, weight + b @ a * (1 / math.sqrt(2)))
    for p, old in moments.items():  # magnitude pruning at 0.9: the largest 10% of each moment stay
        m, v = (method.optimizer.state[p][k] for k in ("exp_avg", "exp_avg_sq"))
        for now, was in ((m, old["exp_avg"]), (v, old["exp_avg_sq"])):
            kept = now != 0
            assert torch.equal(now[kept], was[kept])
            assert kept.float().mean() <= 0.1 + 1 / was.numel()
        kept_v = v != 0
        assert was_top(old["exp_avg_sq"], kept_v)
        assert not (m[~kept_v] != 0).any()  # prune_together: no m without its v


def was_top(was, kept):
    """kept marks the entries of largest magnitude."""
    return not (kept.any() and (~kept).any()) or bool(was[kept].abs().min() >= was[~kept].abs().max())


@pytest.mark.parametrize("together", [True, False])
def test_pruning_the_moments_apart_blows_up_the_next_step(tiny, together):
    """ReLoRA's code prunes m and v each on its own; where m stays and v goes, the step after a reset
    (A's gradient is zero while B = 0) is m / eps."""
    model, method = relora(tiny, "method.reset_every=1000", f"method.prune_together={together}")
    for _ in range(3):
        train_step(model, method, tiny)
    method.restarts.reset()
    for p in method.trainable.values():
        m, v = (method.optimizer.state[p][k] for k in ("exp_avg", "exp_avg_sq"))
        assert was_top(m, m != 0) if not together else True  # apart: each moment keeps its own largest
    a = {n: p.detach().clone() for n, p in method.trainable.items() if ".lora_A." in n}
    train_step(model, method, tiny)
    moved = max(float((method.trainable[n] - was).abs().max()) for n, was in a.items())
    assert (moved < 0.1) if together else (moved > 100)


def test_after_two_resets_the_update_has_a_rank_above_r(tiny):
    """reset_every=3: resets after updates 4 and 7; W - W0 is the sum of two merged rank-2 updates."""
    model, method = relora(tiny, "method.reset_every=3", "method.restart_warmup=1")
    w0 = model.get_submodule(Q).base_layer.weight.detach().clone()
    resets = []
    for _ in range(10):
        train_step(model, method, tiny)
        resets.append(method.restarts.resets)
    assert resets == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    delta = model.get_submodule(Q).base_layer.weight.detach() - w0
    s = torch.linalg.svdvals(delta)
    assert int((s > 1e-4 * s[0]).sum()) > 2  # rank 2 adapters
    lora_model = fresh(tiny)
    lora = build_method(*method_cfg("lora", "optimizer.lr=1e-2"), lora_model, 0)
    for _ in range(10):
        train_step(lora_model, lora, tiny)
    a, b = factors(lora_model)
    s = torch.linalg.svdvals(b @ a)
    assert int((s > 1e-4 * s[0]).sum()) <= 2  # LoRA's update stays within its rank


def test_pruning_ratio_one_resets_the_moments_and_zero_keeps_them():
    t = torch.randn(50, generator=torch.Generator().manual_seed(0))
    kept = t.clone()
    magnitude_prune_(kept, 0.0)
    assert torch.equal(kept, t)
    magnitude_prune_(t, 1.0)
    assert torch.equal(t, torch.zeros(50))


def test_the_jagged_cosine_warms_up_after_each_restart():
    f = lambda s: jagged_cosine(s, total=20, reset_every=5, restart_warmup=2, floor=0.01)  # noqa: E731
    cosine = lambda s: 0.01 + 0.99 * (1 + math.cos(math.pi * s / 20)) / 2  # noqa: E731
    assert [f(s) for s in (0, 1, 4)] == pytest.approx([cosine(0), cosine(1), cosine(4)])
    assert f(5) == 0 and f(6) == pytest.approx(0.5 * cosine(7)) and f(7) == pytest.approx(cosine(7))
    assert f(10) == 0 and f(11) == pytest.approx(0.5 * cosine(12)) and f(19) == pytest.approx(cosine(19))
    assert f(20) == 0  # a restart point; the cosine itself ends at the floor
    assert jagged_cosine(20, 20, 7, 2, 0.01) == pytest.approx(0.01)


def test_the_harness_runs_relora_on_its_jagged_cosine(tiny):
    """The method gives the loop ReLoRA's own schedule over the budget, down to 1e-6."""
    from omegaconf import OmegaConf

    _, method = relora(tiny, "method.reset_every=4", "method.restart_warmup=2")
    cfg = OmegaConf.create({"max_iters": 12, "iters_per_shot": None, "shots": 1})
    scheduler = method.scheduler(train.budget(cfg), train.ETA_MIN)
    rates = []
    for _ in range(12):
        rates.append(method.optimizer.param_groups[0]["lr"])
        scheduler.step()
    floor = 1e-6 / 1e-2
    assert rates == pytest.approx([1e-2 * jagged_cosine(s, 12, 4, 2, floor) for s in range(12)])
    assert rates[4] == 0 and rates[8] == 0 and rates[11] > 0


def test_trainable_params_and_saved_weights(tiny, tmp_path):
    """ReLoRA trains what LoRA trains; what it saves includes the weights it merged into."""
    model, method = relora(tiny, "method.reset_every=2", "method.restart_warmup=1")
    lora = build_method(*method_cfg("lora", "optimizer.lr=1e-2"), fresh(tiny), 0)
    assert method.trainable_params == lora.trainable_params and method.trainable.keys() == lora.trainable.keys()
    for _ in range(4):
        train_step(model, method, tiny)
    assert method.restarts.resets == 1
    save_trained(method, model, tmp_path / "trained.pt")
    loaded, method_loaded = relora(tiny, "method.reset_every=2", "method.restart_warmup=1")
    load_trained(method_loaded, loaded, tmp_path / "trained.pt")
    assert torch.equal(outputs(loaded, tiny), outputs(model, tiny))
    assert len(method.merged) == 2 * 12 * 3  # towers x blocks x (q, k, v)


def test_relora_refuses_dora_and_names_bad_settings(tiny):
    with pytest.raises(ValueError, match="method.dora=true: ReLoRA merges B A into the weight"):
        relora(tiny, "method.dora=true")
    with pytest.raises(ValueError, match="restart_warmup=500: expected an integer in \\[0, reset_every\\)"):
        relora(tiny, "method.restart_warmup=500")
    with pytest.raises(ValueError, match="prune_ratio=1.5: expected a fraction in \\[0, 1\\]"):
        relora(tiny, "method.prune_ratio=1.5")
