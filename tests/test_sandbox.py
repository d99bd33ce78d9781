"""The pretrained sandbox: the synthetic world (attributes -> images and captions), its held-out tasks on
disk, the contrastive pretraining, main.py's build-when-missing step, and real zero-shot transfer.

The transfer test pretrains with a smaller run (SMALL: 200 steps of 64 pairs, under a minute on 2 CPU
cores) and asserts zero-shot top-1 on each held-out task of at least twice chance; the same evaluation
with random weights must stay within half of chance either side. Why that tolerance: a random CLIP's
prediction does not depend on the class, so its accuracy is chance on average but varies with the
initialisation and the test images: over random initialisations 0-7 of so-sandbox it measured 3.9-8.1%
on these 16-class tasks of 800 test images (chance 6.25%), inside [3.1, 9.4], a band that stays well
under the 12.5% the pretrained model must reach.
"""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import datasets
from datasets import synthetic
from datasets.pipeline import test_loader
import main
from so.clip import pretrain
from so.clip.model import build_clip
from so.clip.step import Prompts
from trial import evaluate

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("synthetic_compositions", "synthetic_shift")
SMALL = {"steps": 200, "batch_size": 64, "warmup": 10}  # the test's pretraining size (lr etc. as configured)


def attributes(n, dist=synthetic.PRETRAIN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return synthetic.sample(torch.randint(len(dist.pairs), (n,), generator=g).tolist(), dist, g), g


def test_held_out_pairs_cover_every_colour_and_shape_twice():
    held = synthetic.HELD_OUT
    assert len(held) == 16 and len(set(held)) == 16
    for names, k in ((synthetic.COLORS, 0), (synthetic.SHAPES, 1)):
        assert sorted(p[k] for p in held) == sorted(list(names) * 2)
    assert synthetic.TASKS["synthetic_compositions"].pairs == held
    assert not set(synthetic.TASKS["synthetic_shift"].pairs) & set(held)
    assert not set(synthetic.TASKS["synthetic"].pairs) & set(held)
    assert set(synthetic.TASKS["synthetic_shift"].backgrounds) == set(synthetic.UNSEEN_BACKGROUNDS)


def test_pretraining_never_shows_held_out_pairs_or_unseen_backgrounds():
    attrs, _ = attributes(3000)
    pairs = {(synthetic.COLOR_NAMES[c], synthetic.SHAPES[s]) for c, s in zip(attrs["color"], attrs["shape"])}
    assert pairs == set(synthetic.PAIRS) - set(synthetic.HELD_OUT)  # all 48 others, none held out
    backgrounds = {synthetic.BACKGROUNDS[b] for b in attrs["background"]}
    assert backgrounds == set(synthetic.SEEN_BACKGROUNDS)
    _, captions = synthetic.pretraining_batch(500, torch.Generator().manual_seed(1))
    text = " ".join(captions)
    assert not any(b in text for b in synthetic.UNSEEN_BACKGROUNDS)
    assert not any(f"{c} {s}" in text for c, s in synthetic.HELD_OUT)


def test_captions_name_the_image_attributes_and_nothing_else():
    attrs, _ = attributes(400, seed=2)
    rng = random.Random(0)
    colors, shapes = set(synthetic.COLORS), set(synthetic.SHAPES)
    named = {"color": 0, "shape": 0, "background": 0}
    for i in range(400):
        text = synthetic.caption(attrs, i, rng)
        assert re.fullmatch(r"(a photo|a picture|an image) of a [a-z ]+\.", text), text
        words = set(text[:-1].split())
        assert words & colors <= {synthetic.COLOR_NAMES[attrs["color"][i]]}
        assert words & shapes <= {synthetic.SHAPES[attrs["shape"][i]]}
        assert words & set(synthetic.BACKGROUNDS) <= {synthetic.BACKGROUNDS[attrs["background"][i]]}
        assert ("shape" in words) != bool(words & shapes)  # the shape or the word "shape"
        named["color"] += bool(words & colors)
        named["shape"] += bool(words & shapes)
        named["background"] += "background" in words
    assert 280 < named["color"] < 360 and 280 < named["shape"] < 360 and 160 < named["background"] < 240


def test_render_is_deterministic_and_draws_the_named_colour():
    attrs, g = attributes(64, seed=3)
    a = synthetic.render(attrs, torch.Generator().manual_seed(5))
    b = synthetic.render(attrs, torch.Generator().manual_seed(5))
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 32, 32) and torch.equal(a, b)
    # A large plain red circle in the middle of a snow background, no noise: red inside, snow outside.
    dist = synthetic.Distribution((("red", "circle"),), ("snow",), (0.0, 0.0))
    attrs = synthetic.sample([0], dist, torch.Generator().manual_seed(0))
    attrs.update(pattern=torch.tensor([0]), radius=torch.tensor([10.0]), centre=torch.tensor([[16.0, 16.0]]))
    image = synthetic.render(attrs, torch.Generator().manual_seed(0))[0].float()
    red = torch.tensor(synthetic.COLORS["red"], dtype=torch.float32)
    assert (image[:, 14:18, 14:18].mean((1, 2)) - red).abs().max() < 20
    assert image[:, :3, :3].mean() > 200  # snow


@pytest.mark.parametrize("name", TARGETS)
def test_tasks_are_written_in_the_benchmark_layout(tmp_path, name):
    dist = synthetic.TASKS[name]
    ds = datasets.build_dataset(name, tmp_path / name, 16, 1, tmp_path / "cache")
    assert ds.classnames == [f"{c} {s}" for c, s in dist.pairs] and len(ds.classnames) == 16
    assert len(ds.train_x) == 16 * 16 and len(ds.test) == 16 * 50
    assert ds.templates[0].format(ds.classnames[0]) == f"a photo of a {dist.pairs[0][0]} {dist.pairs[0][1]}."
    split = json.loads((tmp_path / name / synthetic.SPLIT_FILE).read_text())
    color, shape = dist.pairs[0]
    assert split["train"][0] == [f"{color}_{shape}/train_000.png", 0, f"{color} {shape}"]
    assert split["generator"]["task"] == name and [len(split[s]) for s in ("train", "val", "test")] == [512, 64, 800]
    with Image.open(ds.test[0].path) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_pretraining_is_deterministic_and_leaves_the_caller_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    runs = [pretrain.pretrain(**main.recipe(out=str(tmp_path / f"{i}.bin"), steps=3, batch_size=8, warmup=1),
                              batches=synthetic.pretraining_batch) for i in range(2)]
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    a, b = (torch.load(tmp_path / f"{i}.bin", weights_only=True) for i in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "0.json").read_text())
    assert record["steps"] == 3 and record["batch_size"] == 8 and record["final_loss"] == runs[0]["final_loss"] > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_a_missing_sandbox_checkpoint_is_built_once_and_build_clip_never_trains(tmp_path, monkeypatch):
    built = []

    def small(**settings):
        built.append(settings)
        return original(**dict(settings, steps=2, batch_size=8, warmup=1))  # the recipe, made small

    original = pretrain.pretrain
    monkeypatch.setattr(pretrain, "pretrain", small)
    path = tmp_path / "sandbox" / "so-sandbox.bin"
    with pytest.raises(FileNotFoundError, match="neither a file nor"):  # building a model never trains one
        build_clip("so-sandbox", str(path))
    main.build_if_missing(path, "so-sandbox")
    assert [(s["out"], s["model"], s["steps"]) for s in built] == [(str(path), "so-sandbox", 800)]
    model, _, _ = build_clip("so-sandbox", str(path))
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    main.build_if_missing(path, "so-sandbox")  # present now: not built again
    assert len(built) == 1


@pytest.mark.slow  # pretrain_sandbox.py in subprocesses
def test_the_command_line_writes_the_checkpoint_and_skips_an_existing_one(tmp_path):
    out = tmp_path / "ck" / "tiny.bin"
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_sandbox.py"), f"out={out}",
                                        "steps=2", "batch_size=8", "warmup=1", *args], cwd=tmp_path,
                                       capture_output=True, text=True, timeout=300)
    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # Hydra writes no output folder
    before = out.stat().st_mtime_ns
    assert run().returncode == 0 and out.stat().st_mtime_ns == before
    assert run("force=true").returncode == 0 and out.stat().st_mtime_ns != before


def zeroshot(model, transform, tokenizer, root, cache):
    """Zero-shot top-1 on each target task through the trial's own path (loader, prompts, evaluate)."""
    accuracy = {}
    for name in TARGETS:
        ds = datasets.build_dataset(name, root / name, 1, 1, cache)
        loader = test_loader(ds.test, transform, 256, 0)
        top1 = evaluate(model, Prompts(ds, tokenizer, "cpu"), loader, "fp32", torch.device("cpu"), name)
        accuracy[name] = (top1, 100 / len(ds.classnames))
    return accuracy


@pytest.mark.slow  # a 200-step pretraining
def test_pretrained_model_transfers_zero_shot_and_random_weights_do_not(tmp_path):
    path = tmp_path / "small.bin"
    pretrain.pretrain(**main.recipe(out=str(path), **SMALL), batches=synthetic.pretraining_batch)
    pretrained = zeroshot(*build_clip("so-sandbox", str(path)), tmp_path, tmp_path / "cache")
    torch.manual_seed(0)
    random_weights = zeroshot(*build_clip("so-sandbox"), tmp_path, tmp_path / "cache")
    for name in TARGETS:
        (top1, chance), (random_top1, _) = pretrained[name], random_weights[name]
        assert top1 >= 2 * chance, (name, pretrained)
        assert abs(random_top1 - chance) <= chance / 2, (name, random_weights)


def test_sandbox_table_dry_run_lists_every_trial_once():
    proc = subprocess.run(["bash", "scripts/sandbox_table.sh", "--dry-run", "max_iters=300"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k not in ("DATASETS", "METHODS", "SHOTS", "SEEDS", "NAME")})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    zeroshot = [f"name=sandbox_table dataset={d} method=zeroshot model=tiny_pretrained shots=1 seed=1" for d in TARGETS]
    trained = [f"name=sandbox_table dataset={d} method={m} model=tiny_pretrained shots={k} seed={s}"
               for d in TARGETS for m in ("so", "relora", "lora", "galore", "adam") for k in (1, 4, 16)
               for s in (1, 2, 3)]
    assert lines == zeroshot + trained
    assert "92 trials in all (dry run: nothing launched)." in proc.stderr and "max_iters=300" in proc.stderr


def test_sandbox_sensitivity_lists_the_fixed_grid_with_curves():
    proc = subprocess.run(["bash", "scripts/sandbox_sensitivity.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("DATASETS", "DENSITIES", "RANKS", "SHOTS", "SEEDS", "NAME")})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    study = "model=tiny_pretrained max_iters=300 stop_loss=null eval_every=25"
    points = [("so_density" + d, f"method=so optimizer.density={d}") for d in ("5e-4", "5e-3", "5e-2", "2e-1")]
    points += [("lora_rank" + r, f"method=lora method.rank={r}") for r in ("1", "2", "4", "8")]
    assert lines == [f"name=sandbox_sensitivity/{point} dataset={d} {switch} {study} shots={k} seed={s}"
                     for point, switch in points for d in TARGETS for k in (1, 4) for s in (1, 2, 3)]
    assert "96 trials in all (dry run: nothing launched)." in proc.stderr
