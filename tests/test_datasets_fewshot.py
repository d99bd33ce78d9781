"""The few-shot protocol: seeded, independent of global RNG state, cached, with replacement when short."""
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import datasets
from datasets.base import sample_fewshot
from tests.fixtures_datasets import TRAIN, write_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path):
    write_benchmark(tmp_path / "data", "dtd")
    return tmp_path / "data"


def subset(ds):
    return [r.path for r in ds.train_x], [r.path for r in ds.val]


def test_same_subset_in_a_new_process_and_independent_of_global_rng(tmp_path, data):
    random.seed(12345)
    here = subset(datasets.build_dataset("dtd", data, 3, 7, tmp_path / "cache_a"))
    code = ("import json, random, sys, datasets; random.seed(999); random.random();"
            "ds = datasets.build_dataset('dtd', sys.argv[1], 3, 7, sys.argv[2]);"
            "print(json.dumps([[r.path for r in ds.train_x], [r.path for r in ds.val]]))")
    out = subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / "cache_b")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [list(x) for x in here]
    assert (tmp_path / "cache_b/fewshot/dtd/shots3_seed7.json").is_file()


def test_different_seeds_give_different_subsets(tmp_path, data):
    subsets = {seed: subset(datasets.build_dataset("dtd", data, 3, seed, tmp_path)) for seed in (1, 2, 3)}
    assert len({tuple(train) for train, _ in subsets.values()}) == 3


def test_train_is_drawn_first_then_val_from_one_seeded_generator(tmp_path, data):
    splits, _ = datasets.LOADERS["dtd"](data).read()
    ds = datasets.build_dataset("dtd", data, 3, 5, tmp_path)
    rng = random.Random(5)
    assert ds.train_x == sample_fewshot(splits["train"], 3, rng)
    assert ds.val == sample_fewshot(splits["val"], 3, rng)


def test_cache_file_is_written_and_reused(tmp_path, data):
    cache = tmp_path / "fewshot/dtd/shots2_seed1.json"
    first = datasets.build_dataset("dtd", data, 2, 1, tmp_path)
    saved = json.loads(cache.read_text())
    assert saved["train"] == [[Path(r.path).relative_to(data / "dtd").as_posix(), r.label] for r in first.train_x]
    assert saved["train"][0][0].startswith("images/")  # relative to the dataset folder: portable
    # Point the cache at other (valid) images: a rebuild must return exactly those, not resample.
    splits, _ = datasets.LOADERS["dtd"](data).read()
    unused = [r for r in splits["train"] if r not in first.train_x]
    saved["train"][0] = [Path(unused[0].path).relative_to(data / "dtd").as_posix(), unused[0].label]
    cache.write_text(json.dumps(saved))
    again = datasets.build_dataset("dtd", data, 2, 1, tmp_path)
    assert again.train_x[0] == unused[0] and again.train_x[1:] == first.train_x[1:]


def test_stale_cache_is_reported(tmp_path, data):
    datasets.build_dataset("dtd", data, 2, 1, tmp_path)
    cache = tmp_path / "fewshot/dtd/shots2_seed1.json"
    saved = json.loads(cache.read_text())
    saved["train"][0][0] = "images/banded/not_in_the_split.jpg"
    cache.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=f"few-shot cache {cache} does not match .*delete the cache file"):
        datasets.build_dataset("dtd", data, 2, 1, tmp_path)
    cache.write_text("{not json")
    with pytest.raises(ValueError, match="few-shot cache .* is not valid JSON"):
        datasets.build_dataset("dtd", data, 2, 1, tmp_path)


def test_short_classes_are_sampled_with_replacement_and_warned(tmp_path, data):
    shots = max(TRAIN)  # class 0 has 5 train images, class 1 has 6
    with pytest.warns(UserWarning, match=f"2 class\\(es\\) have fewer than {shots} train images"):
        ds = datasets.build_dataset("dtd", data, shots, 1, tmp_path)
    counts = Counter(r.label for r in ds.train_x)
    assert list(counts.values()) == [shots] * 3
    class0 = [r.path for r in ds.train_x if r.label == 0]
    assert len(set(class0)) < shots  # drawn with replacement
    with pytest.warns(UserWarning, match="fewer than"):  # also when read back from the cache
        assert datasets.build_dataset("dtd", data, shots, 1, tmp_path).train_x == ds.train_x


@pytest.mark.parametrize("shots,seed,match", [(0, 1, "shots must be a positive integer"),
                                              (2.0, 1, "shots must be a positive integer"),
                                              (2, "1", "seed must be an integer")])
def test_bad_shots_or_seed(tmp_path, data, shots, seed, match):
    with pytest.raises(ValueError, match=match):
        datasets.build_dataset("dtd", data, shots, seed, tmp_path)


def released_draw(train, val, shots, seed):
    """The released SO code's draw, written from its description: Python's global `random` seeded with
    the seed; val (min(k, 4) per class) before train (k per class); per class in order of first
    appearance, random.sample, or random.choices when the class is short."""
    random.seed(seed)

    def per_class(items, k):
        classes = {}
        for item in items:
            classes.setdefault(item[1], []).append(item)
        out = []
        for group in classes.values():
            out += random.sample(group, k) if len(group) >= k else random.choices(group, k=k)
        return out

    val_subset = per_class(val, min(shots, 4))
    return per_class(train, shots), val_subset


def uneven_dtd(root):
    """dtd with classes of 7, 3 and 5 train images and 2, 5 and 4 val images, interleaved so that
    label 2 appears first; class 1 is short of train images at 4 shots, class 0 of val images."""
    from tests.fixtures_datasets import jpeg

    names, order = ("banded", "blotchy", "braided"), [2, 0, 0, 1, 2, 0, 2, 1, 0, 0, 2, 1, 0, 2, 0]
    split, n = {"train": [], "val": [], "test": []}, 0
    for part, labels in (("train", order), ("val", [1, 0, 2, 1, 2, 1, 0, 2, 1, 2, 1]), ("test", [0, 1, 2])):
        for label in labels:
            path = f"{names[label]}/{names[label]}_{n:04d}.jpg"
            jpeg(root / "dtd" / "images" / path, label, n)
            split[part].append([path, label, names[label]])
            n += 1
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return split


@pytest.mark.filterwarnings("ignore:.*sampling them with replacement")
@pytest.mark.parametrize("shots, seed", [(4, 3), (4, 1), (1, 3), (8, 2)])
def test_released_sampler_draws_the_released_codes_images(tmp_path, shots, seed):
    split = uneven_dtd(tmp_path / "data")
    want_train, want_val = released_draw(split["train"], split["val"], shots, seed)
    random.seed(999)
    state = random.getstate()
    ds = datasets.build_dataset("dtd", tmp_path / "data", shots, seed, tmp_path / "cache", sampler="released")
    assert random.getstate() == state  # its own generator: the global one is untouched
    images = tmp_path / "data" / "dtd" / "images"
    assert [r.path for r in ds.train_x] == [str(images / p) for p, _, _ in want_train]
    assert [r.path for r in ds.val] == [str(images / p) for p, _, _ in want_val]
    assert [r.label for r in ds.train_x] == [y for _, y, _ in want_train]
    assert [r.label for r in ds.train_x[:shots]] == [2] * shots  # first-appearance order, not label order
    coop = datasets.build_dataset("dtd", tmp_path / "data", shots, seed, tmp_path / "cache")
    assert subset(coop) != subset(ds)  # train first: other images for the same seed
    again = datasets.build_dataset("dtd", tmp_path / "data", shots, seed, tmp_path / "cache", sampler="released")
    assert subset(again) == subset(ds)  # from its own cache file
    assert sorted(p.name for p in (tmp_path / "cache" / "fewshot" / "dtd").iterdir()) == [
        f"shots{shots}_seed{seed}.json", f"shots{shots}_seed{seed}_released.json"]


@pytest.mark.parametrize("shots", [1, 2])
def test_released_sampler_on_imagenet_draws_train_and_val_in_one_sample(tmp_path, shots):
    """ImageNet (no val split): per class of the sorted wnid folders, one random.sample of
    k + min(k, 4) train images; the first k train, the rest val."""
    from torchvision.datasets import ImageFolder

    write_benchmark(tmp_path / "data", "imagenet")
    folder = ImageFolder(str(tmp_path / "data" / "imagenet" / "images" / "train"))
    random.seed(3)
    classes = {}
    for path, label in folder.imgs:
        classes.setdefault(label, []).append(path)
    want_train, want_val = [], []
    for items in classes.values():
        drawn = random.sample(items, shots + min(shots, 4))
        want_train += drawn[:shots]
        want_val += drawn[shots:]
    ds = datasets.build_dataset("imagenet", tmp_path / "data", shots, 3, tmp_path / "cache", sampler="released")
    assert subset(ds) == (want_train, want_val)
    assert not set(want_val) & set(want_train)


def test_an_unknown_sampler_is_named(tmp_path, data):
    with pytest.raises(ValueError, match="fewshot_sampler='dassl': expected one of coop, released"):
        datasets.build_dataset("dtd", data, 2, 1, tmp_path / "cache", sampler="dassl")
