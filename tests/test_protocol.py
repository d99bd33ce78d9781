"""The protocol presets (configs/protocol/): budget and schedule, numerics, few-shot draw and crops as
the paper's text, the released SO code and CLIP-LoRA set them."""
import contextlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
import train
from so.clip.methods import Method, build_method
from so.clip.runtime import autocast, grad_scaler
from so.clip.step import Prompts
from so.clip.model import build_clip

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def config(tmp_path, *overrides):
    return main.compose("dataset=synthetic", "debug=fast", f"paths.cache_dir={tmp_path / 'cache'}",
                        f"paths.out_root={tmp_path / 'out'}", *overrides)


@pytest.fixture
def matmul_flags():
    """main.build sets torch's global TF32 flags: put them back."""
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


def learning_rates(cfg, steps):
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=cfg.optimizer.lr)
    scheduler = Method("sgd", {"w": weight}, optimizer).scheduler(train.budget(cfg), train.ETA_MIN)
    rates = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    return scheduler, rates


def test_official_so_trains_2000_per_shot_with_the_cosine_over_all_of_it(tmp_path):
    cfg = config(tmp_path, "protocol=official_so", "shots=4", "~debug")
    assert train.budget(cfg) == 8000
    assert (cfg.method.name, cfg.optimizer.density, cfg.optimizer.refresh_every,
            cfg.optimizer.lr) == ("so_reference_cli", 5e-5, 5, 2e-4)
    assert (cfg.seed, cfg.stop_loss, cfg.fewshot_sampler, cfg.crop_from_original) == (3, 0.01, "released", True)
    scheduler, rates = learning_rates(cfg, 8000)
    assert scheduler.T_max == 8000
    assert rates[3999] == pytest.approx((2e-4 + 1e-6) / 2, rel=1e-3)  # half-way down at half the budget
    assert rates[7998] > 1e-6 and rates[7999] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_the_paper_protocol_trains_at_most_2000_whatever_the_shots(tmp_path):
    for shots in (1, 16):
        cfg = config(tmp_path, f"shots={shots}", "~debug")
        assert train.budget(cfg) == 2000 and learning_rates(cfg, 1)[0].T_max == 2000
    assert train.budget(config(tmp_path, "shots=16", "iters_per_shot=10", "~debug")) == 160  # a key of its own


def test_a_method_on_the_command_line_wins_over_the_presets_method(tmp_path):
    assert config(tmp_path, "protocol=official_so", "method=adam").method.name == "adam"
    assert config(tmp_path, "protocol=clip_lora").method.name == "lora"


@pytest.mark.slow
def test_clip_lora_runs_exactly_500_per_shot_with_no_early_stop(tmp_path):
    """1 shot of 8 classes, one batch: LoRA fits it (the loss goes below 0.01, where the paper's
    protocol stops) and still runs the whole budget (iters_per_shot x shots: 150 here, to keep the test
    short), in fp16 autocast through a GradScaler."""
    cfg = config(tmp_path, "protocol=clip_lora", "shots=1", "~debug", "model=tiny")
    assert (train.budget(cfg), cfg.stop_loss, cfg.precision, cfg.method.name) == (500, None, "fp16", "lora")
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (2e-4, 1e-2)
    cfg = config(tmp_path, "protocol=clip_lora", "shots=1", "~debug", "model=tiny", "iters_per_shot=150",
                 "optimizer.lr=2e-2")  # the tiny random model needs larger steps to fit
    model, method, prompts, dataset = built(cfg)
    done = train.train(cfg, model, prompts, method, dataset.train_x, CPU)
    assert (done.iterations, done.stopped_early, done.diverged_at) == (150, False, None)
    assert done.final_loss < 0.01


def built(cfg):
    torch.manual_seed(0)
    model, _, tokenizer = build_clip(cfg.model.name)
    from datasets import build_dataset

    dataset = build_dataset("synthetic", cfg.dataset.root, cfg.shots, cfg.seed, cfg.paths.cache_dir,
                            sampler=cfg.fewshot_sampler)
    config = OmegaConf.to_container(cfg, resolve=True)
    method = build_method(config["method"], config["optimizer"], model, seed=cfg.seed)
    return model, method, Prompts(dataset, tokenizer, CPU), dataset


@pytest.mark.parametrize("protocol, tf32, precision", [("official_so", False, "highest"),
                                                        ("clip_lora", False, "highest"),
                                                        ("paper", True, "high")])
def test_tf32_is_as_the_preset_says(tmp_path, matmul_flags, protocol, tf32, precision):
    """official_so: pure fp32 (no autocast) with TF32 matmuls off, as the released code runs."""
    cfg = config(tmp_path, f"protocol={protocol}", "method=zeroshot")
    main.build(cfg)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == precision
    if protocol == "official_so":
        assert isinstance(autocast(cfg.precision, torch.device("cuda")), contextlib.nullcontext)


def test_fp16_refuses_an_optimizer_reading_gradients_in_backward():
    """A GradScaler unscales .grad after backward; SO reading them inside backward would see them scaled."""
    with pytest.raises(ValueError, match="precision=fp16 steps through a GradScaler.*sparse_backward=true read them inside backward"):
        grad_scaler("fp16", CPU, reads_in_backward=True)
    assert isinstance(grad_scaler("fp16", CPU, reads_in_backward=False), torch.amp.GradScaler)
    assert grad_scaler("bf16", CPU, True) is None and grad_scaler("fp32", CPU, True) is None
