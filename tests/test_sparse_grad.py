"""SO's weight gradients computed only at the support (so.sparse_grad): the same gradient as the dense
backward at every entry SO reads, for every switch, with accumulation, with and without the reads in
backward, in fp32 and under bf16 autocast; no dense weight gradient made; the weight-gradient GEMMs
gone from the FLOP count."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from so import SO, step_in_backward
from so.clip.model import build_clip, encode_text
from so.optim import flat
from so.sparse_grad import grad_at_entries, sparse_backward

pytestmark = pytest.mark.filterwarnings("ignore:SO. .* floor\\(density")
WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOKENS = torch.tensor([[49406, 320, 1929, 49407], [49406, 320, 1931, 49407], [49406, 320, 2368, 49407]])
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_clip("so-tiny")[0]


def images(i):
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(100 + i))


def setup(tiny, sparse, in_backward=False, **switches):
    model = copy.deepcopy(tiny).requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n.endswith(WEIGHTS)]
    for p in params:
        p.requires_grad_(True)
    optimizer = SO(params, lr=1e-2, density=0.05, refresh_every=2, weight_decay=0.01,
                   generator=torch.Generator().manual_seed(1), **switches)
    if sparse:
        sparse_backward(model, optimizer)
    if in_backward:
        step_in_backward(params, optimizer)
    return model, params, optimizer


def loss(model, i, precision):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        image = F.normalize(model.encode_image(images(i)), dim=-1)
        return F.cross_entropy(100 * image @ encode_text(model, TOKENS).T, LABELS)


SWITCHES = [{}, {"grad_selection": "topk"}, {"moment_selection": "random"}, {"moment_selection": "dense"},
            {"support": "static"}, {"momentum": False}, {"impl": "reference"}]


RTOL = {"fp32": 2e-5, "bf16": 3e-2}
CASES = ([(switches, "fp32", 1, False) for switches in SWITCHES]  # bf16 changes the arithmetic, not the switches
         + [(switches, precision, accumulate, in_backward) for switches in SWITCHES[:2]
            for precision, accumulate, in_backward in (("bf16", 1, False), ("fp32", 2, True))])


@pytest.mark.parametrize("switches, precision, accumulate, in_backward", CASES, ids=lambda v: (
    ",".join(f"{k}={x}" for k, x in v.items()) or "so") if isinstance(v, dict) else str(v))
def test_the_gradient_at_the_support_is_the_dense_one(tiny, switches, precision, accumulate, in_backward):
    """Step by step from the same weights and state: what the sparse backward hands SO equals the
    dense gradient at SO's support, to float rounding (bf16: the dense GEMM's rounding of dW);
    where the step needs the whole gradient (a topk redraw) the backward gives it, dense."""
    dense_model, dense_params, dense = setup(tiny, False, impl="reference",
                                             **{k: v for k, v in switches.items() if k != "impl"})
    sparse_model, sparse_params, sparse = setup(tiny, True, in_backward, **switches)
    whole = 0
    for step in range(5):
        for k in range(accumulate):
            loss(dense_model, accumulate * step + k, precision).backward()
            loss(sparse_model, accumulate * step + k, precision).backward()
        for p, q in zip(dense_params, sparse_params):
            if q in sparse._reads:  # read at the support in backward
                assert q.grad is None
                read, support = sparse._reads[q].values, sparse.state[q]["support"]
                expected = flat(p.grad, p)[support].float()
                torch.testing.assert_close(read, expected, rtol=0, atol=RTOL[precision] * float(p.grad.abs().max()))
            else:  # the step needs the whole gradient: given densely
                whole += 1
                assert switches.get("grad_selection") == "topk" and q.grad is not None
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=RTOL[precision] * float(p.grad.abs().max()))
        dense.step()
        sparse.step()
        for p, q in zip(dense_params, sparse_params):  # the same start for the next step
            q.data.copy_(p.data)
            q.grad = None
        sparse.load_state_dict(dense.state_dict())
        dense.zero_grad()
    assert whole == (3 * len(dense_params) if switches.get("grad_selection") == "topk" else 0)  # steps 1, 3, 5


def test_a_trial_follows_the_dense_backwards_loss(tiny):
    """Eight steps without resynchronising: the losses stay within float rounding of the dense run's
    (SO's sign-like Adam step and its top-k prune amplify rounding only where a gradient is near 0)."""
    curves = []
    for sparse in (False, True):
        model, _, optimizer = setup(tiny, sparse)
        curve = []
        for step in range(8):
            value = loss(model, step, "fp32")
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(value.item())
        curves.append(torch.tensor(curve))
    assert curves[0][0] - curves[0][-1] > 0.5  # it trains
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-3, atol=0)


def test_no_dense_weight_gradient_is_made_and_the_dw_gemms_are_gone(tiny):
    counts = {}
    for sparse in (False, True):
        model, params, optimizer = setup(tiny, sparse)
        made = []  # the dense gradients accumulated into .grad
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: made.extend([p] if p.grad is not None else []))
        with FlopCounterMode(display=False) as counter:
            loss(model, 0, "fp32").backward()
        counts[sparse] = counter.get_total_flops()
        assert (len(made), all(p.grad is None for p in params)) == ((0, True) if sparse else (len(params), False))
    tokens = {"visual": 6 * (16 + 1), "text": 3 * 4}  # batch x tokens: 4 x 4 patches + the class token; 3 prompts
    dw = sum(2 * tokens["visual" if n.startswith("visual.") else "text"] * p.numel()
             for n, p in tiny.named_parameters() if n.endswith(WEIGHTS))
    assert counts[False] - counts[True] == dw  # exactly the weight-gradient GEMMs of the 96 matrices


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_grad_at_entries_is_the_dense_gradient_in_memory_order(layout):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, generator=gen) if layout == "contiguous" else torch.randn(7, 5, generator=gen).t()
    x, dy = torch.randn(3, 4, 7, generator=gen), torch.randn(3, 4, 5, generator=gen)
    dense = dy.reshape(-1, 5).T @ x.reshape(-1, 7)
    support = torch.tensor([0, 3, 11, 34])
    torch.testing.assert_close(grad_at_entries(dy, x, support, weight), flat(dense, weight)[support])


def test_sparse_backward_needs_so_and_remove_restores_the_layers(tiny):
    model = copy.deepcopy(tiny)
    with pytest.raises(TypeError, match="sparse_backward needs an SO optimizer, got Adam"):
        sparse_backward(model, torch.optim.Adam(model.parameters()))
    model = copy.deepcopy(tiny)
    classes = {n: type(m) for n, m in model.named_modules()}
    optimizer = SO([dict(model.named_parameters())[n] for n, p in tiny.named_parameters() if n.endswith(WEIGHTS)])
    handle = sparse_backward(model, optimizer)
    swapped = {n for n, m in model.named_modules() if type(m) is not classes[n]}
    assert len(swapped) == 2 * 12 * 3  # per block of both towers: the attention and the MLP's two Linear layers
    handle.remove()
    assert {n: type(m) for n, m in model.named_modules()} == classes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_cuda_the_gradient_at_the_support_is_the_dense_one(tiny, precision):
    """The CUDA path of the same check: reads in backward against the dense gradient at the support."""
    device = torch.device("cuda")
    models, optimizers = [], []
    for sparse in (False, True):
        model = copy.deepcopy(tiny).to(device).requires_grad_(False)
        params = [p for n, p in model.named_parameters() if n.endswith(WEIGHTS)]
        for p in params:
            p.requires_grad_(True)
        optimizer = SO(params, lr=1e-2, density=0.05, generator=torch.Generator(device).manual_seed(1))
        if sparse:
            sparse_backward(model, optimizer)
        models.append(model)
        optimizers.append(optimizer)
    for model in models:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            image = F.normalize(model.encode_image(images(0).to(device)), dim=-1)
            value = F.cross_entropy(100 * image @ encode_text(model, TOKENS.to(device)).T, LABELS.to(device))
        value.backward()
    dense, sparse = optimizers
    for p, q in zip(dense.param_groups[0]["params"], sparse.param_groups[0]["params"]):
        expected = flat(p.grad, p)[sparse.state[q]["support"]].float()
        torch.testing.assert_close(sparse._reads[q].values, expected, rtol=0,
                                   atol=RTOL[precision] * float(p.grad.abs().max()))
