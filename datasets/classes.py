"""Base-to-novel classes (CoCoOp's protocol): the classes sorted by label, the first ceil(C / 2) base,
the rest novel. The few-shot subsets are drawn over all classes first and then keep their base classes
(as CoCoOp draws, then subsamples), so a base run trains on the very images an all-class run of the same
seed would; novel classes are relabelled from 0 and only their test images are used."""
import dataclasses
import math
from dataclasses import dataclass


@dataclass
class ClassSplit:
    """Base or novel classes of a FewShotDataset, with what Prompts and the harness read from it."""
    name: str
    shots: int
    seed: int
    classnames: list
    templates: list
    train_x: list
    val: list
    test: list


def base_and_novel(dataset):
    """(base, novel) ClassSplits of `dataset`; labels 0..m-1 base, m..C-1 novel (relabelled 0..C-m-1)."""
    classes = len(dataset.classnames)
    if classes < 2:
        raise ValueError(f"base_to_novel: {dataset.name} has {classes} class; it needs 2 or more.")
    m = math.ceil(classes / 2)

    def part(records, low, high):
        return [dataclasses.replace(r, label=r.label - low) for r in records if low <= r.label < high]

    common = dict(shots=dataset.shots, seed=dataset.seed, templates=dataset.templates)
    base = ClassSplit(dataset.name, classnames=dataset.classnames[:m], train_x=part(dataset.train_x, 0, m),
                      val=part(dataset.val, 0, m), test=part(dataset.test, 0, m), **common)
    novel = ClassSplit(dataset.name, classnames=dataset.classnames[m:], train_x=[], val=[],
                       test=part(dataset.test, m, classes), **common)
    return base, novel


def harmonic_mean(base, novel):
    """2 B N / (B + N), CoCoOp's summary of base and novel accuracy (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel else 0.0
