import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from main import compose
from so.clip.lora import SplitAttention
from so.clip.methods import block_indices, build_method, load_trained, save_trained, select_weights
from so.clip.model import build_clip, encode_text, tokenize

METHOD_DIR = Path(__file__).resolve().parents[1] / "configs" / "method"
BLOCKS = {"all": list(range(12)), "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11],
          "half-bottom": [0, 1, 2, 3, 4, 5], "half-up": [6, 7, 8, 9, 10, 11], "top3": [9, 10, 11]}
TOWERS = {"vision": ["visual.transformer"], "text": ["transformer"],
          "both": ["visual.transformer", "transformer"]}
PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a photo of a small red bird."]


def method_cfg(name, *overrides):
    """(method, optimizer) configs of preset `name` with `overrides`, composed as main.py composes them."""
    cfg = OmegaConf.to_container(compose("dataset=synthetic", f"method={name}", *overrides), resolve=True)
    return cfg["method"], cfg["optimizer"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, tokenizer = build_clip("so-tiny")
    tokens = tokenize(tokenizer, PROMPTS, "cpu")
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, tokens, images, torch.tensor([0, 1, 2, 0, 1, 2])


def fresh(tiny):
    return copy.deepcopy(tiny[0])


def outputs(model, tiny):
    model.eval()
    with torch.enable_grad():  # no nn.MultiheadAttention inference fast path: same kernels as training
        text, image = encode_text(model, tiny[1]), model.encode_image(tiny[2])
    return torch.cat([text.flatten(), image.flatten()]).detach()


def train_step(model, method, tiny):
    _, tokens, images, labels = tiny
    model.train()
    image_features = F.normalize(model.encode_image(images), dim=-1)
    loss = F.cross_entropy(100 * image_features @ encode_text(model, tokens).T, labels)
    loss.backward()
    method.optimizer.step()
    method.optimizer.zero_grad(set_to_none=True)


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_configs_compose_with_their_defaults():
    assert OmegaConf.load(METHOD_DIR.parent / "optimizer" / "so.yaml").density == 5e-4
    method, cli = method_cfg("so_reference_cli")
    assert [method[k] for k in ("name", "kind", "label")] == ["so_reference_cli", "weights", "so_reference_cli"]
    assert [cli[k] for k in ("name", "kind", "step_in_backward")] == ["so_reference_cli", "so", True]
    assert [cli[k] for k in ("density", "refresh_every")] == [5e-5, 5]
    assert [cli[k] for k in ("lr", "grad_selection")] == [2e-4, "random"]  # from optimizer/so.yaml
    dora, adamw = method_cfg("dora")
    assert [dora[k] for k in ("name", "kind", "dora", "label")] == ["dora", "lora", True, "dora"]
    assert [dora[k] for k in ("rank", "alpha", "dropout")] == [2, 1, 0.25]  # from lora.yaml
    assert (adamw["name"], adamw["weight_decay"]) == ("adamw", 1e-2)
    relora, adamw = method_cfg("relora")
    assert [relora[k] for k in ("name", "kind", "rank", "targets", "dora")] == ["relora", "relora", 2, ["q", "k", "v"],
                                                                              False]
    assert [relora[k] for k in ("reset_every", "restart_warmup", "prune_ratio", "prune_together")] == [500, 10, 0.9,
                                                                                                       True]
    assert adamw == {"name": "adamw", "kind": "adamw", "lr": 2e-4, "betas": [0.9, 0.999], "weight_decay": 1e-2}


@pytest.mark.parametrize("path", sorted(METHOD_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_preset_names_the_optimizer_it_steps_with(path):
    """A preset's default_optimizer is the optimizer its defaults choose: its runs keep their name,
    another optimizer= is named <method>+<optimizer>."""
    method, optimizer = method_cfg(path.stem)
    assert method["default_optimizer"] == optimizer["name"] and method["label"] == method["name"] == path.stem
    other = "adam" if optimizer["name"] != "adam" else "adamw"
    if method["kind"] != "zeroshot":
        assert method_cfg(path.stem, f"optimizer={other}")[0]["label"] == f"{path.stem}+{other}"


def test_method_configs_are_plain_yaml_floats():
    """Floats are written 2.0e-4, not 2e-4, so plain YAML loaders (the benchmarks) read numbers too."""
    import yaml

    for path in [*METHOD_DIR.glob("*.yaml"), *METHOD_DIR.parent.glob("optimizer/*.yaml")]:
        cfg = yaml.safe_load(path.read_text())
        for key, value in cfg.items():
            assert not (isinstance(value, str) and value[:1].isdigit()), f"{path.name}: {key}={value!r}"


@pytest.mark.parametrize("encoder", list(TOWERS))
def test_selection_for_every_encoder_and_position(tiny, encoder):
    model = fresh(tiny)
    for position, blocks in BLOCKS.items():
        model.requires_grad_(False)
        chosen = select_weights(model, encoder, position)
        expected = {f"{tower}.resblocks.{i}.{w}" for tower in TOWERS[encoder] for i in blocks
                    for w in ("attn.in_proj_weight", "attn.out_proj.weight",
                              "mlp.c_fc.weight", "mlp.c_proj.weight")}
        assert set(chosen) == expected
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
        # width 64: in_proj 3*64*64 + out_proj 64*64 + c_fc and c_proj 2*64*256 per block
        assert sum(p.numel() for p in chosen.values()) == len(TOWERS[encoder]) * len(blocks) * 49152


def test_invalid_settings_name_the_key(tiny):
    model = fresh(tiny)
    with pytest.raises(ValueError, match=r"method.encoder='image'.*text.*vision.*both"):
        build_method(*method_cfg("adam", "method.encoder=image", "optimizer.lr=1e-3"), model, 0)
    with pytest.raises(ValueError, match=r"method.position='top2'.*half-up"):
        build_method(*method_cfg("adam", "method.position=top2", "optimizer.lr=1e-3"), model, 0)
    with pytest.raises(ValueError, match=r"unknown keys \['rank'\]"):
        build_method(*method_cfg("adam", "+method.rank=2", "optimizer.lr=1e-3"), model, 0)
    with pytest.raises(ValueError, match=r"method.kind='sgd'"):
        build_method({"name": "sgd", "kind": "sgd"}, method_cfg("adam")[1], model, 0)
    with pytest.raises(ValueError, match=r"method.targets=\['q', 'x'\]"):
        build_method(*method_cfg("lora", "method.targets=[q,x]", "optimizer.lr=1e-3"), model, 0)


def test_vit_b16_trainable_counts():
    model = build_clip("ViT-B-16-quickgelu")[0]
    vision = sum(p.numel() for p in select_weights(model, "vision", "all").values())
    text = sum(p.numel() for p in select_weights(model, "text", "all").values())
    assert (vision, text) == (84_934_656, 37_748_736)
    assert build_method(*method_cfg("adam", "optimizer.lr=2e-4"), model, 0).trainable_params == 122_683_392
    lora = build_method(*method_cfg("lora", "optimizer.lr=2e-4"), model, 0)
    assert lora.trainable_params == 184_320  # 12 blocks x 3 (q, k, v) x 2 x rank 2 x (768 + 512)
    assert len(lora.trainable) == 2 * 12 * 3 * 2
    relora = build_method(*method_cfg("relora"), build_clip("ViT-B-16-quickgelu")[0], 0)  # LoRA's factors again
    assert relora.trainable_params == 184_320 and len(relora.merged) == 2 * 12 * 3
    galore = build_method(*method_cfg("galore"), build_clip("ViT-B-16-quickgelu")[0], 0)
    assert galore.trainable_params == 122_683_392 and len(galore.trainable) == 96  # SO's weights


def test_so_passes_every_switch_and_seeds_its_generator(tiny):
    cfg = method_cfg("so", "optimizer.grad_selection=topk", "optimizer.moment_selection=dense",
                     "optimizer.support=static", "optimizer.momentum=false",
                     "optimizer.density=0.01", "optimizer.lr=3e-4")
    method = build_method(*cfg, fresh(tiny), 0)
    group = method.optimizer.param_groups[0]
    assert (group["lr"], group["density"], group["refresh_every"]) == (3e-4, 0.01, 10)
    assert (group["grad_selection"], group["moment_selection"], group["support"], group["momentum"]) \
        == ("topk", "dense", "static", False)
    assert method.trainable_params == 2 * 12 * 49152


def test_so_in_backward_matches_a_plain_step(tiny):
    _, tokens, images, labels = tiny
    results = []
    for in_backward in (True, False):
        model = fresh(tiny)
        method = build_method(*method_cfg("so", f"optimizer.step_in_backward={in_backward}",
                                          "optimizer.sparse_backward=false", "optimizer.lr=1e-2"), model, 7)
        before = snapshot(model)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        F.cross_entropy(100 * image_features @ encode_text(model, tokens).T, labels).backward()
        moved = [n for n, p in method.trainable.items() if not torch.equal(p, before[n])]
        freed = [n for n, p in method.trainable.items() if p.grad is None]  # read in backward
        assert not moved and len(freed) == (len(method.trainable) if in_backward else 0)
        method.optimizer.step()
        method.optimizer.zero_grad(set_to_none=True)
        results.append(snapshot(model))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


@pytest.mark.parametrize("name", ["so", "adam", "lora", "dora", "relora", "galore"])
def test_only_trainable_tensors_change(tiny, name):
    model = fresh(tiny)
    method = build_method(*method_cfg(name, "optimizer.lr=1e-3"), model, 0)
    assert method.trainable == {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = snapshot(model)
    train_step(model, method, tiny)
    after = snapshot(model)
    assert before.keys() == after.keys()
    for n in before:
        changed = (before[n] != after[n]).sum().item()
        if n not in method.trainable:
            assert changed == 0, n
        elif name == "so":  # first step: only the M = floor(density * N) drawn entries move
            assert 1 <= changed <= max(1, int(5e-4 * before[n].numel())), n
        else:
            assert changed > 0, n


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_matches_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)
    torch.nn.init.normal_(mha.in_proj_bias)
    split = SplitAttention(mha)
    x = torch.randn(3, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = masked, as nn.MultiheadAttention reads it
    per_head = torch.randn(3 * 4, 5, 5) if batch_first else torch.randn(5 * 4, 3, 3)
    for mask in (None, causal if batch_first else causal[:3, :3], per_head):
        expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        torch.testing.assert_close(split(x, x, x, attn_mask=mask)[0], expected, rtol=1e-5, atol=1e-6)


def test_lora_follows_clip_lora(tiny):
    model = fresh(tiny)
    method = build_method(*method_cfg("lora", "method.targets=[q,k,v,o]", "optimizer.lr=1e-3"), model, 0)
    assert method.trainable_params == 2 * 12 * 4 * 2 * 2 * 64  # o included: four adapters per block
    layer = model.transformer.resblocks[3].attn.v_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (2, 64) and b.shape == (64, 2) and not b.any() and a.abs().max() <= 1 / math.sqrt(64)
    torch.nn.init.normal_(b)
    x = torch.randn(4, 64)
    scaling = 1 / math.sqrt(2)  # alpha / sqrt(rank)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ a.T @ b.T * scaling)
    layer.train()  # dropout on the adapter input only
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(out, layer.base_layer(x) + F.dropout(x, 0.25) @ a.T @ b.T * scaling)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_adapters_start_at_the_base_model_and_move(tiny, name):
    base = fresh(tiny)
    model = fresh(tiny)
    method = build_method(*method_cfg(name, "optimizer.lr=1e-2"), model, 0)
    expected = outputs(base, tiny)
    torch.testing.assert_close(outputs(model, tiny), expected, rtol=0, atol=1e-6)
    model.train()  # dropout on the adapter input: still the base model while B = 0
    torch.testing.assert_close(encode_text(model, tiny[1]), encode_text(base, tiny[1]), rtol=0, atol=1e-6)
    train_step(model, method, tiny)
    assert (outputs(model, tiny) - expected).abs().max() > 1e-3
    blocks = 2 * 12 * 3  # towers x blocks x (q, k, v)
    extra = blocks * 64 if name == "dora" else 0  # DoRA's magnitude: one entry per output feature
    assert method.trainable_params == blocks * 2 * 2 * 64 + extra


@pytest.mark.parametrize("name", ["so", "adam", "lora", "dora", "relora", "galore"])
def test_save_then_load_into_a_fresh_model_gives_identical_outputs(tiny, name, tmp_path):
    model = fresh(tiny)
    method = build_method(*method_cfg(name, "optimizer.lr=1e-2"), model, 0)
    train_step(model, method, tiny)
    save_trained(method, model, tmp_path / "trained.pt")
    torch.manual_seed(123)  # a different adapter initialisation in the fresh model
    loaded = fresh(tiny)
    load_trained(build_method(*method_cfg(name, "optimizer.lr=1e-2"), loaded, 0), loaded, tmp_path / "trained.pt")
    assert torch.equal(outputs(loaded, tiny), outputs(model, tiny))
    assert not torch.equal(outputs(loaded, tiny), outputs(fresh(tiny), tiny))


def test_load_rejects_a_file_that_does_not_match(tiny, tmp_path):
    model = fresh(tiny)
    path = tmp_path / "trained.pt"
    save_trained(build_method(*method_cfg("adam", "optimizer.lr=1e-3"), model, 0), model, path)
    other = fresh(tiny)
    with pytest.raises(ValueError, match=rf"{path}.*unexpected.*visual.transformer"):
        load_trained(build_method(*method_cfg("adam", "method.encoder=text", "optimizer.lr=1e-3"), other, 0), other, path)
    other = fresh(tiny)
    with pytest.raises(ValueError, match=rf"{path}: holds method 'adam', expected 'lora'"):
        load_trained(build_method(*method_cfg("lora", "optimizer.lr=1e-3"), other, 0), other, path)
    saved = torch.load(path, weights_only=True)
    name = next(iter(saved["tensors"]))
    saved["tensors"][name] = saved["tensors"][name][:1]
    torch.save(saved, path)
    other = fresh(tiny)
    with pytest.raises(ValueError, match=rf"{path}: shape mismatch.*{name}"):
        load_trained(build_method(*method_cfg("adam", "optimizer.lr=1e-3"), other, 0), other, path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_trained(build_method(*method_cfg("adam", "optimizer.lr=1e-3"), other, 0), other, tmp_path / "missing.pt")


def test_zeroshot_trains_nothing(tiny):
    model = fresh(tiny)
    method = build_method(*method_cfg("zeroshot"), model, 0)
    assert method.optimizer is None and method.trainable == {} and method.trainable_params == 0
    assert not any(p.requires_grad for p in model.parameters())


def test_positions_are_defined_for_any_depth():
    assert {p: list(block_indices(p, 12)) for p in BLOCKS} == BLOCKS  # the released code's ranges
    deep = {p: list(block_indices(p, 24)) for p in BLOCKS}
    assert deep["bottom"] == list(range(8)) and deep["mid"] == list(range(8, 16)) and deep["up"] == list(range(16, 24))
    assert deep["half-up"] == list(range(12, 24)) and deep["top3"] == [21, 22, 23]
    shallow = {p: list(block_indices(p, 4)) for p in BLOCKS}
    assert shallow == {"all": [0, 1, 2, 3], "bottom": [0], "mid": [1, 2], "up": [3], "half-bottom": [0, 1],
                       "half-up": [2, 3], "top3": [1, 2, 3]}
    for depth in range(3, 40):  # thirds and halves partition the tower
        parts = [block_indices(p, depth) for p in ("bottom", "mid", "up")]
        assert [i for part in parts for i in part] == list(range(depth)) and all(parts)


@pytest.mark.parametrize("config", ["vit_b32", "vit_l14", "vit_b16_laion"])
def test_backbone_configs_name_an_open_clip_model_and_tag(config):
    import open_clip

    cfg = OmegaConf.load(METHOD_DIR.parent / "model" / f"{config}.yaml")
    assert (cfg.name, cfg.pretrained) in open_clip.list_pretrained()
    quick = open_clip.get_model_config(cfg.name).get("quick_gelu", False)
    assert quick == (cfg.pretrained == "openai")  # OpenAI's weights need QuickGELU, LAION's plain GELU


@pytest.fixture
def flush_denormal():
    """The random 24-block stand-in's gradients are denormal floats, 50x slower on a CPU: flush them."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("name", ["so", "lora"])
def test_the_vit_l14_stand_in_trains_with_positions_scaled_to_its_depth(name, flush_denormal):
    """so-tiny-l14 has ViT-L/14's depth (24 vision, 12 text blocks): position=up is vision blocks
    16-23 and text blocks 8-11; a few steps move exactly those."""
    import open_clip

    real = open_clip.get_model_config("ViT-L-14-quickgelu")
    torch.manual_seed(0)
    model, _, tokenizer = build_clip("so-tiny-l14")
    assert (len(model.visual.transformer.resblocks), len(model.transformer.resblocks)) == \
        (real["vision_cfg"]["layers"], real["text_cfg"]["layers"]) == (24, 12)
    method = build_method(*method_cfg(name, "method.position=up", "optimizer.lr=1e-2"), model, 0)
    blocks = {int(n.split(".resblocks.")[1].split(".")[0]) for n in method.trainable if n.startswith("visual.")}
    text_blocks = {int(n.split(".resblocks.")[1].split(".")[0]) for n in method.trainable if n.startswith("transformer.")}
    assert blocks == set(range(16, 24)) and text_blocks == set(range(8, 12))
    tiny = (model, tokenize(tokenizer, PROMPTS, "cpu"), torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))
    before = snapshot(model)
    for _ in range(3):
        train_step(model, method, tiny)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(method.trainable) | {n for n in before if ".lora_" in n}
    assert {int(n.split(".resblocks.")[1].split(".")[0]) for n in changed if n.startswith("visual.")} == set(range(16, 24))


@pytest.mark.parametrize("name", ["lora", "dora", "relora"])
def test_merging_the_adapters_gives_open_clips_model_with_the_same_outputs(tiny, name):
    from so.clip.lora import merge_adapters

    model = fresh(tiny)
    method = build_method(*method_cfg(name, "method.targets=[q,k,v,o]", "optimizer.lr=1e-2"), model, 0)
    for p in method.trainable.values():  # adapters that change the outputs (B is zero at the start)
        torch.nn.init.normal_(p, std=0.05)
    adapted = outputs(model, tiny)
    merge_adapters(model)
    assert not any(".lora_" in n or "base_layer" in n for n in model.state_dict())
    assert model.state_dict().keys() == tiny[0].state_dict().keys()  # open_clip's names and modules again
    assert all(type(b.attn) is torch.nn.MultiheadAttention for b in model.transformer.resblocks)
    torch.testing.assert_close(outputs(model, tiny), adapted, rtol=1e-4, atol=1e-5)
    assert (outputs(model, tiny) - outputs(fresh(tiny), tiny)).abs().max() > 1e-2  # and not the base model
