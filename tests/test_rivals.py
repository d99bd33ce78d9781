"""The sparse and zeroth-order rivals, each held to the rule that defines it: SPAM resets its moments at
each redraw; mask_adam's mask never moves and its step is Adam on the masked gradient; SIFT's mask is
the top entries of the first gradient; MeZO's estimate is the finite difference along the seeded
direction, the weights untouched by the two evaluations, and its hybrid steps one tower from the
gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from so import SO
from so.clip.mezo import MeZO, perturb_in_forward
from so.clip.optimizers import build_optimizer
from tests.test_methods import method_cfg

pytestmark = pytest.mark.filterwarnings("ignore:SO. .* floor\\(density")


def grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def optimizer(name, params, **overrides):
    """The optimizer of a configs/optimizer/ preset over named params, as the harness builds it."""
    cfg = method_cfg("so", f"optimizer={name}", *(f"optimizer.{k}={v}" for k, v in overrides.items()))[1]
    return build_optimizer({**cfg, "step_in_backward": False} if "step_in_backward" in cfg else cfg, params, seed=1)


def test_spam_resets_its_moments_and_redraws_its_mask_every_update_proj_gap_steps():
    torch.manual_seed(0)  # SPAM draws its masks from torch's global generator
    w = nn.Parameter(torch.zeros(40, 50))
    spam = optimizer("spam", {"w": w}, density=0.2, update_proj_gap=4, threshold=0)  # no spike clipping
    beta1 = 0.9
    fresh, masks = [], []
    for step, g in enumerate(grads((40, 50), 12), 1):
        masks.append(spam.state[w]["mask"].clone())
        w.grad = g.clone()
        spam.step()
        m, first = spam.state[w]["exp_avg"], (1 - beta1) * g[masks[-1]]  # the moment of a first step
        fresh.append(m.shape == first.shape and torch.allclose(m, first))
    # a new mask after updates 3, 7, 11; the first update on each new mask starts from zero moments
    changed = [s for s in range(1, 12) if not torch.equal(masks[s], masks[s - 1])]
    assert changed == [3, 7, 11] and abs(float(masks[0].float().mean()) - 0.2) < 0.01
    assert [s for s, is_fresh in enumerate(fresh, 1) if is_fresh] == [1, 4, 8, 12]


def test_mask_adam_never_moves_its_mask_and_is_adam_on_the_masked_gradient():
    w = nn.Parameter(torch.randn(30, 20, generator=torch.Generator().manual_seed(3)))
    twin = nn.Parameter(w.detach().clone())
    so = optimizer("mask_adam", {"w": w}, density=0.1, lr=1e-2)
    adam = torch.optim.Adam([twin], lr=1e-2)
    start = w.detach().clone()
    for g in grads((30, 20), 15):
        w.grad = g.clone()
        so.step()
        mask = torch.zeros(600, dtype=torch.bool)
        mask[so.state[w]["support"]] = True
        twin.grad = g * mask.view(30, 20)  # outside the mask Adam's moments stay 0: no move
        adam.step()
    moved = (w.detach() != start).view(-1)
    assert torch.equal(moved, mask) and int(mask.sum()) == 60  # only the first draw's 60 entries ever moved
    torch.testing.assert_close(w.detach(), twin.detach(), rtol=1e-5, atol=1e-7)


def test_sift_keeps_the_top_entries_of_the_first_gradient():
    w = nn.Parameter(torch.zeros(25, 16))
    sift = optimizer("sift", {"w": w}, density=0.05, lr=1e-2)
    first, *rest = grads((25, 16), 6, seed=5)
    w.grad = first.clone()
    sift.step()
    top = first.abs().view(-1).topk(20).indices.sort().values
    assert torch.equal(sift.state[w]["support"], top)
    for g in rest:
        w.grad = g.clone()
        sift.step()
        assert torch.equal(sift.state[w]["support"], top)  # chosen once
    assert torch.equal(torch.nonzero(w.detach().view(-1)).squeeze(1), top)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def mlp_loss(model):
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(10) % 3
    return F.cross_entropy(model(x), y)


def test_mezo_estimate_is_the_finite_difference_along_the_seeded_direction_and_the_weights_stay():
    model = mlp()
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    mezo = MeZO(list(params.items()), lr=1e-2, eps=1e-4)
    perturb_in_forward(model, mezo)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mezo.steps = 1  # the direction of the first step
    projected, _ = mezo.estimate(lambda: mlp_loss(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # exactly as they were
    plus, minus = mlp(), mlp()  # the same weights, moved by hand
    with torch.no_grad():
        for name, p in params.items():
            dict(plus.named_parameters())[name].add_(1e-4 * mezo.direction(p))
            dict(minus.named_parameters())[name].sub_(1e-4 * mezo.direction(p))
    expected = (mlp_loss(plus) - mlp_loss(minus)) / 2e-4
    torch.testing.assert_close(projected, expected, rtol=1e-8, atol=1e-12)
    mezo.steps = 0
    mezo.step(lambda: mlp_loss(model))  # step 1: W -= lr c z, and no gradient anywhere
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), before[name] - 1e-2 * projected * mezo.direction(p), rtol=0, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())


def test_the_hybrid_steps_one_tower_from_its_gradient_and_the_other_zeroth_order():
    """'visual.' names the vision tower; here the first layer plays it (zeroth-order, sign steps), the
    second the text tower (Adam on its gradient)."""
    model = mlp()
    named = {"visual.0.weight": model[0].weight, "2.weight": model[2].weight}
    before = {n: p.detach().clone() for n, p in named.items()}
    hybrid = MeZO(list(named.items()), lr=1e-3, eps=1e-4, update="sign", zeroth_order="vision", first_order_lr=1e-2)
    perturb_in_forward(model, hybrid)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    hybrid.step(lambda: mlp_loss(model))
    zo_move = (model[0].weight.detach() - before["visual.0.weight"]).abs()
    assert torch.allclose(zo_move, torch.full_like(zo_move, 1e-3))  # sign steps: every entry by lr
    adam_move = (model[2].weight.detach() - before["2.weight"]).abs()
    assert torch.allclose(adam_move, torch.full_like(adam_move, 1e-2), rtol=1e-3)  # Adam's first step: lr sign(g)
    assert model[0].weight.grad is None and model[2].weight.grad is not None


def test_mezo_refuses_a_parameter_it_cannot_perturb_in_forward():
    model = mlp()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    mezo = MeZO([("a", model[0].weight), ("bias", extra)], lr=1e-3)
    with pytest.raises(ValueError, match="1 of the parameters it steps zeroth-order are not such weights"):
        perturb_in_forward(model, mezo)


@pytest.mark.slow  # main.py in a subprocess
def test_every_rival_runs_the_demo(tmp_path):
    from tests.test_main import DEMO, main_py, results

    rivals = ("spam", "mask_adam", "sift", "mezo", "mezo_hybrid")
    main_py(tmp_path, *DEMO, f"method={','.join(rivals)}", multirun=True)
    main_py(tmp_path, *DEMO, "method=lora", "optimizer=so")  # SO on LoRA's factors
    found = {res["method"]: res for res in results(tmp_path).values()}
    assert sorted(found) == sorted([*rivals, "lora+so"])
    assert all(r["status"] == "finished" and r["iterations"] == 4 for r in found.values())
    assert len({r["trainable_params"] for m, r in found.items() if m != "lora+so"}) == 1  # the same weights
