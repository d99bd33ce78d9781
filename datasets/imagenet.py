import os

from .base import Benchmark, datasets_md, make_record


class ImageNet(Benchmark):
    """No split JSON: wnid folders. Labels follow the sorted wnid folders of train/, names come from
    CoOp's classnames.txt ("<wnid> <name>" per line). The val images are the test split (as in CoOp
    and every few-shot CLIP paper); ImageNet has no separate validation split, so `val` is empty.
    CoOp keeps the images under imagenet/images/{train,val}; the forks use imagenet/{train,val}."""

    name = "imagenet"
    folders = ("imagenet",)
    split_file = "classnames.txt"

    def read_splits(self):
        names = self.read_classnames()
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
        unnamed = [w for w in wnids if w not in names]
        if unnamed:
            raise ValueError(f"{self.name}: {self.source} has no name for {len(unnamed)} wnid(s), e.g. {unnamed[0]} "
                             f"({datasets_md(self.name)})")
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # here: torchvision imports torch

        index = {w: i for i, w in enumerate(wnids)}
        read = lambda d: [make_record(p, y, names[wnids[y]]) for p, y in make_dataset(str(d), index, IMG_EXTENSIONS)]
        return {"train": read(train_dir), "val": [], "test": read(val_dir)}

    def read_classnames(self):
        if not self.source.is_file():
            raise FileNotFoundError(f"{self.name}: {self.source} is missing ({datasets_md(self.name)})")
        names = {}
        for n, line in enumerate(self.source.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            wnid, _, name = line.strip().partition(" ")
            if not name.strip():
                raise ValueError(f"{self.name}: {self.source} line {n}: expected '<wnid> <class name>', got "
                                 f"{line!r} ({datasets_md(self.name)})")
            names[wnid] = name.strip()
        return names
