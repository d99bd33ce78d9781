"""Domain-generalization targets (ImageNet-V2, -Sketch, -A, -R) in CoOp's layouts, and the evaluation of a
saved ImageNet run on them."""
import json
import shutil

import pytest

import datasets
from tests.fixtures_datasets import DG_SUBSET, write_benchmark, write_imagenet_variant
from tests.test_main import FAST, main_py


def build(root, name):
    return datasets.build_dataset(name, root, 16, 1, root.parent / "cache")


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_the_200_class_targets_map_to_imagenet_labels(tmp_path, name):
    write_imagenet_variant(tmp_path / "data", name, per_class=3)
    ds = build(tmp_path / "data", name)
    # classes in ImageNet's order (goldfish 1, tiger shark 3, kite 21), relabelled 0..2, CLIP's names
    assert ds.imagenet_labels == [1, 3, 21]
    assert ds.classnames == ["goldfish", "tiger shark", "kite (bird of prey)"]
    assert sorted({(r.label, r.classname) for r in ds.test}) == [(0, "goldfish"), (1, "tiger shark"),
                                                                  (2, "kite (bird of prey)")]
    assert len(ds.test) == 9 and ds.train_x == [] and ds.val == []


@pytest.mark.parametrize("name", ["imagenet_v2", "imagenet_sketch"])
def test_the_1000_class_targets_keep_imagenet_labels(tmp_path, name):
    folder = write_imagenet_variant(tmp_path / "data", name)
    ds = build(tmp_path / "data", name)
    assert ds.imagenet_labels == list(range(1000)) and len(ds.classnames) == 1000
    kite = [r for r in ds.test if r.label == 21]
    assert [r.classname for r in kite] == ["kite (bird of prey)"]
    assert kite[0].path.startswith(str(folder / ("21" if name == "imagenet_v2" else "n01608432")))
    shutil.rmtree(folder / ("999" if name == "imagenet_v2" else "n15075141"))
    with pytest.raises(ValueError, match=f"{name}: {folder} holds 999 class folders, expected 1000"):
        build(tmp_path / "data", name)


def test_a_folder_that_is_no_imagenet_class_is_named(tmp_path):
    folder = write_imagenet_variant(tmp_path / "data", "imagenet_a")
    (folder / "n99999999").mkdir()
    with pytest.raises(ValueError, match="no ImageNet class, e.g. n99999999.*DATASETS.md#imagenet_a"):
        build(tmp_path / "data", "imagenet_a")
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match=f"imagenet_a: folder {folder} is missing"):
        build(tmp_path / "data", "imagenet_a")


@pytest.mark.slow
def test_a_saved_imagenet_run_is_evaluated_on_each_target(tmp_path):
    data = tmp_path / "data"
    write_benchmark(data, "imagenet")
    write_imagenet_variant(data, "imagenet_a", per_class=4)
    common = [*FAST, f"paths.data_root={data}", "method=adam", "optimizer.lr=1e-3", "shots=2", "name=dg"]
    main_py(tmp_path, *common, "dataset=imagenet", "save=true")
    source = tmp_path / "out" / "dg" / "imagenet" / "adam" / "2shot" / "seed1"
    trained = json.loads((source / "results.json").read_text())
    main_py(tmp_path, *common, "dataset=imagenet_a", "eval_only=true", f"trained_from={source}")
    target = json.loads((tmp_path / "out" / "dg" / "imagenet_a" / "adam" / "2shot" / "seed1" / "results.json").read_text())
    assert target["dataset"] == "imagenet_a" and target["iterations"] == 0 and target["top1"] is not None
    assert target["config"]["trained_from"] == str(source)
    main_py(tmp_path, *common, "dataset=imagenet", "eval_only=true", f"trained_from={source}", "name=dg_check")
    check = json.loads((tmp_path / "out" / "dg_check" / "imagenet" / "adam" / "2shot" / "seed1" / "results.json").read_text())
    assert check["top1"] == trained["top1"]  # the saved weights, loaded: the same accuracy on the same test split
    refused = main_py(tmp_path, *common, "dataset=imagenet_a", "name=dg_train", check=False)
    assert refused.returncode == 1 and "dataset=imagenet_a has no training split" in refused.stderr
