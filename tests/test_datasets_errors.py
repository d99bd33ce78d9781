"""Every bad input gets an error that names what is wrong and the DATASETS.md section."""
import json
import re
import shutil
from pathlib import Path

import pytest

import datasets
from datasets.pipeline import TrainImages, test_loader
from tests.fixtures_datasets import write_benchmark

SPLIT = "split_zhou_DescribableTextures.json"


@pytest.fixture
def data(tmp_path):
    write_benchmark(tmp_path / "data", "dtd")
    return tmp_path / "data"


def build(root, name="dtd"):
    return datasets.build_dataset(name, root, 2, 1, root.parent / "cache")


def edit_split(data, edit):
    path = data / "dtd" / SPLIT
    split = json.loads(path.read_text())
    edit(split)
    path.write_text(json.dumps(split))
    return path


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"data root {tmp_path / 'nowhere'} does not exist.*DATASETS.md#layout"):
        build(tmp_path / "nowhere")


def test_missing_dataset_folder(data):
    with pytest.raises(FileNotFoundError, match=f"eurosat: no dataset folder under {data}; looked for eurosat "
                                                f"\\(see DATASETS.md#eurosat\\)"):
        build(data, "eurosat")


def test_missing_split_file(data):
    (data / "dtd" / SPLIT).unlink()
    with pytest.raises(FileNotFoundError, match=f"split file {data / 'dtd' / SPLIT} is missing.*DATASETS.md#dtd"):
        build(data)


def test_malformed_split_json(data):
    (data / "dtd" / SPLIT).write_text('{"train": [["banded/x.jpg", 0, "banded"]')
    with pytest.raises(ValueError, match=f"{SPLIT} is not valid JSON .*line 1.*DATASETS.md#dtd"):
        build(data)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("val"), "must be a JSON object with lists 'train', 'val' and 'test'"),
    (lambda s: s["train"].__setitem__(3, ["banded/x.jpg", "0", "banded"]),
     r"train\[3\] = \['banded/x.jpg', '0', 'banded'\]; expected \[relative image path, integer label, class name\]"),
    (lambda s: s["test"][0].__setitem__(2, "other name"), "gives label .* two names"),
    (lambda s: [e.__setitem__(1, 5) for e in s["test"] if e[1] == 2], r"labels .* must be 0..C-1 without gaps"),
])
def test_malformed_split_entries(data, edit, match):
    edit_split(data, edit)
    with pytest.raises(ValueError, match=match):
        build(data)


@pytest.mark.parametrize("rel", ["../../outside.jpg", "banded/../../../outside.jpg", "/etc/hostname"])
def test_split_entry_outside_the_dataset_folder_is_rejected(data, rel):
    edit_split(data, lambda s: s["test"][0].__setitem__(0, rel))
    with pytest.raises(ValueError, match=f"test\\[0\\]: path '{re.escape(rel)}' resolves outside the dataset folder "
                                         f"{data / 'dtd'}"):
        build(data)


def test_listed_image_missing(data):
    split = json.loads((data / "dtd" / SPLIT).read_text())
    gone = data / "dtd" / "images" / split["test"][0][0]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=f"dtd: 1 image\\(s\\) listed in .*{SPLIT} are missing, e.g. {gone} "
                                                f"\\(see DATASETS.md#dtd\\)"):
        build(data)


def test_corrupt_image_is_named_when_decoded(data):
    ds = build(data)
    bad = ds.train_x[1].path
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(OSError, match=f"cannot read image {bad}: .*DATASETS.md#missing-or-unreadable-images"):
        TrainImages(ds.train_x, "cpu", 16, (0.5,) * 3, (0.5,) * 3)
    identity = lambda image: 0
    for workers in (0, 1):
        with pytest.raises(OSError, match=f"cannot read image {bad}"):
            list(test_loader(ds.train_x, identity, batch_size=4, num_workers=workers))


def test_imagenet_flat_val(tmp_path):
    write_benchmark(tmp_path, "imagenet")
    val = tmp_path / "imagenet" / "images" / "val"
    for image in list(val.rglob("*.JPEG")):
        image.rename(val / image.name)
    for wnid in [d for d in val.iterdir() if d.is_dir()]:
        wnid.rmdir()
    with pytest.raises(ValueError, match=f"{val} holds the images directly \\(flat\\); it needs one subfolder per "
                                         f"wnid.*DATASETS.md#imagenet-val-preparation"):
        build(tmp_path, "imagenet")


def test_imagenet_classnames_file(tmp_path):
    """classnames_from=file reads classnames.txt and names a wnid it lacks; the default (CLIP's list)
    needs no file."""
    write_benchmark(tmp_path, "imagenet")
    names = tmp_path / "imagenet" / "classnames.txt"
    names.write_text("\n".join(names.read_text().splitlines()[1:]))  # drops the first line's wnid
    from_file = lambda: datasets.build_dataset("imagenet", tmp_path, 2, 1, tmp_path / "cache", classnames_from="file")
    with pytest.raises(ValueError, match=f"{names} has no name for 1 wnid\\(s\\), e.g. n01491361"):
        from_file()
    names.unlink()
    with pytest.raises(FileNotFoundError, match=f"{names} is missing.*DATASETS.md#imagenet"):
        from_file()
    assert build(tmp_path, "imagenet").classnames == ["tench", "goldfish", "great white shark", "tiger shark"]
    with pytest.raises(ValueError, match="dataset.classnames_from='wordnet': expected one of clip, file"):
        datasets.build_dataset("imagenet", tmp_path, 2, 1, tmp_path / "cache", classnames_from="wordnet")


def test_imagenet_wordnet_classnames_are_flagged(tmp_path):
    """A WordNet-style classnames.txt (the names in circulation: "cock", "water ouzel", "kite") differs
    from CLIP's list; the warning names its first differing lines, and the key picks the list used."""
    write_benchmark(tmp_path, "imagenet")
    names = tmp_path / "imagenet" / "classnames.txt"
    names.write_text("n01491361 tiger shark\nn01440764 tench, Tinca tinca\nn01484850 great white shark\n"
                     "n01443537 goldfish, Carassius auratus\n")
    with pytest.warns(UserWarning) as caught:
        clip = build(tmp_path, "imagenet")
    message = str(caught[0].message)
    assert f"{names} names 2 of 4 classes unlike CLIP's list" in message
    assert message.index("line 2: n01440764 'tench, Tinca tinca' there, 'tench' in CLIP's list") \
        < message.index("line 4: n01443537 'goldfish, Carassius auratus' there, 'goldfish' in CLIP's list")
    assert "using the CLIP names" in message
    assert clip.classnames == ["tench", "goldfish", "great white shark", "tiger shark"]
    with pytest.warns(UserWarning, match="using the file names"):
        ds = datasets.build_dataset("imagenet", tmp_path, 2, 1, tmp_path / "cache", classnames_from="file")
    assert ds.classnames == ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark", "tiger shark"]


def test_imagenet_val_wnids_must_match_train(tmp_path):
    write_benchmark(tmp_path, "imagenet")
    shutil.rmtree(tmp_path / "imagenet/images/val/n01443537")
    with pytest.raises(ValueError, match="must hold the same non-empty set of wnid folders; 4 vs 3"):
        build(tmp_path, "imagenet")


def test_fgvc_unknown_variant(tmp_path):
    write_benchmark(tmp_path, "fgvc_aircraft")
    path = tmp_path / "fgvc_aircraft" / "images_variant_val.txt"
    lines = path.read_text()
    path.write_text(lines + "1999999 Boeing 999\n")
    with pytest.raises(ValueError, match=f"{path} line 17: variant 'Boeing 999' is not in .*variants.txt"):
        build(tmp_path, "fgvc_aircraft")
    path.write_text(lines)
    (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="annotation file .*images_variant_test.txt is missing .*#fgvc_aircraft"):
        build(tmp_path, "fgvc_aircraft")


def test_every_section_named_in_errors_exists_in_datasets_md():
    root = Path(__file__).resolve().parents[1]
    headings = re.findall(r"^#+ (.+)$", (root / "DATASETS.md").read_text(), flags=re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    code = "".join(p.read_text() for p in (root / "datasets").glob("*.py"))
    named = set(re.findall(r"datasets_md\('([\w-]+)'\)", code)) | set(re.findall(r"DATASETS.md#([\w-]+)", code))
    named |= {getattr(loader, "docs", None) or name for name, loader in datasets.LOADERS.items()}  # their sections
    assert len(named) > 15 and named <= anchors, named - anchors
