"""Your own images as a dataset: `dataset=folder dataset.root=PATH`, with the benchmarks' few-shot
protocol, caches, trial identity and errors.

Layouts (DATASETS.md#your-own-data):
- PATH/<class>/<image>: one folder per class, any depth of images below it;
- PATH/{train,val,test}/<class>/<image>: the splits given (val may be left out);
- dataset.csv=FILE: rows `path,label[,split]` (a header line), paths relative to the CSV's folder.
Classes are the folder names (or the CSV's labels), labelled in sorted order; their prompt names are
the same with underscores and hyphens as spaces, or come from PATH/classnames.txt or
dataset.classnames=FILE ("<class> <name>" per line). Without given splits, each class is split with
random.Random(dataset.split_seed) in the fractions dataset.split (train, val, test; CoOp's 0.5, 0.2,
0.3), written once under <cache_dir>/folder_splits/ in CoOp's split-JSON format and reused, so that
every trial of a sweep sees the same test images; new or removed images make a new split.
"""
import csv
import hashlib
import logging
import os
import random
from collections import defaultdict
from pathlib import Path

from so.files import write_json_atomic

from .base import Benchmark, make_record, path_inside, read_name_lines, read_split_json

log = logging.getLogger(__name__)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "val", "test")
HINT = "see DATASETS.md#your-own-data"


def prompt_name(key):
    return key.replace("_", " ").replace("-", " ")


def check_split(split):
    if not (isinstance(split, (list, tuple)) and len(split) == 3
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in split)
            and abs(sum(split) - 1) < 1e-6 and split[0] > 0 and split[2] > 0):
        raise ValueError(f"dataset.split={split!r}: expected the fractions [train, val, test] of each class, "
                         f"summing to 1, train and test above 0 ({HINT})")


class FolderDataset(Benchmark):
    """A folder (or a CSV) of your images; see the module docstring."""

    needs_cache_dir = True  # its split is written under the cache folder
    docs = "your-own-data"  # the DATASETS.md section its errors point to

    def __init__(self, root, cache_dir, csv=None, classnames=None, split=(0.5, 0.2, 0.3), split_seed=0):
        if root is None:
            raise ValueError(f"dataset.root is not set: pass dataset.root=/path/to/your/images ({HINT})")
        root = Path(os.path.normpath(Path(root).expanduser().absolute()))
        if not root.is_dir():
            raise FileNotFoundError(f"dataset.root={root}: not a folder ({HINT})")
        check_split(split)
        if type(split_seed) is not int:
            raise ValueError(f"dataset.split_seed={split_seed!r}: expected an integer ({HINT})")
        self.root = self.dir = root
        self.name = root.name  # as the config's resolver names it (datasets.catalog.folder_config)
        self.key = f"{self.name}-{hashlib.blake2b(str(root).encode(), digest_size=4).hexdigest()}"  # two of one name
        self.csv = None if csv is None else Path(root / Path(csv).expanduser())
        self.classnames_file = Path(root / Path(classnames).expanduser()) if classnames else root / "classnames.txt"
        if classnames and not self.classnames_file.is_file():
            raise FileNotFoundError(f"dataset.classnames={classnames}: {self.classnames_file} does not exist ({HINT})")
        self.split, self.split_seed, self.cache_dir = tuple(split), split_seed, Path(cache_dir).expanduser()
        self.image_dir, self.split_file = ".", ""

    @property
    def source(self):
        return self.csv or self.root

    @property
    def cache_name(self):
        """Its name and a hash of its source and splits (set by read_splits): two folders of one name,
        or one folder before and after its images changed, keep their few-shot subsets apart."""
        return f"{self.key}-{self.content}"

    def read_splits(self):
        entries = self.read_csv() if self.csv else self.scan()  # (absolute path, class key, split or None)
        keys = sorted({key for _, key, _ in entries})
        names = self.read_classnames(keys)
        given = {split for _, _, split in entries}
        if given != {None}:
            if None in given or "train" not in given or "test" not in given:
                raise ValueError(f"{self.name}: {self.source} gives a split to some images only, or no train or test "
                                 f"images; give every image its split, train and test at least ({HINT})")
            label = {key: i for i, key in enumerate(keys)}
            splits = {s: [make_record(p, label[k], names[k]) for p, k, split in entries if split == s] for s in SPLITS}
        else:
            splits = self.split_once(entries, keys, names)
        content = sorted((r.path, r.label, r.classname, s) for s, records in splits.items() for r in records)
        self.content = hashlib.blake2b(repr((str(self.source), content)).encode(), digest_size=4).hexdigest()
        return splits

    def scan(self):
        """(path, class key, split) of every image under the root's class folders."""
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not folders:
            raise ValueError(f"{self.name}: {self.root} holds no class folder ({HINT})")
        split_level = set(folders) <= set(SPLITS)
        entries, seen = [], {}
        for split in (folders if split_level else [None]):
            base = self.root / split if split else self.root
            for key in sorted(e.name for e in os.scandir(base) if e.is_dir()):
                images = sorted(p for p in (base / key).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
                if not images:
                    raise ValueError(f"{self.name}: class folder {base / key} holds no image (extensions "
                                     f"{', '.join(EXTENSIONS)}) ({HINT})")
                entries += [(str(p), key, split) for p in images]
        for path, key, split in entries:
            if seen.setdefault(os.path.realpath(path), split) != split:
                raise ValueError(f"{self.name}: {path} is in two splits, {seen[os.path.realpath(path)]} and {split} ({HINT})")
        return entries

    def read_csv(self):
        """(path, class key, split) of every row of dataset.csv."""
        if not self.csv.is_file():
            raise FileNotFoundError(f"dataset.csv: {self.csv} does not exist ({HINT})")
        with open(self.csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), set(reader.fieldnames or ())
        if not {"path", "label"} <= columns:
            raise ValueError(f"{self.name}: {self.csv} needs a header with the columns path,label[,split]; it has "
                             f"{sorted(columns)} ({HINT})")
        entries, first = [], {}
        for line, row in enumerate(rows, 2):
            where = f"{self.name}: {self.csv} line {line}"
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise ValueError(f"{where}: split {split!r}; expected one of {', '.join(SPLITS)} ({HINT})")
            label = (row.get("label") or "").strip()
            if not label or not (row.get("path") or "").strip():
                raise ValueError(f"{where}: an empty path or label ({HINT})")
            path = path_inside(self.csv.parent, row["path"].strip(), where)
            if first.setdefault(path, (line, split))[1] != split:
                raise ValueError(f"{where}: {path} is in two splits, {first[path][1]} (line {first[path][0]}) and "
                                 f"{split} ({HINT})")
            entries.append((path, label, split))
        if not entries:
            raise ValueError(f"{self.name}: {self.csv} lists no image ({HINT})")
        return entries

    def read_classnames(self, keys):
        """Class key -> prompt name: classnames.txt where there is one, else the key with spaces."""
        if not self.classnames_file.is_file():
            return {key: prompt_name(key) for key in keys}
        names = {}
        for key, (name, n) in read_name_lines(self.classnames_file, self.name, "class", self.docs).items():
            if key not in keys:
                raise ValueError(f"{self.name}: {self.classnames_file} line {n}: {key!r} is not a class of "
                                 f"{self.source} (classes: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}) ({HINT})")
            names[key] = name
        unnamed = [key for key in keys if key not in names]
        if unnamed:
            raise ValueError(f"{self.name}: {self.classnames_file} names no class {unnamed[0]!r} ({len(unnamed)} "
                             f"unnamed) ({HINT})")
        return names

    def split_once(self, entries, keys, names):
        """Each class split in the fractions of dataset.split, with random.Random(split_seed); the
        split written once in CoOp's format (paths relative to the root) and read from then on."""
        relative = sorted((Path(os.path.relpath(p, self.root)).as_posix(), k) for p, k, _ in entries)
        digest = hashlib.blake2b(repr((relative, self.split, self.split_seed)).encode(), digest_size=8).hexdigest()
        path = self.cache_dir / "folder_splits" / self.key / f"split_{digest}.json"
        if path.is_file():
            log.info("%s: the split of %s is read from %s.", self.name, self.source, path)
        else:
            per_class, rng, split = defaultdict(list), random.Random(self.split_seed), {s: [] for s in SPLITS}
            for rel, key in relative:
                per_class[key].append(rel)
            label = {key: i for i, key in enumerate(keys)}
            for key in keys:
                images = per_class[key]
                rng.shuffle(images)
                n = len(images)
                n_test = max(1, round(n * self.split[2])) if n >= 2 else 0
                n_val = min(round(n * self.split[1]), n - n_test - 1)
                parts = {"test": images[:n_test], "val": images[n_test:n_test + n_val],
                         "train": images[n_test + n_val:]}
                for s, rels in parts.items():
                    split[s] += [[rel, label[key], names[key]] for rel in rels]
            write_json_atomic(path, split, indent=1)
            log.info("%s: split %s into train %d, val %d, test %d (dataset.split=%s, seed %d), written to %s.",
                     self.name, self.source, *(len(split[s]) for s in SPLITS), list(self.split), self.split_seed, path)
        return read_split_json(path, ".", self.root, self.name)
