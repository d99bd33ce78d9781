"""Your own images as a dataset (datasets/folder.py): the three layouts, class names, the split made once
and reused, and one message naming the file for each mistake."""
import json
import warnings

import pytest
from PIL import Image

import datasets

CLASSES = {"red_mug": (200, 30, 30), "blue-bottle": (30, 30, 200), "green_box": (30, 200, 30)}


def image(path, color=(128, 128, 128)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), color).save(path)


def image_folder(root, per_class=10):
    for key, color in CLASSES.items():
        for i in range(per_class):
            image(root / key / f"{i:02d}.jpg", color)
    return root


def build(root, cache, shots=2, **options):
    return datasets.build_dataset("folder", root, shots, 1, cache, **options)


def test_an_image_folder_is_split_once_stratified_and_named_after_its_folders(tmp_path):
    root = image_folder(tmp_path / "products")
    ds = build(root, tmp_path / "cache")
    assert ds.name == "products" and ds.classnames == ["blue bottle", "green box", "red mug"]  # sorted keys
    sizes = {split: len(records) for split, records in (("val", ds.val), ("test", ds.test))}
    assert len(ds.test) == 3 * 3 and sizes["val"] == 3 * 2  # 0.3 and 0.2 of 10 per class; train 5 per class
    assert len(ds.train_x) == 3 * 2 and {r.label for r in ds.test} == {0, 1, 2}
    (split_file,) = (tmp_path / "cache" / "folder_splits").rglob("split_*.json")
    split = json.loads(split_file.read_text())
    assert len(split["train"]) == 15 and split["test"][0][2] in ds.classnames  # CoOp's format
    assert not {r[0] for r in split["train"]} & {r[0] for r in split["test"]}
    again = build(root, tmp_path / "cache", shots=4)
    assert [r.path for r in again.test] == [r.path for r in ds.test]  # the same test images for every trial
    image(root / "red_mug" / "10.jpg")  # a new image: a new split, the old one kept
    build(root, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "folder_splits").rglob("split_*.json"))) == 2


def test_given_splits_and_a_classnames_file(tmp_path):
    root = tmp_path / "shop"
    for split, n in (("train", 3), ("test", 2)):
        for key in CLASSES:
            for i in range(n):
                image(root / split / key / f"{i}.png")
    (root / "classnames.txt").write_text("red_mug a red coffee mug\nblue-bottle a blue bottle\ngreen_box a green box\n")
    ds = build(root, tmp_path / "cache")
    assert ds.classnames == ["a blue bottle", "a green box", "a red coffee mug"]
    assert len(ds.test) == 6 and ds.val == [] and all("/test/" in r.path for r in ds.test)
    assert not (tmp_path / "cache" / "folder_splits").exists()  # given splits are not split again


def test_a_csv_with_and_without_splits(tmp_path):
    root = image_folder(tmp_path / "photos", per_class=4)
    rows = ["path,label,split"] + [f"{key}/{i:02d}.jpg,{key},{'test' if i == 3 else 'train'}"
                                   for key in CLASSES for i in range(4)]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    ds = build(root, tmp_path / "cache", csv="list.csv")
    assert len(ds.test) == 3 and ds.classnames == ["blue bottle", "green box", "red mug"]
    (root / "nosplit.csv").write_text("path,label\n" + "\n".join(f"{key}/{i:02d}.jpg,{key}" for key in CLASSES
                                                                  for i in range(4)) + "\n")
    assert len(build(root, tmp_path / "cache", csv="nosplit.csv").test) == 3  # split per class: 1 of 4 each


@pytest.mark.parametrize("mistake, message", [
    ("empty_class", r"class folder .*/products/empty_one holds no image"),
    ("csv_label", r"classnames.txt line 4: 'purple_cup' is not a class"),
    ("csv_two_splits", r"list.csv line 3: .*red_mug/00.jpg is in two splits, train \(line 2\) and test"),
    ("csv_outside", r"list.csv line 2: path '../elsewhere.jpg' resolves outside the dataset folder"),
    ("csv_bad_split", r"list.csv line 2: split 'holdout'; expected one of train, val, test"),
    ("folders_two_splits", r"is in two splits, test and train"),
    ("no_root", r"dataset.root=.*/nowhere: not a folder"),
    ("bad_fractions", r"dataset.split=\[0.5, 0.5, 0.0\]: expected the fractions \[train, val, test\]"),
])
def test_each_mistake_is_one_message_naming_the_file(tmp_path, mistake, message):
    root = image_folder(tmp_path / "products", per_class=3)
    options = {}
    if mistake == "empty_class":
        (root / "empty_one").mkdir()
    elif mistake == "csv_label":
        (root / "classnames.txt").write_text("red_mug mug\nblue-bottle bottle\ngreen_box box\npurple_cup cup\n")
    elif mistake.startswith("csv"):
        first = {"csv_two_splits": "red_mug/00.jpg,red_mug,train\nred_mug/00.jpg,red_mug,test",
                 "csv_outside": "../elsewhere.jpg,red_mug,train", "csv_bad_split": "red_mug/00.jpg,red_mug,holdout"}
        (root / "list.csv").write_text(f"path,label,split\n{first[mistake]}\n")
        options["csv"] = "list.csv"
    elif mistake == "folders_two_splits":
        for split in ("train", "test"):
            image(root.parent / "split" / split / "red_mug" / "a.jpg")
        (root.parent / "split" / "test" / "red_mug" / "b.jpg").symlink_to(root.parent / "split" / "train" / "red_mug" / "a.jpg")
        root = root.parent / "split"
    elif mistake == "no_root":
        root = tmp_path / "nowhere"
    elif mistake == "bad_fractions":
        options["split"] = [0.5, 0.5, 0.0]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build(root, tmp_path / "cache", **options)


def test_a_class_with_fewer_images_than_shots_is_drawn_with_replacement_and_said(tmp_path):
    root = image_folder(tmp_path / "products", per_class=4)  # 2 train images per class
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build(root, tmp_path / "cache", shots=4)
    assert len(ds.train_x) == 3 * 4 and any("fewer than 4 train images" in str(w.message) for w in caught)
