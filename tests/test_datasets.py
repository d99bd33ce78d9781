"""The 11 benchmark loaders and the synthetic one on fixtures in their exact on-disk layouts."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

import datasets
from datasets import check, synthetic
from datasets.base import Benchmark
from tests.fixtures_datasets import FGVC_VARIANTS, NAMES, write_benchmark, write_imagenet

SHOTS = 4


def per_class(records, n_classes):
    counts = Counter(r.label for r in records)
    return [counts[c] for c in range(n_classes)]


@pytest.mark.parametrize("name", NAMES)
def test_loader_reads_its_layout(tmp_path, name):
    expected = write_benchmark(tmp_path / "data", name)
    ds = datasets.build_dataset(name, tmp_path / "data", SHOTS, 1, tmp_path / "cache")
    n = len(expected["classnames"])
    assert ds.name == name
    assert ds.classnames == expected["classnames"]
    assert ds.templates == ["a photo of a {}."]
    assert ds.templates[0].format(ds.classnames[1]) == f"a photo of a {expected['classnames'][1]}."

    splits, _ = datasets.LOADERS[name](tmp_path / "data").read()
    for split, records in splits.items():
        assert per_class(records, n) == expected["counts"][split], split
    assert per_class(ds.test, n) == expected["counts"]["test"]
    assert per_class(ds.train_x, n) == [SHOTS] * n
    has_val = expected["counts"]["val"][0] > 0
    assert per_class(ds.val, n) == [min(SHOTS, 4) if has_val else 0] * n

    train_paths = {r.path for r in splits["train"]}
    assert len({r.path for r in ds.train_x}) == SHOTS * n and {r.path for r in ds.train_x} <= train_paths
    for r in ds.train_x + ds.val + ds.test:
        assert os.path.isabs(r.path) and os.path.isfile(r.path)
        assert r.path.startswith(str(expected["dir"]) + os.sep)
        assert r.classname == ds.classnames[r.label]


def test_special_naming_rules(tmp_path):
    for name in ("fgvc_aircraft", "imagenet", "eurosat", "oxford_pets", "ucf101", "sun397"):
        write_benchmark(tmp_path, name)
    build = lambda name: datasets.build_dataset(name, tmp_path, 1, 1, tmp_path / "cache")
    fgvc = build("fgvc_aircraft")  # line order of variants.txt, not alphabetical
    assert fgvc.classnames == FGVC_VARIANTS and fgvc.classnames != sorted(FGVC_VARIANTS)
    image_id, variant = (tmp_path / "fgvc_aircraft/images_variant_test.txt").read_text().splitlines()[0].split(" ", 1)
    by_file = {os.path.basename(r.path): r.label for r in fgvc.test}
    assert by_file[f"{image_id}.jpg"] == FGVC_VARIANTS.index(variant)
    # ImageNet: labels follow the sorted wnid folders, names come from classnames.txt (other order)
    assert build("imagenet").classnames == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert all(r.path.endswith(".JPEG") for r in build("imagenet").test)  # notes.txt is skipped
    assert build("eurosat").classnames == ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"]
    assert build("oxford_pets").classnames[1] == "american bulldog"  # underscores -> spaces
    assert build("ucf101").classnames[0] == "Apply Eye Makeup"
    assert build("sun397").classnames[2] == "indoor apse"


ALIASES = [("dtd", "DTD"), ("food101", "Food101"), ("oxford_flowers", "Flower102"), ("sun397", "SUN397"),
           ("oxford_pets", "OxfordPets"), ("caltech101", "Caltech101"), ("ucf101", "UCF101"),
           ("stanford_cars", "StanfordCars"), ("fgvc_aircraft", "fgvc-aircraft-2013b/data")]


@pytest.mark.parametrize("name,folder", ALIASES)
def test_fork_folder_names_are_accepted(tmp_path, name, folder):
    expected = write_benchmark(tmp_path, name, folder=folder)
    ds = datasets.build_dataset(name, tmp_path, 2, 1, tmp_path / "cache")
    assert ds.classnames == expected["classnames"]
    assert all(r.path.startswith(str(tmp_path / folder) + os.sep) for r in ds.test)


def test_imagenet_fork_layout_without_images_folder(tmp_path):
    write_imagenet(tmp_path, "imagenet", images=".")
    ds = datasets.build_dataset("imagenet", tmp_path, 2, 1, tmp_path / "cache")
    assert len(ds.classnames) == 4 and len(ds.test) == 12
    assert all(f"{os.sep}imagenet{os.sep}val{os.sep}" in r.path for r in ds.test)


@pytest.mark.parametrize("name,template", [("dtd", "{} texture."), ("eurosat", "a centered satellite photo of {}."),
                                           ("imagenet", "a photo of a {}.")])
def test_clip_templates_option(tmp_path, name, template):
    write_benchmark(tmp_path, name)
    ds = datasets.build_dataset(name, tmp_path, 1, 1, tmp_path / "cache", templates="clip")
    assert ds.templates == [template]
    with pytest.raises(ValueError, match="dataset.templates='ensemble': expected one of photo, clip, ensemble7, imagenet80"):
        datasets.build_dataset(name, tmp_path, 1, 1, tmp_path / "cache", templates="ensemble")


def test_template_sets_and_lists(tmp_path):
    """The named ensembles are open_clip's lists; a list is taken as given; each template has one {}."""
    write_benchmark(tmp_path, "dtd")
    build = lambda templates: datasets.build_dataset("dtd", tmp_path, 1, 1, tmp_path / "cache",  # noqa: E731
                                                     templates=templates).templates
    seven, eighty = build("ensemble7"), build("imagenet80")
    assert len(seven) == 7 and seven[0] == "itap of a {}." and "a photo of the small {}." in seven
    assert len(eighty) == 80 and eighty[0] == "a bad photo of a {}." and eighty[-1] == "a tattoo of the {}."
    assert build(["a photo of a {}.", "a sketch of a {}."]) == ["a photo of a {}.", "a sketch of a {}."]
    for bad in (["no slot"], ["{} and {}"], [], "photos"):
        with pytest.raises(ValueError, match=r"dataset.templates="):
            build(bad)


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset.name 'dtd2'.*imagenet.*ucf101"):
        datasets.build_dataset("dtd2", tmp_path, 1, 1, tmp_path)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("cache") / "synthetic")


def test_synthetic_goes_through_the_split_json_loader(tmp_path, synthetic_root):
    ds = datasets.build_dataset("synthetic", synthetic_root, 4, 1, tmp_path)
    assert issubclass(datasets.LOADERS["synthetic"], Benchmark)  # and it uses the shared split-JSON reader
    assert datasets.LOADERS["synthetic"].read_splits is Benchmark.read_splits
    assert len(ds.classnames) == 8 and ds.classnames[0] == "red circle" and ds.classnames[-1] == "pink heart"
    assert per_class(ds.test, 8) == [20] * 8 and per_class(ds.train_x, 8) == [4] * 8
    split = json.loads((synthetic_root / synthetic.SPLIT_FILE).read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [256, 32, 160]
    assert split["train"][0] == ["red_circle/train_000.png", 0, "red circle"]


def test_synthetic_is_generated_once_deterministically_and_atomically(tmp_path, synthetic_root):
    a, b = synthetic_root, synthetic.generate(tmp_path / "b")
    image = "images/yellow_triangle/test_007.png"
    assert (a / image).read_bytes() == (b / image).read_bytes()
    assert (a / synthetic.SPLIT_FILE).read_bytes() == (b / synthetic.SPLIT_FILE).read_bytes()
    before = os.stat(b / image).st_mtime_ns
    synthetic.generate(b)  # complete: nothing is rewritten
    assert os.stat(b / image).st_mtime_ns == before
    (b / synthetic.SPLIT_FILE).unlink()  # as if interrupted before the split file: regenerated
    (b / image).write_bytes(b"partial")
    assert not synthetic.is_complete(b)
    synthetic.generate(b)
    assert synthetic.is_complete(b) and (a / image).read_bytes() == (b / image).read_bytes()
    assert not list(b.rglob("*.tmp"))


@pytest.mark.slow  # datasets.check in subprocesses
def test_check_lists_usable_and_missing(tmp_path, capsys):
    for name in ("dtd", "eurosat", "food101", "imagenet"):
        write_benchmark(tmp_path, name)
    (tmp_path / "food-101" / "split_zhou_Food101.json").unlink()
    next((tmp_path / "eurosat" / "2750").rglob("*.jpg")).unlink()
    assert check.main(["--root", str(tmp_path)]) == 1
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.split()[0] in ("ok", "MISSING")}
    assert len(lines) == 11
    assert lines["dtd"].startswith("ok") and "3 classes, train 18, val 12, test 9" in lines["dtd"]
    assert lines["imagenet"].startswith("ok") and "4 classes" in lines["imagenet"]
    assert lines["food101"].startswith("MISSING") and "split_zhou_Food101.json is missing" in lines["food101"]
    assert lines["eurosat"].startswith("MISSING") and "1 listed image(s) missing" in lines["eurosat"]
    assert lines["sun397"].startswith("MISSING") and "no dataset folder" in lines["sun397"]
    assert not (tmp_path / "fewshot").exists()  # nothing written
    run = lambda *names: subprocess.run([sys.executable, "-m", "datasets.check", "--root", str(tmp_path), *names],
                                        cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True)
    assert run("dtd").returncode == 0 and "1 of 1 usable" in run("dtd").stdout
    assert run("dtd", "food101").returncode == 1
    assert run("dtd2").returncode == 2


def test_check_reads_the_data_root_from_DATA_and_says_when_neither_is_set(tmp_path, monkeypatch, capsys):
    write_benchmark(tmp_path, "dtd")
    monkeypatch.setenv("DATA", str(tmp_path))
    assert check.main(["dtd"]) == 0 and "1 of 1 usable" in capsys.readouterr().out
    monkeypatch.delenv("DATA")
    with pytest.raises(SystemExit) as exit_:
        check.main(["dtd"])
    assert exit_.value.code == 2
    assert "no data root: pass --root /path/to/data or set DATA" in capsys.readouterr().err
