"""The shared base of the benchmark loaders.

A `Benchmark` knows where one dataset lives under the data root and how to read its train/val/test
records (the CoOp split-JSON by default). `FewShotDataset` applies the few-shot protocol on top:
k images per class drawn with a seeded generator and cached as a small JSON file, so every method and
every re-run of (dataset, shots, seed) sees the same images. Errors name the file that is wrong and
the DATASETS.md section that explains the expected layout.
"""
import json
import os
import random
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from so.files import write_json_atomic

from . import templates as template_sets
from .templates import PHOTO_TEMPLATE

VAL_SHOTS = 4  # CoOp: the validation subset has min(shots, 4) images per class


def datasets_md(section):
    return f"see DATASETS.md#{section}"


@dataclass(frozen=True, slots=True)
class Record:
    path: str  # absolute image path
    label: int
    classname: str  # the prompt name: underscores already replaced by spaces


def make_record(path, label, classname):
    return Record(str(path), label, classname.replace("_", " "))


def path_inside(folder, rel, what, under="."):
    """Absolute path of `under`/`rel` in `folder`; rejects entries that lead out of `folder`.

    The check is lexical (no symlink resolution), so symlinked image folders keep working."""
    folder = os.path.normpath(folder)
    path = os.path.normpath(os.path.join(folder, under, rel))
    if not path.startswith(folder + os.sep):
        raise ValueError(f"{what}: path {rel!r} resolves outside the dataset folder {folder}; "
                         f"split entries must stay inside it ({datasets_md('split-files')})")
    return path


def read_json(path, what, section):
    """Parsed JSON from `path`, or an error that names the file and the DATASETS.md section."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing ({datasets_md(section)})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); download it again ({datasets_md(section)})") from None


def read_split_json(path, image_dir, dataset_dir, name):
    """Records of a CoOp split file: {"train"|"val"|"test": [[rel_impath, label, classname], ...]}."""
    data = read_json(path, f"{name}: split file", name)
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in ("train", "val", "test")):
        raise ValueError(f"{name}: split file {path} must be a JSON object with lists 'train', 'val' and "
                         f"'test' ({datasets_md('split-files')})")
    root = os.path.normpath(dataset_dir)
    splits = {}
    for split in ("train", "val", "test"):
        records = []
        for i, entry in enumerate(data[split]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and type(entry[1]) is int and isinstance(entry[2], str)):
                raise ValueError(f"{name}: split file {path}, {split}[{i}] = {entry!r}; expected "
                                 f"[relative image path, integer label, class name] ({datasets_md('split-files')})")
            image = path_inside(root, entry[0], f"{name}: split file {path}, {split}[{i}]", under=image_dir)
            records.append(make_record(image, entry[1], entry[2]))
        splits[split] = records
    return splits


class Benchmark:
    """One benchmark on disk. Subclasses set the class attributes and, when the dataset has no split
    JSON (ImageNet, FGVC-Aircraft), override `read_splits`."""

    name = ""
    folders = ()  # dataset folder under the root: the CoOp name first, then the forks' names
    image_dir = "images"  # relative to the dataset folder; split paths are relative to it
    split_file = ""
    clip_template = PHOTO_TEMPLATE  # CoOp's per-dataset zero-shot template
    val_from_train = False  # no val split: the released code draws the few-shot val from train
    docs = None  # the DATASETS.md section its errors point to; None: its name

    @property
    def section(self):
        return self.docs or self.name

    @property
    def cache_name(self):
        """Its folder under <cache_dir>/fewshot/."""
        return self.name

    def __init__(self, root):
        root = Path(os.path.normpath(Path(root).expanduser().absolute()))
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist or is not a folder; set paths.data_root to the "
                                    f"folder that holds the dataset folders ({datasets_md('layout')})")
        self.root = root
        self.dir = self.find_dir()

    def find_dir(self):
        for folder in self.folders:
            if (self.root / folder).is_dir():
                return self.root / folder
        raise FileNotFoundError(f"{self.name}: no dataset folder under {self.root}; looked for "
                                f"{', '.join(self.folders)} ({datasets_md(self.name)})")

    @property
    def source(self):
        """The file (or folder) the records come from, for messages."""
        return self.dir / self.split_file

    def read_splits(self):
        return read_split_json(self.source, self.image_dir, self.dir, self.name)

    def read(self):
        """Validated splits and the class names (index = label)."""
        splits = self.read_splits()
        return splits, classnames_of(splits, self.name, self.source, section=self.section)


class SplitJSONBenchmark(Benchmark):
    """A benchmark that differs from the others only in where its files are: a datasets.catalog.SplitJSON."""

    def __init__(self, name, layout, root):
        self.name = name
        self.folders, self.image_dir, self.split_file, self.clip_template = layout
        super().__init__(root)


def classnames_of(splits, name, source, needs_train=True, section=None):
    """label -> class name over all splits; labels must be 0..C-1, one name each, every class in train
    (unless `needs_train` is false: a test-only benchmark); errors point to DATASETS.md#`section`
    (default: `name`)."""
    section = section or name
    names = {}
    for records in splits.values():
        for r in records:
            if names.setdefault(r.label, r.classname) != r.classname:
                raise ValueError(f"{name}: {source} gives label {r.label} two names, {names[r.label]!r} and "
                                 f"{r.classname!r} ({datasets_md(section)})")
    if (needs_train and not splits["train"]) or not splits["test"]:
        raise ValueError(f"{name}: {source} has an empty {'train or test' if needs_train else 'test'} split "
                         f"({datasets_md(section)})")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{name}: labels in {source} must be 0..C-1 without gaps, got {sorted(names)[:10]}... "
                         f"({datasets_md(section)})")
    empty = sorted(set(names) - {r.label for r in splits["train"]}) if needs_train else []
    if empty:
        raise ValueError(f"{name}: {len(empty)} class(es) have no training image in {source}, e.g. "
                         f"{names[empty[0]]!r} ({datasets_md(section)})")
    return [names[label] for label in range(len(names))]


def read_name_lines(path, name, key, section):
    """{key: (name, line number)} of a file of "<key> <name>" lines (blank lines skipped); a line
    without a name is an error naming the file and the line."""
    names = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        first, _, rest = line.strip().partition(" ")
        if not rest.strip():
            raise ValueError(f"{name}: {path} line {n}: expected '<{key}> <class name>', got {line!r} "
                             f"({datasets_md(section)})")
        names[first] = (rest.strip(), n)
    return names


def missing_images(records):
    return sorted({r.path for r in records if not os.path.isfile(r.path)})


def by_class(records):
    """The records of each class, classes in order of first appearance, records in split order."""
    classes = defaultdict(list)
    for r in records:
        classes[r.label].append(r)
    return classes.values()


def draw(items, k, rng):
    """k items without replacement, with replacement when there are fewer (CoOp's rule)."""
    return rng.sample(items, k) if len(items) >= k else rng.choices(items, k=k)


def sample_fewshot(records, shots, rng):
    """`shots` records of each class, classes in order of first appearance."""
    return [r for items in by_class(records) for r in draw(items, shots, rng)]


SAMPLERS = ("coop", "released")


def draw_subsets(splits, shots, seed, sampler, val_from_train):
    """(train_x, val) from random.Random(seed), which draws what random.seed(seed) would.
    coop: train first, then val (CoOp). released: what the released SO and CLIP-LoRA code draws
    from the global `random` seeded with the seed: val first, then train; for a benchmark without
    a val split (ImageNet), one draw of shots + min(shots, 4) per class, train the first shots."""
    rng, k_val = random.Random(seed), min(shots, VAL_SHOTS)
    if sampler == "coop":
        return sample_fewshot(splits["train"], shots, rng), sample_fewshot(splits["val"], k_val, rng)
    if not val_from_train:
        val = sample_fewshot(splits["val"], k_val, rng)
        return sample_fewshot(splits["train"], shots, rng), val
    drawn = [draw(items, shots + k_val, rng) for items in by_class(splits["train"])]
    return [r for d in drawn for r in d[:shots]], [r for d in drawn for r in d[shots:]]


class FewShotDataset:
    """The few-shot view of one benchmark: `train_x` (k per class), `val` (min(k, 4) per class), `test`.

    Subsets are drawn by `draw_subsets` with `sampler` (coop or released), from a generator of
    their own, never from global RNG state, and cached in <cache_dir>/fewshot/<name>/."""

    def __init__(self, benchmark, shots, seed, cache_dir, templates="photo", sampler="coop"):
        if type(shots) is not int or shots < 1:
            raise ValueError(f"shots must be a positive integer, got {shots!r}")
        if type(seed) is not int:
            raise ValueError(f"seed must be an integer, got {seed!r}")
        template_sets.check(templates)
        if sampler not in SAMPLERS:
            raise ValueError(f"fewshot_sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
        splits, self.classnames = benchmark.read()
        self.name, self.shots, self.seed, self.sampler = benchmark.name, shots, seed, sampler
        self.templates = template_sets.resolve(templates, benchmark.clip_template)
        self.imagenet_labels = getattr(benchmark, "imagenet_labels", None)  # a domain-generalization target's
        suffix = "" if sampler == "coop" else f"_{sampler}"
        self.cache_file = (Path(cache_dir).expanduser() / "fewshot" / benchmark.cache_name
                           / f"shots{shots}_seed{seed}{suffix}.json")
        test_only = getattr(benchmark, "test_only", False)  # nothing to draw: it is only evaluated
        self.train_x, self.val = ([], []) if test_only else self._subsets(benchmark, splits)
        self.test = splits["test"]
        missing = missing_images(self.train_x + self.val + self.test)
        if missing:
            raise FileNotFoundError(f"{self.name}: {len(missing)} image(s) listed in {benchmark.source} are missing, "
                                    f"e.g. {missing[0]} ({datasets_md(benchmark.section)})")

    def _subsets(self, benchmark, splits):
        wanted = {"train": self.shots, "val": min(self.shots, VAL_SHOTS)}
        for split, k in wanted.items():
            counts = Counter(r.label for r in splits[split])
            short = [self.classnames[y] for y, n in sorted(counts.items()) if n < k]
            if short:
                warnings.warn(f"{self.name}: {len(short)} class(es) have fewer than {k} {split} images "
                              f"(e.g. {short[0]!r}); sampling them with replacement", stacklevel=3)
        val_from_train = self.sampler == "released" and benchmark.val_from_train
        pools = {"train": splits["train"], "val": splits["train" if val_from_train else "val"]}
        if self.cache_file.is_file():
            data = read_json(self.cache_file, f"{self.name}: few-shot cache", "few-shot-subsets")
            return [self._from_cache(data, benchmark, pools[split], split) for split in wanted]
        subsets = draw_subsets(splits, self.shots, self.seed, self.sampler, val_from_train)
        entries = [[[Path(os.path.relpath(r.path, benchmark.dir)).as_posix(), r.label] for r in s] for s in subsets]
        write_json_atomic(self.cache_file, {"dataset": self.name, "shots": self.shots, "seed": self.seed,
                                            "sampler": self.sampler, "train": entries[0], "val": entries[1]})
        return subsets

    def _from_cache(self, data, benchmark, pool, split):
        """The cached subset of `pool`; every entry must still be in the split with the same label."""
        stale = ValueError(f"{self.name}: few-shot cache {self.cache_file} does not match {benchmark.source} "
                           f"({split} split); delete the cache file to draw the subset again "
                           f"({datasets_md('few-shot-subsets')})")
        expected = {"dataset": self.name, "shots": self.shots, "seed": self.seed}
        if self.sampler != "coop":
            expected["sampler"] = self.sampler
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in expected.items()) \
                or not isinstance(data.get(split), list):
            raise stale
        by_path = {r.path: r for r in pool}
        records = []
        for entry in data[split]:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise stale
            r = by_path.get(path_inside(benchmark.dir, entry[0], f"{self.name}: few-shot cache {self.cache_file}"))
            if r is None or r.label != entry[1]:
                raise stale
            records.append(r)
        return records

    def __repr__(self):
        return (f"FewShotDataset({self.name}: {len(self.classnames)} classes, {self.shots}-shot seed {self.seed}, "
                f"train_x {len(self.train_x)}, val {len(self.val)}, test {len(self.test)})")
