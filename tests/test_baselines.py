"""The field's baselines as their papers define them: what each trains, its logits and its loss
(prompt learners, adapters and probes on frozen image features, so.clip.heads)."""
import math

import pytest
import torch
import torch.nn.functional as F

import train
from so.clip.heads import Features, HeadTask, cosine_logits, text_means
from so.clip.methods import build_method
from so.clip.model import build_clip
from so.clip.step import LOGIT_SCALE, Prompts
from tests.test_methods import method_cfg


class Classes:
    """What Prompts reads of a dataset."""
    classnames = ["cat", "dog", "red car"]
    templates = ["a photo of a {}."]


def built(name, *overrides):
    """(model, method, task) of preset `name` on so-tiny, over random features of 6 train images
    (3 views) and 6 val images."""
    torch.manual_seed(0)
    model, _, tokenizer = build_clip("so-tiny")
    prompts = Prompts(Classes, tokenizer, "cpu")
    dim = prompts.embeddings(model).shape[1]
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    task = HeadTask(prompts, Features(torch.randn(3, 6, dim, generator=g), labels),
                    Features(torch.randn(1, 6, dim, generator=g), labels))
    return model, build_method(*method_cfg(name, *overrides), model, seed=1, task=task), task


def zero_shot_logits(model, task, features):
    return LOGIT_SCALE * F.normalize(features, dim=-1) @ task.prompts.embeddings(model).T


def test_coop_trains_only_its_context_and_puts_the_class_token_at_the_end():
    model, method, task = built("coop")
    head, width = model.head, model.token_embedding.weight.shape[1]
    assert {n: tuple(p.shape) for n, p in method.trainable.items()} == {"head.ctx": (16, width)}
    assert method.trainable_params == 16 * width and method.name == "coop"
    group = method.optimizer.param_groups[0]
    assert (type(method.optimizer).__name__, group["lr"], group["momentum"], group["weight_decay"]) == \
        ("SGD", 2e-3, 0.9, 5e-4)
    assert (method.epochs, method.batch_size, method.warmup_epochs, method.warmup_lr) == \
        ({1: 50, 2: 100, 8: 200}, 32, 1, 1e-5)
    tokens = head.class_tokens(task.prompts)
    x = task.prompts.tokenizer(["X"])[0, 1]
    for i, name in enumerate(Classes.classnames):
        expected = task.prompts.tokenizer([" ".join(["X"] * 16) + f" {name}."])[0, :tokens.shape[1]]
        assert torch.equal(tokens[i], expected) and (tokens[i, 1:17] == x).all()
        assert tokens[i, 17:].tolist()[:1] != [x]  # the class name follows the context
    embedded = head.prompt_embeddings(model, tokens, head.ctx)
    assert torch.equal(embedded[:, 1:17], head.ctx.expand(3, -1, -1))
    with torch.no_grad():
        assert torch.equal(embedded[:, 17:], model.token_embedding(tokens)[:, 17:])
        assert torch.equal(embedded[:, :1], model.token_embedding(tokens)[:, :1])
    head.loss(model, task.train.view(0), task.train.labels).backward()
    assert head.ctx.grad is not None and head.ctx.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["head.ctx"]


def test_kgcoop_starts_as_zero_shot_clip_and_adds_its_regulariser():
    model, method, task = built("kgcoop")
    head = model.head
    assert method.trainable_params == 4 * model.token_embedding.weight.shape[1]
    features, labels = task.train.view(0), task.train.labels
    with torch.no_grad():  # "a photo of a" as the context: the zero-shot prompts, to float rounding
        text = head.text_features(model, head.class_tokens(task.prompts))
        torch.testing.assert_close(text, task.prompts.embeddings(model), atol=1e-5, rtol=0)
        ce = F.cross_entropy(zero_shot_logits(model, task, features), labels)
        torch.testing.assert_close(head.loss(model, features, labels), ce, atol=1e-4, rtol=0)
        head.ctx.add_(0.5 * torch.randn_like(head.ctx))
        text = head.text_features(model, head.class_tokens(task.prompts))
        ce = F.cross_entropy(cosine_logits(features, text), labels)
        cosine = F.cosine_similarity(text, task.prompts.embeddings(model), dim=1).mean()
        assert cosine < 0.99
        torch.testing.assert_close(head.loss(model, features, labels), ce + 8.0 * (1 - cosine))


def test_coop_ctx_init_must_match_n_ctx():
    with pytest.raises(ValueError, match=r"method.ctx_init='a photo of a' is 4 tokens; method.n_ctx=16"):
        built("coop", "method.ctx_init=a photo of a")


def test_cocoop_with_a_silent_meta_net_is_coop_per_image():
    model, method, task = built("cocoop")
    head = model.head
    dim, width = task.train.features.shape[-1], model.token_embedding.weight.shape[1]
    shapes = {n: tuple(p.shape) for n, p in method.trainable.items()}
    assert shapes == {"head.ctx": (4, width), "head.meta_net.0.weight": (dim // 16, dim),
                      "head.meta_net.0.bias": (dim // 16,), "head.meta_net.2.weight": (width, dim // 16),
                      "head.meta_net.2.bias": (width,)}
    assert method.batch_size == 1 and method.epochs == 10
    features = task.train.view(0)
    with torch.no_grad():
        moving = head.scorer(model, task.prompts)(features)
        head.meta_net[2].weight.zero_()
        head.meta_net[2].bias.zero_()
        silent = head.scorer(model, task.prompts)(features)
        coop = cosine_logits(features, head.text_features(model, head.class_tokens(task.prompts)))
    torch.testing.assert_close(silent, coop, atol=1e-4, rtol=0)
    assert not torch.allclose(moving, silent, atol=1e-3)  # each image's bias moves its prompts


def test_tip_adapter_without_its_cache_is_zero_shot_clip():
    model, method, task = built("tip_adapter", "method.alpha=0", "method.search=fixed")
    assert method.optimizer is None and method.trainable == {}
    features = torch.randn(5, task.train.features.shape[-1])
    with torch.no_grad():
        torch.testing.assert_close(model.head.scorer(model, task.prompts)(features),
                                   zero_shot_logits(model, task, features), atol=1e-4, rtol=0)


def test_tip_adapter_cache_model():
    model, method, task = built("tip_adapter", "method.search=fixed", "method.alpha=2", "method.beta=3")
    head, f = model.head, torch.randn(4, task.train.features.shape[-1])
    keys = F.normalize(task.train.features.mean(dim=0), dim=-1)  # the mean over views, normalised
    torch.testing.assert_close(head.cache_keys, keys)
    affinity = F.normalize(f, dim=-1) @ keys.T
    expected = zero_shot_logits(model, task, f) + 2 * torch.exp(-3 * (1 - affinity)) @ F.one_hot(task.train.labels).float()
    with torch.no_grad():
        torch.testing.assert_close(head.scorer(model, task.prompts)(f), expected, atol=1e-4, rtol=0)
    _, tuned, _ = built("tip_adapter_f")
    assert {n: tuple(p.shape) for n, p in tuned.trainable.items()} == {"head.keys": tuple(keys.shape)}
    assert (type(tuned.optimizer).__name__, tuned.optimizer.param_groups[0]["eps"], tuned.batch_size) == \
        ("AdamW", 1e-4, 256)


def test_tip_adapter_search_is_the_authors_grid():
    """The first best top-1 on the val split over the authors' grid, computed as their search_hp
    (the cache logits recomputed for every alpha)."""
    model, method, task = built("tip_adapter", "method.search_steps=[6,5]", "method.search_scale=[7,3]")
    head = model.head
    with torch.no_grad():
        head.after_training(model)
        f = F.normalize(task.val.view(0), dim=-1)
        best = (0, None, None)
        for i in range(6):
            beta = i * (7 - 0.1) / 6 + 0.1
            for j in range(5):
                alpha = j * (3 - 0.1) / 5 + 0.1
                logits = zero_shot_logits(model, task, task.val.view(0)) + alpha * (
                    (-1) * (beta - beta * (f @ head.cache_keys.T))).exp() @ head.values
                acc = 100 * (logits.argmax(-1) == task.val.labels).float().mean().item()
                if acc > best[0]:
                    best = (acc, alpha, beta)
    assert (head.alpha.item(), head.beta.item()) == pytest.approx(best[1:])
    assert head.fitted() == pytest.approx({"alpha": best[1], "beta": best[2]})


@pytest.mark.parametrize("name", ["taskres", "lp", "clap"])
def test_taskres_and_the_probes_start_at_zero_shot_clip(name):
    model, method, task = built(name)
    classes, dim = len(Classes.classnames), task.train.features.shape[-1]
    trained = {"taskres": "head.residual", "lp": "head.weight", "clap": "head.weight"}[name]
    assert {n: tuple(p.shape) for n, p in method.trainable.items()} == {trained: (classes, dim)}
    f = torch.randn(5, dim)
    with torch.no_grad():  # one template: the raw mean is the zero-shot embedding before its normalisation
        torch.testing.assert_close(model.head.scorer(model, task.prompts)(f), zero_shot_logits(model, task, f),
                                   atol=1e-4, rtol=0)
    if name == "taskres":
        with torch.no_grad():
            model.head.residual.fill_(1.0)
        base = text_means(model, task.prompts)
        torch.testing.assert_close(model.head.scorer(model, task.prompts)(f), cosine_logits(f, base + 0.5))


def test_clap_penalty_is_the_class_adaptive_one():
    model, method, task = built("clap")
    head = model.head
    base = text_means(model, task.prompts)
    features = task.train.features.flatten(0, 1)  # every view of every train image
    probs = cosine_logits(features, base).softmax(-1)
    labels = task.train.labels.repeat(3)
    lambdas = torch.stack([probs[labels == c, c].mean() for c in range(3)])
    torch.testing.assert_close(head.penalty, lambdas)
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight))
        f, y = task.train.view(1), task.train.labels
        expected = F.cross_entropy(cosine_logits(f, head.weight), y) + \
            (lambdas * (head.weight - base).pow(2).sum(-1)).mean()
        torch.testing.assert_close(head.loss(model, f, y), expected)
    _, lp, _ = built("lp")
    assert not lp.head.constrained
    assert (type(lp.optimizer).__name__, lp.optimizer.param_groups[0]["lr"], lp.epochs) == ("SGD", 0.1, 300)


def test_clip_adapter_mixes_its_mlp_into_the_feature():
    model, method, task = built("clip_adapter")
    dim = task.train.features.shape[-1]
    assert {n: tuple(p.shape) for n, p in method.trainable.items()} == \
        {"head.mlp.0.weight": (dim // 4, dim), "head.mlp.2.weight": (dim, dim // 4)}
    f = torch.randn(5, dim)
    head = model.head
    with torch.no_grad():
        mixed = 0.2 * F.relu(F.relu(f @ head.mlp[0].weight.T) @ head.mlp[2].weight.T) + 0.8 * f
        torch.testing.assert_close(head.scorer(model, task.prompts)(f), cosine_logits(mixed, head.text))
        head.ratio = 0.0
        torch.testing.assert_close(head.scorer(model, task.prompts)(f), zero_shot_logits(model, task, f),
                                   atol=1e-4, rtol=0)


def test_class_heads_refuse_other_classes():
    model, _, task = built("lp")

    class Novel(Classes):
        classnames = ["bird", "boat", "tree"]

    with pytest.raises(ValueError, match="cannot score other classes"):
        model.head.scorer(model, Prompts(Novel, task.prompts.tokenizer, "cpu"))


def test_a_warm_up_pass_at_warmup_lr_then_the_cosine():
    _, method, _ = built("coop")
    scheduler = method.scheduler(12, 0.0, pass_steps=3)
    lrs = []
    for _ in range(12):
        lrs.append(method.optimizer.param_groups[0]["lr"])
        method.optimizer.step()
        scheduler.step()
    assert lrs[:3] == [1e-5] * 3
    assert lrs[3:] == pytest.approx([2e-3 * (1 + math.cos(math.pi * i / 12)) / 2 for i in range(9)])


@pytest.mark.parametrize("name, optimizer, message", [
    ("coop", "mezo", "MeZO perturbs CLIP's linear layers"),
    ("tip_adapter", "adamw", "this method trains nothing"),
    ("tip_adapter_f", "none", "nothing would step"),
])
def test_pairs_that_cannot_work(name, optimizer, message):
    with pytest.raises(ValueError, match=f"method={name} with optimizer={optimizer}: {message}"):
        built(name, f"optimizer={optimizer}")


def test_so_steps_the_prompt_context():
    """SO on CoOp's context: the pairing the paper leaves open."""
    model, method, task = built("coop", "optimizer=so", "optimizer.density=0.1")
    assert method.name == "coop+so" and type(method.optimizer).__name__ == "SO"
    before = model.head.ctx.detach().clone()
    for _ in range(3):
        method.head.loss(model, task.train.view(0), task.train.labels).backward()
        method.optimizer.step()
        method.optimizer.zero_grad()
    moved = (model.head.ctx != before).sum().item()
    assert moved == int(0.1 * before.numel())  # one support (redrawn every 10 steps) of the context moved


def test_per_dataset_settings_are_the_authors_but_what_the_command_line_gives():
    from so.clip.head_kinds import apply_per_dataset

    config = {"dataset": {"name": "imagenet"}, "optimizer": {"name": "adam_taskres", "lr": 2e-3},
              "method": {"name": "taskres", "default_optimizer": "adam_taskres", "alpha": 0.5, "epochs": 100,
                         "per_dataset": {"imagenet": {"optimizer.lr": 2e-4, "epochs": 50}}}}
    assert apply_per_dataset(config, given={"method.epochs"}) == {"optimizer.lr": 2e-4}
    assert (config["optimizer"]["lr"], config["method"]["epochs"]) == (2e-4, 100)
    other = {**config, "optimizer": {"name": "so", "lr": 1e-3}}  # not the method's optimizer: its lr stays
    assert apply_per_dataset(other) == {"method.epochs": 50} and other["optimizer"]["lr"] == 1e-3
    config["method"]["per_dataset"] = {"imagenet": {"epoch": 3}}
    with pytest.raises(ValueError, match="method.per_dataset.imagenet.epoch: expected a key of the method config"):
        apply_per_dataset(config)


BASELINES = ["coop", "coop4", "cocoop", "kgcoop", "clip_adapter", "tip_adapter", "tip_adapter_f", "taskres", "lp",
             "clap"]


@pytest.mark.slow
def test_every_baseline_runs_a_trial_and_a_sweep_resumes(tmp_path):
    """Each preset through main.py (one multirun, debug=fast, 1 shot): a finished results.json with its
    trainable parameter count and its authors' epochs; the features encoded once per (views, crop) for
    all of them; Tip-Adapter with its cache off is zero-shot CLIP; a re-run skips every trial."""
    from tests.test_main import main_py, results

    run = ["dataset=synthetic", "debug=fast", "shots=1", f"method={','.join(BASELINES)}"]
    main_py(tmp_path, *run, multirun=True)
    found = {r["method"]: r for r in results(tmp_path).values()}
    assert sorted(found) == sorted(BASELINES) and all(r["status"] == "finished" for r in found.values())
    width, dim, classes, images = 64, 64, 8, 8  # so-tiny: text width, embedding; synthetic: 8 classes x 1 shot
    params = {"coop": 16 * width, "coop4": 4 * width, "kgcoop": 4 * width,
              "cocoop": 4 * width + dim * (dim // 16) + dim // 16 + (dim // 16) * width + width,
              "clip_adapter": 2 * dim * dim // 4, "tip_adapter": 0, "tip_adapter_f": images * dim,
              "taskres": classes * dim, "lp": classes * dim, "clap": classes * dim}
    assert {m: r["trainable_params"] for m, r in found.items()} == params
    assert {m: r["iterations"] for m, r in found.items()} == {  # the authors' epochs at 1 shot, of 8 images in
        "coop": 50, "coop4": 50, "kgcoop": 100, "cocoop": 80, "clip_adapter": 50,  # one batch (CoCoOp's: 1)
        "tip_adapter": 0, "tip_adapter_f": 20, "taskres": 100, "lp": 300, "clap": 300}
    assert [train.pass_steps(n, 32, drop) for n, drop in ((70, True), (70, False), (20, True), (64, True))] == \
        [2, 3, 1, 2]  # Dassl's loader drops the last partial batch when there is a full one
    features = sorted(p.stat().st_size > 0 for p in (tmp_path / "cache" / "features").iterdir())
    assert len(features) == 4  # 10 views at 0.08-1 crops, 10 at 0.5-1 (Tip), 20 (the probes), the val split
    from so.clip.adapted import read_run

    with pytest.raises(ValueError, match="method=coop trained a head on CLIP's image features"):
        read_run(next((tmp_path / "out").rglob("coop/1shot/seed1")))  # export and predict take CLIP's weights
    rerun = main_py(tmp_path, *run, multirun=True)
    assert rerun.stdout.count("(already run)") == len(BASELINES)
    off = main_py(tmp_path, "dataset=synthetic", "debug=fast", "shots=1", "method=tip_adapter", "method.alpha=0",
                  "method.search=fixed", "name=off")
    (result,) = [r for p, r in results(tmp_path).items() if p.startswith("off/")]
    assert result["top1"] == result["zeroshot_top1"], off.stdout
    assert result["fitted"] == {"alpha": 0.0, "beta": 1.0}  # search=fixed: the given values
    assert set(found["tip_adapter_f"]["fitted"]) == {"alpha", "beta"}  # searched on the val split
    main_py(tmp_path, "dataset=synthetic", "debug=fast", "shots=1", "method=coop4", "optimizer.lr=1e30", "name=nan")
    (diverged,) = [r for p, r in results(tmp_path).items() if p.startswith("nan/")]
    assert (diverged["status"], diverged["top1"]) == ("diverged", None) and diverged["diverged_at"] >= 1


@pytest.mark.slow
def test_base_to_novel_needs_a_prompt_learner(tmp_path):
    from tests.test_main import main_py, results

    refused = main_py(tmp_path, "dataset=synthetic", "debug=fast", "method=lp", "base_to_novel=true", check=False)
    assert refused.returncode == 1 and "method=lp with base_to_novel=true: it learns one vector per training " \
        "class" in refused.stderr and not results(tmp_path)
    main_py(tmp_path, "dataset=synthetic", "debug=fast", "shots=2", "method=cocoop", "method.epochs=1",
            "base_to_novel=true")
    (result,) = results(tmp_path).values()
    assert result["novel_classes"] == 4 and 0 <= result["novel_top1"] <= 100 and result["hm"] is not None


@pytest.mark.parametrize("name, mixed", [("coop", False), ("lp", True)])
def test_a_pass_takes_one_view_or_draws_from_the_bank(name, mixed):
    """CoOp's passes shuffle one view's images at a time, the views in turn; CLAP's batches come from
    the bank of every view's features (3 views x 6 images here)."""
    from omegaconf import OmegaConf

    model, method, task = built(name, "method.batch_size=4")
    cfg = OmegaConf.create({"batch_size": 32, "precision": "fp32"})
    _, batches = train.head_steps(cfg, model, method, torch.device("cpu"), torch.Generator().manual_seed(0), None)
    for passes in range(4):
        (batch,) = batches(passes)  # 6 images, batch 4, drop_last: one full batch a pass
        assert len(batch) == 4 and len(set(batch.tolist())) == 4
        if not mixed:
            assert set((batch // 6).tolist()) == {passes % 3}
    drawn = torch.cat([batches(p)[0] for p in range(30)])
    assert len(set((drawn // 6).tolist())) == 3 and (len(set((drawn[:4] // 6).tolist())) > 1) == mixed


def test_head_logits_are_fp32_under_autocast():
    model, method, task = built("tip_adapter", "method.search=fixed", "method.alpha=2")
    f = torch.randn(4, task.train.features.shape[-1])
    score = model.head.scorer(model, task.prompts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = score(f.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, score(f.bfloat16().float()))


@pytest.mark.parametrize("override, message", [
    ("tip_adapter method.alpha=true", "method.alpha=True: expected a number >= 0"),
    ("clip_adapter method.ratio=1.5", r"method.ratio=1.5: expected a number in \[0, 1\]"),
    ("coop method.n_ctx=0", "method.n_ctx=0: expected an integer >= 1"),
    ("coop method.batch_size=0", "method.batch_size=0: expected an integer >= 1, or null"),
])
def test_a_head_value_that_cannot_work_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        built(*override.split())
