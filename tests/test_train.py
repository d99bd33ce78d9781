"""The harness's early-stop rule on the tiny model and the synthetic dataset."""
import math

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import train
from datasets import build_dataset
from datasets.pipeline import TrainImages
from so.clip import runtime
from so.clip.methods import build_method
from so.clip.model import build_clip
from so.clip.step import Prompts, forward_loss, train_step
from tests.test_methods import method_cfg

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return lambda shots: build_dataset("synthetic", root / "synthetic", shots, 1, root / "cache")


def build(dataset, lr, method, grad_checkpointing=False, *overrides):
    """The tiny model (seed 0), the method preset (with `overrides`) at learning rate `lr`, the prompts."""
    torch.manual_seed(0)
    model, _, tokenizer = build_clip("so-tiny")
    model.set_grad_checkpointing(grad_checkpointing)
    method = build_method(*method_cfg(method, f"optimizer.lr={lr}", *overrides), model, seed=1)
    return model, method, Prompts(dataset, tokenizer, CPU)


def run_train(dataset, lr, method="adam", grad_checkpointing=False, **cfg):
    model, method, prompts = build(dataset, lr, method, grad_checkpointing)
    protocol = yaml.safe_load(open("configs/protocol/paper.yaml"))  # the default protocol's keys
    cfg = OmegaConf.create({**protocol, "seed": 1, "shots": dataset.shots, "batch_size": 8, "compile": "none",
                            **cfg})
    return train.train(cfg, model, prompts, method, dataset.train_x, CPU)


def test_stops_after_the_first_full_pass_whose_mean_loss_is_below_stop_loss(data):
    dataset = data(4)
    full_pass = -(-len(dataset.train_x) // 8)
    assert full_pass >= 2  # the rule must wait for the pass to end, not stop after one batch
    done = run_train(dataset, 1e-4, max_iters=50, stop_loss=1e9)
    assert (done.iterations, done.stopped_early, done.diverged_at) == (full_pass, True, None)


def test_runs_to_max_iters_when_the_loss_stays_above_stop_loss(data):
    done = run_train(data(4), 1e-4, max_iters=5, stop_loss=0.0)
    assert (done.iterations, done.stopped_early) == (5, False) and done.final_loss > 0


def test_stops_early_on_a_set_it_can_fit(data):
    dataset = data(1)  # one image per class, in one full batch
    done = run_train(dataset, 1e-3, max_iters=600, stop_loss=0.01, batch_size=len(dataset.train_x))
    assert done.stopped_early and done.final_loss < 0.01 and done.iterations < 600


def test_grad_checkpointing_keeps_the_loss_trajectory(data):
    """SO steps inside backward while checkpointed blocks recompute: same numbers as without."""
    plain, checkpointed = (run_train(data(4), 1e-3, "so", flag, max_iters=8, stop_loss=0.0) for flag in (False, True))
    assert plain.iterations == checkpointed.iterations == 8
    assert abs(plain.final_loss - checkpointed.final_loss) < 1e-5 * abs(plain.final_loss)


@pytest.mark.parametrize("method", ["so", "adam"])
def test_a_non_finite_loss_stops_training_at_once(data, method):
    done = run_train(data(4), 1e30, method, max_iters=40, stop_loss=0.0)
    assert done.diverged_at is not None and done.iterations == done.diverged_at < 40
    assert done.final_loss is None or math.isfinite(done.final_loss)


def test_compile_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="compile='fast': expected one of none, default"):
        runtime.compiled(forward_loss, "fast")


def _failing_backend(graph, example_inputs):
    raise RuntimeError("this backend cannot compile")


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("backend", ["aot_eager", _failing_backend])
def test_compiled_step_keeps_the_loss_trajectory(data, monkeypatch, backend):
    """compile=default through torch.compile (aot_eager here: inductor needs minutes on 2 CPU
    cores), SO reading gradients inside the compiled backward; a backend that fails falls back
    to eager. Same numbers as the eager step either way."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode: compile_(fn, backend=backend))
    with torch._dynamo.config.patch(suppress_errors=False):  # restored afterwards
        eager, compiled = (run_train(data(4), 1e-3, "so", max_iters=4, stop_loss=0.0, compile=mode)
                           for mode in ("none", "default"))
        assert torch._dynamo.config.suppress_errors
    assert eager.iterations == compiled.iterations == 4
    assert abs(eager.final_loss - compiled.final_loss) < 1e-5 * abs(eager.final_loss)


def test_claim_gpu_takes_one_no_other_trial_holds(monkeypatch, tmp_path):
    import fcntl
    import tempfile
    from types import SimpleNamespace

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"GPU-{i}"))
    monkeypatch.setattr(runtime, "_claimed", {})
    held = [open(tmp_path / f"so-clip-gpu-GPU-{i}.lock", "w") for i in (0, 1)]  # two other trials
    for handle in held:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert runtime.claim_gpu() == 2
    held[0].close()  # GPU 0 frees up, but this process keeps the GPU it holds
    assert runtime.claim_gpu() == 2
    with pytest.raises(BlockingIOError):
        fcntl.flock(open(tmp_path / "so-clip-gpu-GPU-2.lock", "w"), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _trajectory(dataset, batches, precision, in_backward):
    """Per-iteration losses of SO (the paper's density, lr 1e-2) on the tiny model."""
    model, method, prompts = build(dataset, 1e-2, "so", False, f"optimizer.step_in_backward={in_backward}")
    model.train()
    return torch.stack([train_step(model, prompts, images, labels, method.optimizer, precision, CPU)
                        for images, labels in batches])


def test_fast_step_follows_the_plain_step(data):
    """The harness's fast step on GPU (bf16 autocast over fp32 master weights, SO reading each
    gradient in backward) against the plain one (fp32, SO after backward), iteration by iteration:
    within bf16 tolerance of each other while the loss falls by far more than that."""
    dataset = data(4)
    images = TrainImages(dataset.train_x, CPU, 32, (0.5,) * 3, (0.25,) * 3,
                               generator=torch.Generator().manual_seed(0))
    batch = (images.batch(torch.arange(len(dataset.train_x))), torch.tensor([r.label for r in dataset.train_x]))
    plain = _trajectory(dataset, [batch] * 15, "fp32", False)
    fast = _trajectory(dataset, [batch] * 15, "bf16", True)
    assert plain[0] - plain[-1] > 1.5  # it trains
    torch.testing.assert_close(fast, plain, rtol=3e-2, atol=0)
