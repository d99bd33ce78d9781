import functools
import os
import warnings
from pathlib import Path

from .base import Benchmark, datasets_md, make_record, read_name_lines


CLIP_CLASSNAMES = Path(__file__).with_name("imagenet_classes.tsv")  # "<wnid>\t<CLIP's name>", 1000 lines
CLASSNAMES = ("clip", "file")


@functools.cache
def clip_classnames():
    """wnid -> CLIP's class name, in ImageNet's label order (the sorted wnids). Read it, do not change it."""
    return dict(line.split("\t") for line in CLIP_CLASSNAMES.read_text(encoding="utf-8").splitlines())


class ImageNet(Benchmark):
    """No split JSON: wnid folders. Labels follow the sorted wnid folders of train/. Class names are
    CLIP's 1000 (the released SO and CLIP-LoRA code's list; datasets/imagenet_classes.tsv) or, with
    classnames_from="file", CoOp's classnames.txt ("<wnid> <name>" per line); where both exist, names that
    differ are reported. The val images are the test split (as in CoOp and every few-shot CLIP
    paper); ImageNet has no separate validation split, so `val` is empty (the released sampler draws
    the few-shot val from train: val_from_train). CoOp keeps the images
    under imagenet/images/{train,val}; the forks use imagenet/{train,val}."""

    name = "imagenet"
    folders = ("imagenet",)
    split_file = "classnames.txt"
    val_from_train = True

    def __init__(self, root, classnames_from="clip"):
        if classnames_from not in CLASSNAMES:
            raise ValueError(f"dataset.classnames_from={classnames_from!r}: expected one of {', '.join(CLASSNAMES)}")
        self.classnames_from = classnames_from
        super().__init__(root)

    def read_splits(self):
        images = self.dir / "images" if (self.dir / "images").is_dir() else self.dir
        train_dir, val_dir = images / "train", images / "val"
        for d in (train_dir, val_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{self.name}: folder {d} is missing ({datasets_md(self.name)})")
        wnids = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        val_wnids = sorted(e.name for e in os.scandir(val_dir) if e.is_dir())
        if not val_wnids and any(e.is_file() for e in os.scandir(val_dir)):
            raise ValueError(f"{self.name}: {val_dir} holds the images directly (flat); it needs one subfolder per "
                             f"wnid like train/. Sort it once ({datasets_md('imagenet-val-preparation')})")
        if not wnids or val_wnids != wnids:
            raise ValueError(f"{self.name}: {train_dir} and {val_dir} must hold the same non-empty set of wnid "
                             f"folders; {len(wnids)} vs {len(val_wnids)} ({datasets_md(self.name)})")
        names = self.names(wnids)
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # here: torchvision imports torch

        index = {w: i for i, w in enumerate(wnids)}
        read = lambda d: [make_record(p, y, names[wnids[y]]) for p, y in make_dataset(str(d), index, IMG_EXTENSIONS)]
        return {"train": read(train_dir), "val": [], "test": read(val_dir)}

    def names(self, wnids):
        """wnid -> class name from the chosen list, after comparing the two where both exist."""
        clip = clip_classnames()
        file = self.read_classnames() if self.classnames_from == "file" or self.source.is_file() else {}
        chosen = clip if self.classnames_from == "clip" else {w: name for w, (name, _) in file.items()}
        unnamed = [w for w in wnids if w not in chosen]
        if unnamed:
            where = "CLIP's 1000 ImageNet classes" if self.classnames_from == "clip" else str(self.source)
            raise ValueError(f"{self.name}: {where} has no name for {len(unnamed)} wnid(s), e.g. {unnamed[0]} "
                             f"({datasets_md(self.name)})")
        differ = [(line, w, name, clip[w]) for w, (name, line) in sorted(file.items(), key=lambda x: x[1][1])
                  if w in wnids and w in clip and name != clip[w]]
        if differ:
            shown = "; ".join(f"line {n}: {w} {a!r} there, {b!r} in CLIP's list" for n, w, a, b in differ[:3])
            warnings.warn(f"{self.name}: {self.source} names {len(differ)} of {len(wnids)} classes unlike CLIP's "
                          f"list, which the released code uses ({shown}); using the "
                          f"{'file' if self.classnames_from == 'file' else 'CLIP'} names "
                          f"(dataset.classnames_from=clip|file)", stacklevel=2)
        return chosen

    def read_classnames(self):
        """wnid -> (name, line number) from classnames.txt."""
        if not self.source.is_file():
            raise FileNotFoundError(f"{self.name}: {self.source} is missing ({datasets_md(self.name)})")
        return read_name_lines(self.source, self.name, "wnid", self.name)
