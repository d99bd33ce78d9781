"""The domain-generalization targets of an ImageNet-trained model, in CoOp's layouts: ImageNet-V2
(matched frequency), ImageNet-Sketch, ImageNet-A and ImageNet-R. Test splits only; class names are
CLIP's ImageNet names (datasets/imagenet_classes.tsv). -V2 and -Sketch hold ImageNet's 1000 classes
with ImageNet's labels; -A and -R hold 200 of them, labelled 0-199 in ImageNet's order and evaluated
over their own 200 prompts (CoOp's protocol); `imagenet_labels` maps each class to its ImageNet label."""
import os

from .base import Benchmark, classnames_of, datasets_md, make_record
from .imagenet import ImageNet, clip_classnames


class ImageNetVariant(Benchmark):
    """Class folders under `image_dir` (wnids, or ImageNet label numbers for -V2); `all_classes`: the
    folders must be ImageNet's 1000."""

    test_only = True
    clip_template = ImageNet.clip_template
    all_classes = True
    folder_is_label = False

    def folder_wnid(self, folder, in_label_order):
        """The wnid of a class folder (None if it is no ImageNet class), given ImageNet's wnids in label order."""
        if self.folder_is_label:
            return in_label_order[int(folder)] if folder.isdigit() and int(folder) < len(in_label_order) else None
        return folder if folder in clip_classnames() else None

    def read(self):
        images = self.dir / self.image_dir
        if not images.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {images} is missing ({datasets_md(self.name)})")
        folders = [e.name for e in os.scandir(images) if e.is_dir()]
        names = clip_classnames()
        in_label_order = list(names)
        label_of = {w: i for i, w in enumerate(in_label_order)}  # ImageNet's labels
        wnids = {f: self.folder_wnid(f, in_label_order) for f in folders}
        unknown = sorted(f for f, w in wnids.items() if w is None)
        if unknown:
            raise ValueError(f"{self.name}: {images} has folders that are no ImageNet class, e.g. {unknown[0]} "
                             f"({datasets_md(self.name)})")
        if not folders or (self.all_classes and len(folders) != 1000):
            raise ValueError(f"{self.name}: {images} holds {len(folders)} class folders, expected "
                             f"{'1000' if self.all_classes else 'some'} ({datasets_md(self.name)})")
        order = sorted(folders, key=lambda f: label_of[wnids[f]])
        self.imagenet_labels = [label_of[wnids[f]] for f in order]
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # here: torchvision imports torch

        index = {f: i for i, f in enumerate(order)}
        test = [make_record(p, y, names[wnids[order[y]]])
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
