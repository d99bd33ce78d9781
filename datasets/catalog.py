"""Every dataset `dataset=` can name, in one table that the loaders, the configs and the sweep scripts
all read: the 11 benchmarks in the paper's column order, the domain-generalization targets, the
generated sandbox tasks, and `folder` (your own images). Standard library only, so that main.py registers their configs (Hydra's
ConfigStore: `dataset=<name>`) before torch is imported.

    python -m datasets.catalog            the 11 benchmarks, space-separated (scripts/_sweep.sh reads it)
"""
import sys
from pathlib import Path
from typing import NamedTuple


class SplitJSON(NamedTuple):
    """A benchmark read from CoOp's split JSON (datasets.base.read_split_json)."""
    folders: tuple        # its folder under the data root: CoOp's name first, then the forks' names
    image_dir: str        # relative to that folder; the split file's paths are relative to it
    split_file: str
    clip_template: str = "a photo of a {}."  # CoOp's per-dataset zero-shot template


# The nine benchmarks that differ only in where their files are (DATASETS.md has a section for each).
SPLIT_JSON = {
    "sun397": SplitJSON(("sun397", "SUN397"), "SUN397", "split_zhou_SUN397.json"),
    "eurosat": SplitJSON(("eurosat",), "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "stanford_cars": SplitJSON(("stanford_cars", "StanfordCars"), ".",  # paths start with cars_train/, cars_test/
                               "split_zhou_StanfordCars.json", "a photo of a {}."),
    "food101": SplitJSON(("food-101", "Food101"), "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "oxford_pets": SplitJSON(("oxford_pets", "OxfordPets"), "images", "split_zhou_OxfordPets.json",
                             "a photo of a {}, a type of pet."),
    "oxford_flowers": SplitJSON(("oxford_flowers", "Flower102"), "jpg", "split_zhou_OxfordFlowers.json",
                                "a photo of a {}, a type of flower."),
    "caltech101": SplitJSON(("caltech-101", "Caltech101"), "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": SplitJSON(("dtd", "DTD"), "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "ucf101": SplitJSON(("ucf101", "UCF101"), "UCF-101-midframes", "split_zhou_UCF101.json",
                        "a photo of a person doing {}."),
}
# The 11 benchmarks, in the paper's column order; imagenet and fgvc_aircraft have loaders of their own.
BENCHMARKS = ("imagenet", "sun397", "fgvc_aircraft", "eurosat", "stanford_cars", "food101", "oxford_pets",
              "oxford_flowers", "caltech101", "dtd", "ucf101")
# Test-only targets of an ImageNet-trained run (domain generalization), in CoOp's table order.
DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# Generated under the cache folder on first use (datasets/synthetic.py).
SANDBOX_TASKS = ("synthetic", "synthetic_compositions", "synthetic_shift")
# Your own images: dataset=folder dataset.root=PATH (datasets/folder.py); named after the folder.
FOLDER = "folder"


def config(name):
    """The `dataset=<name>` config: where it is read from and how it is prompted."""
    node = {"name": name, "root": "${paths.data_root}", "templates": "photo", "generated": False}
    if name == "imagenet":  # clip: CLIP's 1000 names (the released code's); file: classnames.txt
        node["classnames_from"] = "clip"
    if name in DG_TARGETS:
        node["test_only"] = True
    if name in SANDBOX_TASKS:
        node |= {"root": f"${{paths.cache_dir}}/{name}", "generated": True}
    return node


def folder_config():
    """`dataset=folder`: your images (datasets/folder.py), named after their folder in the output tree
    and the tables; its root is part of a trial's identity (for a benchmark, only where it is)."""
    return {"name": "${folder_name:${dataset.root}}", "loader": FOLDER, "root": None, "csv": None,
            "classnames": None, "split": [0.5, 0.2, 0.3], "split_seed": 0, "templates": "photo", "generated": False}


def register_configs():
    """Each dataset's config in Hydra's ConfigStore, group `dataset`, and the resolver of the folder
    dataset's name."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for name in (*BENCHMARKS, *DG_TARGETS, *SANDBOX_TASKS):
        store.store(group="dataset", name=name, node=config(name))
    store.store(group="dataset", name=FOLDER, node=folder_config())
    if not OmegaConf.has_resolver("folder_name"):
        OmegaConf.register_new_resolver("folder_name", lambda root: Path(str(root)).expanduser().name if root
                                        else FOLDER)


if __name__ == "__main__":
    sys.stdout.write(" ".join(BENCHMARKS) + "\n")
