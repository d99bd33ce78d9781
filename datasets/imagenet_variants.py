"""The domain-generalization targets of an ImageNet-trained model, in CoOp's layouts: ImageNet-V2
(matched frequency), ImageNet-Sketch, ImageNet-A and ImageNet-R. Test splits only; class names are
CLIP's ImageNet names (datasets/imagenet_classes.tsv). -V2 and -Sketch hold ImageNet's 1000 classes
with ImageNet's labels; -A and -R hold 200 of them, labelled 0-199 in ImageNet's order and evaluated
over their own 200 prompts (CoOp's protocol); `imagenet_labels` maps each class to its ImageNet label."""
import os

from .base import Benchmark, classnames_of, datasets_md, make_record
from .imagenet import CLIP_CLASSNAMES, ImageNet

IMAGENET_WNIDS = [line.split("\t")[0] for line in CLIP_CLASSNAMES.read_text(encoding="utf-8").splitlines()]
CLIP_NAMES = dict(line.split("\t") for line in CLIP_CLASSNAMES.read_text(encoding="utf-8").splitlines())


class ImageNetVariant(Benchmark):
    """Class folders under `image_dir` (wnids, or ImageNet label numbers for -V2); `all_classes`: the
    folders must be ImageNet's 1000."""

    test_only = True
    clip_template = ImageNet.clip_template
    all_classes = True
    folder_is_label = False

    def folder_wnid(self, folder):
        if self.folder_is_label:
            return IMAGENET_WNIDS[int(folder)] if folder.isdigit() and int(folder) < 1000 else None
        return folder if folder in CLIP_NAMES else None

    def read(self):
        images = self.dir / self.image_dir
        if not images.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {images} is missing ({datasets_md(self.name)})")
        folders = [e.name for e in os.scandir(images) if e.is_dir()]
        wnids = {f: self.folder_wnid(f) for f in folders}
        unknown = sorted(f for f, w in wnids.items() if w is None)
        if unknown:
            raise ValueError(f"{self.name}: {images} has folders that are no ImageNet class, e.g. {unknown[0]} "
                             f"({datasets_md(self.name)})")
        if not folders or (self.all_classes and len(folders) != 1000):
            raise ValueError(f"{self.name}: {images} holds {len(folders)} class folders, expected "
                             f"{'1000' if self.all_classes else 'some'} ({datasets_md(self.name)})")
        order = sorted(folders, key=lambda f: IMAGENET_WNIDS.index(wnids[f]))
        self.imagenet_labels = [IMAGENET_WNIDS.index(wnids[f]) for f in order]
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # here: torchvision imports torch

        index = {f: i for i, f in enumerate(order)}
        test = [make_record(p, y, CLIP_NAMES[wnids[order[y]]])
                for p, y in make_dataset(str(images), index, IMG_EXTENSIONS)]
        splits = {"train": [], "val": [], "test": test}
        return splits, classnames_of(splits, self.name, images, needs_train=False)


class ImageNetV2(ImageNetVariant):
    name = "imagenet_v2"
    folders = ("imagenetv2",)
    image_dir = "imagenetv2-matched-frequency-format-val"
    folder_is_label = True


class ImageNetSketch(ImageNetVariant):
    name = "imagenet_sketch"
    folders = ("imagenet-sketch",)
    image_dir = "images"


class ImageNetA(ImageNetVariant):
    name = "imagenet_a"
    folders = ("imagenet-adversarial",)
    image_dir = "imagenet-a"
    all_classes = False


class ImageNetR(ImageNetVariant):
    name = "imagenet_r"
    folders = ("imagenet-rendition",)
    image_dir = "imagenet-r"
    all_classes = False
