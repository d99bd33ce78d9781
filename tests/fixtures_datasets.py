"""Tiny copies of the 11 benchmarks in their exact on-disk layouts (CoOp folder names, split JSON,
FGVC's variant files, ImageNet's wnid folders and classnames.txt), written by the tests.

`write_benchmark(root, name)` writes one and returns what a correct loader must report."""
import json
import random
from pathlib import Path

from PIL import Image

TRAIN = (5, 6, 7)  # train images per class (differ, so counts are checked per class)
VAL, TEST = 4, 3  # per class

# name: (folder, image dir, split file, [(class name in the split, relative path pattern)])
SPLIT_JSON = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   [("accordion", "accordion/image_{i:04d}.jpg"), ("airplane", "airplane/image_{i:04d}.jpg"),
                    ("anchor", "anchor/image_{i:04d}.jpg")]),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    [("abyssinian", "Abyssinian_{i}.jpg"), ("american_bulldog", "american_bulldog_{i}.jpg"),
                     ("american_pit_bull_terrier", "american_pit_bull_terrier_{i}.jpg")]),
    "stanford_cars": ("stanford_cars", ".", "split_zhou_StanfordCars.json",
                      [("2000 AM General Hummer SUV", "cars_{split}/0{i:04d}.jpg"),
                       ("2012 Acura RL Sedan", "cars_{split}/1{i:04d}.jpg"),
                       ("2012 Acura TL Sedan", "cars_{split}/2{i:04d}.jpg")]),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       [("pink primrose", "image_0{i:04d}.jpg"), ("hard-leaved pocket orchid", "image_1{i:04d}.jpg"),
                        ("canterbury bells", "image_2{i:04d}.jpg")]),
    "food101": ("food-101", "images", "split_zhou_Food101.json",
                [("apple_pie", "apple_pie/{i}.jpg"), ("baby_back_ribs", "baby_back_ribs/{i}.jpg"),
                 ("baklava", "baklava/{i}.jpg")]),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json",
               [("abbey", "a/abbey/sun_{i:04d}.jpg"), ("airplane cabin", "a/airplane_cabin/sun_{i:04d}.jpg"),
                ("indoor apse", "a/apse/indoor/sun_{i:04d}.jpg")]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
            [("banded", "banded/banded_{i:04d}.jpg"), ("blotchy", "blotchy/blotchy_{i:04d}.jpg"),
             ("braided", "braided/braided_{i:04d}.jpg")]),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                [("Annual Crop Land", "AnnualCrop/AnnualCrop_{i}.jpg"), ("Forest", "Forest/Forest_{i}.jpg"),
                 ("Herbaceous Vegetation Land", "HerbaceousVegetation/HerbaceousVegetation_{i}.jpg")]),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               [("Apply_Eye_Makeup", "Apply_Eye_Makeup/v_ApplyEyeMakeup_g{i:02d}_c01.jpg"),
                ("Apply_Lipstick", "Apply_Lipstick/v_ApplyLipstick_g{i:02d}_c01.jpg"),
                ("Archery", "Archery/v_Archery_g{i:02d}_c01.jpg")]),
}
# FGVC: class order is the line order of variants.txt, deliberately not alphabetical.
FGVC_VARIANTS = ["747-400", "A320", "F-16A/B", "Cessna 172"]
IMAGENET = {"n01491361": "tiger shark", "n01440764": "tench", "n01484850": "great white shark",
            "n01443537": "goldfish"}  # classnames.txt order; labels follow the sorted wnids
NAMES = sorted(SPLIT_JSON) + ["fgvc_aircraft", "imagenet"]


def jpeg(path, label, i, size=(24, 18)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40 * label % 256, 17 * i % 256, 90)).save(path, quality=90)


def counts(n_classes, split):
    return [TRAIN[c % len(TRAIN)] if split == "train" else VAL if split == "val" else TEST
            for c in range(n_classes)]


def write_benchmark(root, name, folder=None):
    """Write benchmark `name` under `root` (in `folder`, default the CoOp one) and return the expected
    {"dir", "classnames", "counts": {split: per-class counts}}."""
    root = Path(root)
    if name == "imagenet":
        return write_imagenet(root, folder or "imagenet")
    if name == "fgvc_aircraft":
        return write_fgvc(root, folder or "fgvc_aircraft")
    default, image_dir, split_file, classes = SPLIT_JSON[name]
    d = root / (folder or default)
    split, n = {}, 0
    for s in ("train", "val", "test"):
        entries = []
        for label, (cname, pattern) in enumerate(classes):
            for _ in range(counts(len(classes), s)[label]):
                rel = pattern.format(i=n, split="test" if s == "test" else "train")
                jpeg(d / image_dir / rel, label, n)
                entries.append([rel, label, cname])
                n += 1
        random.Random(len(entries)).shuffle(entries)  # labels must come from entries, not order
        split[s] = entries
    (d / split_file).write_text(json.dumps(split))
    return {"dir": d, "classnames": [c.replace("_", " ") for c, _ in classes],
            "counts": {s: counts(len(classes), s) for s in ("train", "val", "test")}}


def write_fgvc(root, folder):
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "variants.txt").write_text("\n".join(FGVC_VARIANTS) + "\n")
    n = 0
    for s in ("train", "val", "test"):
        lines = []
        for label, variant in enumerate(FGVC_VARIANTS):
            for _ in range(counts(len(FGVC_VARIANTS), s)[label]):
                image_id = f"{1000000 + n:07d}"
                jpeg(d / "images" / f"{image_id}.jpg", label, n)
                lines.append(f"{image_id} {variant}")
                n += 1
        random.Random(n).shuffle(lines)
        (d / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")
    return {"dir": d, "classnames": FGVC_VARIANTS,
            "counts": {s: counts(len(FGVC_VARIANTS), s) for s in ("train", "val", "test")}}


def write_imagenet(root, folder, images="images"):
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"{w} {name}\n" for w, name in IMAGENET.items()))
    wnids = sorted(IMAGENET)
    for label, wnid in enumerate(wnids):
        for i in range(counts(len(wnids), "train")[label]):
            jpeg(d / images / "train" / wnid / f"{wnid}_{i}.JPEG", label, i)
        for i in range(TEST):
            jpeg(d / images / "val" / wnid / f"ILSVRC2012_val_{label * TEST + i + 1:08d}.JPEG", label, i)
        (d / images / "train" / wnid / "notes.txt").write_text("not an image")
    return {"dir": d, "classnames": [IMAGENET[w] for w in wnids],
            "counts": {"train": counts(len(wnids), "train"), "val": [0] * len(wnids), "test": [TEST] * len(wnids)}}


DG_FOLDERS = {"imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
              "imagenet_sketch": ("imagenet-sketch", "images"), "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
              "imagenet_r": ("imagenet-rendition", "imagenet-r")}
DG_SUBSET = ["n01608432", "n01443537", "n01491361"]  # kite, goldfish, tiger shark: ImageNet labels 21, 1, 3


def write_imagenet_variant(root, name, per_class=2):
    """A domain-generalization target in CoOp's layout: -V2's 1000 folders named by ImageNet label,
    -Sketch's 1000 wnid folders (one image each), or 3 wnid folders of -A / -R (`per_class` images)."""
    from datasets.imagenet import clip_classnames

    folder, images = DG_FOLDERS[name]
    d = Path(root) / folder / images
    if name in ("imagenet_v2", "imagenet_sketch"):
        for label, wnid in enumerate(clip_classnames()):
            jpeg(d / (str(label) if name == "imagenet_v2" else wnid) / f"{label}.jpeg", label, 0, size=(8, 8))
    else:
        for i, wnid in enumerate(DG_SUBSET):
            for n in range(per_class):
                jpeg(d / wnid / f"{name}_{i}_{n}.jpg", i, n)
        (d.parent / "README.txt").write_text("not a class folder")
    return d
