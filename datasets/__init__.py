"""The 11 few-shot benchmarks and the synthetic tasks, behind one factory.

    dataset = build_dataset("dtd", root="$DATA", shots=4, seed=1, cache_dir="~/.cache/so")
    dataset.classnames, dataset.templates, dataset.train_x, dataset.val, dataset.test

The image pipeline (decode once, augment on the device) is in datasets.pipeline.
"""
from .base import Benchmark, FewShotDataset, Record
from .caltech101 import Caltech101
from .dtd import DTD
from .eurosat import EuroSAT
from .fgvc_aircraft import FGVCAircraft
from .food101 import Food101
from .imagenet import ImageNet
from .imagenet_variants import ImageNetA, ImageNetR, ImageNetSketch, ImageNetV2
from .oxford_flowers import OxfordFlowers
from .oxford_pets import OxfordPets
from .stanford_cars import StanfordCars
from .sun397 import SUN397
from .synthetic import Synthetic, SyntheticCompositions, SyntheticShift
from .ucf101 import UCF101

# The 11 benchmarks, in the order of the paper's tables; the scripts take the same list from
# configs/dataset/ (every file but the synthetic ones and the test-only ones).
BENCHMARKS = {b.name: b for b in (ImageNet, SUN397, FGVCAircraft, EuroSAT, StanfordCars, Food101, OxfordPets,
                                  OxfordFlowers, Caltech101, DTD, UCF101)}
SANDBOX_TASKS = {b.name: b for b in (Synthetic, SyntheticCompositions, SyntheticShift)}  # generated
# Test-only targets of an ImageNet-trained run (domain generalization), in CoOp's table order.
DG_TARGETS = {b.name: b for b in (ImageNetV2, ImageNetSketch, ImageNetA, ImageNetR)}
LOADERS = BENCHMARKS | SANDBOX_TASKS | DG_TARGETS


def build_dataset(name, root, shots, seed, cache_dir, templates="photo", sampler="coop", **options):
    """The few-shot dataset `name` read from `root` (the data root; for synthetic, the folder it is
    generated in), with its k-shot subset for `seed` drawn by `sampler` and cached under
    `cache_dir`; `options` go to the benchmark's loader (ImageNet: classnames)."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset.name {name!r}; expected one of {', '.join(LOADERS)}")
    return FewShotDataset(LOADERS[name](root, **options), shots, seed, cache_dir, templates, sampler)


__all__ = ["BENCHMARKS", "DG_TARGETS", "LOADERS", "SANDBOX_TASKS", "Benchmark", "FewShotDataset", "Record", "build_dataset"]
