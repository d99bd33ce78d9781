"""SO as a drop-in torch.optim optimizer: what torch's own optimizers accept, SO accepts or refuses with
their error types, and it never moves a parameter silently wrong."""
import pytest
import torch

from so import SO, step_in_backward


def _twin_runs(make, to_twin, impl, grad_selection, in_backward, steps=6):
    """A parameter in an unusual layout and its contiguous twin (the same entries in the same memory
    order), stepped by two SO optimizers of the same seed on the same gradients: the pair of final
    parameters, the unusual one brought to the twin's layout."""
    gen = torch.Generator().manual_seed(0)
    odd = make(gen)
    assert not odd.is_contiguous()
    twin = to_twin(odd).detach().clone().contiguous().requires_grad_()
    kwargs = dict(lr=1e-2, density=0.2, refresh_every=2, weight_decay=0.01, impl=impl,
                  grad_selection=grad_selection)
    opts = [SO([odd], generator=torch.Generator().manual_seed(1), **kwargs),
            SO([twin], generator=torch.Generator().manual_seed(1), **kwargs)]
    if in_backward:
        for p, opt in zip((odd, twin), opts):
            step_in_backward([p], opt)
    for _ in range(steps):
        weights = torch.randn(odd.shape, generator=gen)
        (odd * weights).square().sum().backward()
        (twin * to_twin(weights)).square().sum().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return to_twin(odd).detach(), twin.detach()


LAYOUTS = {
    "transposed": (lambda g: torch.randn(6, 9, generator=g).t().requires_grad_(), lambda t: t.t()),
    "channels_last": (lambda g: torch.randn(4, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
                      .requires_grad_(), lambda t: t.permute(0, 2, 3, 1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl", ["batched", "reference"])
@pytest.mark.parametrize("grad_selection", ["random", "topk"])
@pytest.mark.parametrize("in_backward", [False, True])
def test_a_non_contiguous_parameter_trains_as_its_contiguous_twin(layout, impl, grad_selection, in_backward):
    odd, twin = _twin_runs(*LAYOUTS[layout], impl, grad_selection, in_backward)
    assert torch.equal(odd, twin)
    assert int((odd != _twin_runs(*LAYOUTS[layout], impl, grad_selection, in_backward, steps=0)[0]).sum()) > 0


def test_an_overlapping_parameter_is_refused_naming_its_strides():
    p = torch.zeros(3).requires_grad_()
    overlapping = p.detach().expand(4, 3).requires_grad_()
    with pytest.raises(ValueError, match=r"strides \(0, 1\) overlaps itself"):
        SO([overlapping])


def test_a_complex_parameter_is_refused_never_half_trained():
    """The rule indexes real entries; casting a complex gradient with .float() would drop its imaginary
    part and leave the imaginary part of the weights where it was, with only a warning."""
    with pytest.raises(ValueError, match=r"complex; SO's supports index real entries: train torch.view_as_real"):
        SO([torch.zeros(4, dtype=torch.complex64, requires_grad=True)], density=1.0)
    with pytest.raises(ValueError, match="complex"):
        SO([torch.zeros(4, requires_grad=True)]).add_param_group(
            {"params": [torch.zeros(4, dtype=torch.complex64, requires_grad=True)]})


def test_a_sparse_gradient_raises_runtime_error_as_torch_optimizers_do():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = SO(embedding.parameters(), density=0.5)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    with pytest.raises(RuntimeError, match="sparse"):  # torch's own optimizers raise the same type
        torch.optim.Adam(embedding.parameters()).step()


def test_a_tensor_learning_rate_has_one_element():
    p = torch.zeros(10, requires_grad=True)
    with pytest.raises(ValueError, match=r"lr=tensor\(\[0.1000, 0.2000\]\): expected a number >= 0 or a one-element tensor"):
        SO([p], lr=torch.tensor([0.1, 0.2]))
    opt = SO([p], lr=torch.tensor(0.1), density=1.0)
    p.grad = torch.ones(10)
    opt.step()
    assert torch.allclose(p, torch.full((10,), -0.1))


def test_step_leaves_grad_as_torch_optimizers_do_and_free_grads_frees_it():
    """torch.optim never touches .grad in step() (gradient logging and clipping reports read it
    after); free_grads=True is SO's opt-in release."""
    for free in (False, True):
        p = torch.zeros(20, requires_grad=True)
        opt = SO([p], density=0.25, free_grads=free)
        grad = torch.randn(20)
        p.grad = grad.clone()
        opt.step()
        assert (p.grad is None) if free else torch.equal(p.grad, grad)
    with pytest.raises(ValueError, match="free_grads='yes': expected True or False"):
        SO([p], free_grads="yes")


def test_free_grads_survives_a_copy_and_a_pickle():
    import copy
    import io

    opt = SO([torch.zeros(4, requires_grad=True)], free_grads=True)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    for again in (copy.deepcopy(opt), torch.load(buffer, weights_only=False)):
        assert again.free_grads is True and again.seed == opt.seed
