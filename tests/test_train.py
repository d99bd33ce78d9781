"""The harness's early-stop rule on the tiny model and the synthetic dataset."""
import pytest
import torch
import yaml
from omegaconf import OmegaConf

import train
from datasets import build_dataset
from so.methods import build_method
from so.model import build_clip

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return lambda shots: build_dataset("synthetic", root / "synthetic", shots, 1, root / "cache")


def run_train(dataset, lr, **cfg):
    torch.manual_seed(0)
    model, _, tokenizer = build_clip("so-tiny")
    method = build_method(yaml.safe_load(open("configs/method/adam.yaml")), model, lr=lr, seed=1)
    cfg = OmegaConf.create({"seed": 1, "batch_size": 32, "precision": "auto", **cfg})
    prompts = train.Prompts(dataset, tokenizer, CPU)
    return train.train(cfg, model, prompts, method, dataset.train_x, CPU)


def test_stops_after_the_first_full_pass_whose_mean_loss_is_below_stop_loss(data):
    dataset = data(4)  # 40 images, batch 32: a full pass is 2 iterations
    assert run_train(dataset, 1e-4, max_iters=50, stop_loss=1e9)[:2] == (2, True)


def test_runs_to_max_iters_when_the_loss_stays_above_stop_loss(data):
    iterations, stopped_early, loss = run_train(data(4), 1e-4, max_iters=5, stop_loss=0.0)
    assert (iterations, stopped_early) == (5, False) and loss > 0


def test_stops_early_on_a_set_it_can_fit(data):
    iterations, stopped_early, loss = run_train(data(1), 1e-3, max_iters=600, stop_loss=0.01)
    assert stopped_early and loss < 0.01 and iterations < 600
