"""What trains (method=) and how it steps (optimizer=) as two choices: every preset builds what it built
when the two were one config, any sensible pair trains, and a pair that cannot work fails with one
message naming both keys."""
import hashlib
import json

import pytest
import torch

from so.clip.methods import build_method
from so.clip.model import build_clip, encode_text
from tests.test_methods import method_cfg

ADAM_GROUP = {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False,
              "foreach": True, "capturable": False, "differentiable": False, "fused": None,
              "decoupled_weight_decay": False}
ADAMW_GROUP = ADAM_GROUP | {"weight_decay": 0.01, "decoupled_weight_decay": True}
SO_GROUP = {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "density": 5e-4, "refresh_every": 10,
            "grad_selection": "random", "moment_selection": "topk", "support": "dynamic", "momentum": True,
            "dense": False, "impl": "batched"}
WEIGHTS = (96, 1_179_648, "3df9615cd84c7440")  # tensors, entries, digest of (name, shape) in order: so-tiny
LORA = (144, 18_432, "35d671bb23dbf7fd")
# What each method preset built before method= and optimizer= were two groups, measured then on so-tiny
# (seed 0): the optimizer's class and its param group, the trainable set, the merged weights, whether
# gradients are read inside backward.
BEFORE = {
    "so": ("SO", SO_GROUP, WEIGHTS, 0, True),
    "so_reference_cli": ("SO", SO_GROUP | {"density": 5e-5, "refresh_every": 5}, WEIGHTS, 0, True),
    "adam": ("Adam", ADAM_GROUP, WEIGHTS, 0, False),
    "lora": ("AdamW", ADAMW_GROUP, LORA, 0, False),
    "dora": ("AdamW", ADAMW_GROUP, (216, 23_040, "51c486357fd28300"), 0, False),
    "relora": ("AdamW", ADAMW_GROUP, LORA, 72, False),  # was AdamW's subclass ReLoRA: the restarts are the method's
    "galore": ("GaLore", {"lr": 2e-4, "rank": 2, "update_proj_gap": 200, "scale": 0.25, "betas": [0.9, 0.999],
                          "eps": 1e-6, "weight_decay": 0.0}, WEIGHTS, 0, False),
    "zeroshot": (None, None, (0, 0, "4f53cda18c2baa0c"), 0, False),
}


def built(name, *overrides):
    torch.manual_seed(0)
    model = build_clip("so-tiny")[0]
    return model, build_method(*method_cfg(name, *overrides), model, seed=1)


def trainable_set(method):
    shapes = [(n, list(p.shape)) for n, p in method.trainable.items()]
    return len(shapes), method.trainable_params, hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", list(BEFORE))
def test_each_preset_builds_what_it_built_before(name):
    _, method = built(name)
    optimizer = method.optimizer
    groups = None if optimizer is None else [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
        for g in optimizer.param_groups]
    cls, group, trainable, merged, in_backward = BEFORE[name]
    assert (type(optimizer).__name__ if optimizer else None, groups) == (cls, group and [group])
    assert (trainable_set(method), len(method.merged), method.reads_in_backward) == (trainable, merged, in_backward)
    assert method.name == name
    if name == "relora":
        restarts = method.restarts
        assert (restarts.reset_every, restarts.restart_warmup, restarts.prune_ratio, restarts.prune_together) == \
            (500, 10, 0.9, True)


def test_so_on_loras_factors_moves_only_their_support():
    model, method = built("lora", "optimizer=so", "optimizer.lr=1e-2", "optimizer.density=0.25")
    assert method.name == "lora+so" and trainable_set(method) == LORA and method.reads_in_backward
    assert type(method.optimizer).__name__ == "SO" and method.counts_updates
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    for _ in range(2):
        text = encode_text(model, torch.tensor([[49406, 320, 1929, 49407], [49406, 320, 1931, 49407]]))
        image = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        torch.nn.functional.cross_entropy(100 * image @ text.T, labels).backward()
        method.optimizer.step()
        method.optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(method.trainable)
    for n in changed:  # at most 2M entries of each factor move per step, M = floor(0.25 N): 2 steps
        assert int((method.trainable[n] != before[n]).sum()) <= 4 * int(0.25 * before[n].numel())


@pytest.mark.parametrize("pair, cls", [(("lora", "adam"), "Adam"), (("so", "adamw"), "AdamW"),
                                       (("adam", "so"), "SO"), (("relora", "galore"), "GaLore"),
                                       (("so", "galore"), "GaLore")])
def test_any_sensible_pair_builds(pair, cls):
    method_name, optimizer_name = pair
    _, method = built(method_name, f"optimizer={optimizer_name}")
    assert type(method.optimizer).__name__ == cls and method.name == f"{method_name}+{optimizer_name}"
    assert method.reads_in_backward == (optimizer_name == "so")


@pytest.mark.parametrize("overrides, message", [
    (("method=zeroshot", "optimizer=so"), r"method=zeroshot with optimizer=so: zero-shot trains nothing"),
    (("method=lora", "optimizer=none"), r"method=lora with optimizer=none: nothing would step .*optimizer=adamw"),
    (("method=relora", "optimizer=so"), r"method=relora with optimizer=so: ReLoRA prunes the optimizer's Adam moments"),
    (("method=so", "optimizer.density=2"), r"optimizer\.density=2: expected a number in \(0, 1\]"),
    (("method=lora", "optimizer=adam", "optimizer.lr=-1"), r"optimizer=adam: Invalid learning rate: -1"),
    (("method=so", "+optimizer.foo=1"), r"optimizer=so: unknown keys \['foo'\]; SO takes \[.*'density'"),
    (("method=so", "method.matrices=[c_fc,fc2]"), r"method\.matrices=\['c_fc', 'fc2'\]: expected a non-empty list"),
])
def test_a_pair_or_value_that_cannot_work_is_one_message(overrides, message):
    method, optimizer = method_cfg(overrides[0].removeprefix("method="), *overrides[1:])
    with pytest.raises(ValueError, match=message):
        build_method(method, optimizer, build_clip("so-tiny")[0], seed=0)


def test_matrices_choose_the_weights_of_each_block():
    _, method = built("so", "method.matrices=[c_fc,c_proj]", "method.encoder=vision")
    assert sorted({n.rsplit(".", 2)[-2] for n in method.trainable}) == ["c_fc", "c_proj"]
    assert len(method.trainable) == 2 * 12 and all(n.startswith("visual.") for n in method.trainable)
