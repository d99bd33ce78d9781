"""The 11 few-shot benchmarks, the domain-generalization targets and the synthetic tasks, behind one
factory:

    dataset = build_dataset("dtd", root="$DATA", shots=4, seed=1, cache_dir="~/.cache/so")
    dataset.classnames, dataset.templates, dataset.train_x, dataset.val, dataset.test

The list of datasets is datasets.catalog (standard library only); their loaders are datasets.loaders;
the image pipeline (decode once, augment on the device) is datasets.pipeline. `import datasets`
imports nothing until a name is asked for, so the catalog is read without torch.
"""
__all__ = ["LOADERS", "Benchmark", "FewShotDataset", "Record", "build_dataset"]


def __getattr__(name):  # PEP 562
    if name in ("LOADERS", "build_dataset"):
        from datasets import loaders

        return getattr(loaders, name)
    if name in ("Benchmark", "FewShotDataset", "Record"):
        from datasets import base

        return getattr(base, name)
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")
