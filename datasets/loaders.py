"""A loader for every dataset of the catalog (datasets/catalog.py), and `build_dataset`."""
from functools import partial

from datasets.catalog import BENCHMARKS, DG_TARGETS, FOLDER, SANDBOX_TASKS, SPLIT_JSON
from datasets.base import FewShotDataset, SplitJSONBenchmark
from datasets.fgvc_aircraft import FGVCAircraft
from datasets.folder import FolderDataset
from datasets.imagenet import ImageNet
from datasets.imagenet_variants import ImageNetA, ImageNetR, ImageNetSketch, ImageNetV2
from datasets.synthetic import Synthetic, SyntheticCompositions, SyntheticShift

OWN_LOADERS = {b.name: b for b in (ImageNet, FGVCAircraft, ImageNetV2, ImageNetSketch, ImageNetA, ImageNetR,
                                   Synthetic, SyntheticCompositions, SyntheticShift)}
# name -> loader(root, **options): a datasets.base.Benchmark. The catalog's order: benchmarks (the
# paper's column order), domain-generalization targets, sandbox tasks.
LOADERS = {name: OWN_LOADERS.get(name) or partial(SplitJSONBenchmark, name, SPLIT_JSON[name])
           for name in (*BENCHMARKS, *DG_TARGETS, *SANDBOX_TASKS)} | {FOLDER: FolderDataset}


def build_dataset(name, root, shots, seed, cache_dir, templates="photo", sampler="coop", **options):
    """The few-shot dataset `name` read from `root` (the data root; for synthetic, the folder it is
    generated in; for folder, your images), with its k-shot subset for `seed` drawn by `sampler` and cached under
    `cache_dir`; `options` go to the benchmark's loader (ImageNet: classnames)."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset.name {name!r}; expected one of {', '.join(LOADERS)}")
    if getattr(LOADERS[name], "needs_cache_dir", False):  # a folder dataset writes its split there
        options["cache_dir"] = cache_dir
    return FewShotDataset(LOADERS[name](root, **options), shots, seed, cache_dir, templates, sampler)
