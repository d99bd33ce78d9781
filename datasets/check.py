"""Check a data root: which of the 11 benchmarks are usable, and what is missing for the others.

    python -m datasets.check [--root $DATA] [names ...]   (names: also imagenet_v2, imagenet_sketch, ...)

For each benchmark it finds the folder (CoOp name or a fork alias), reads the split/annotation files,
validates labels and paths, and checks that every listed image file exists (it does not decode them).
Nothing is written. Exit code: 0 when every checked benchmark is usable, 1 when any is not, 2 on a
usage error.
"""
import argparse
import os
import sys
from pathlib import Path

from .base import datasets_md, missing_images
from .catalog import BENCHMARKS, DG_TARGETS
from .loaders import LOADERS



def check(name, root):
    """(usable, one-line report) for benchmark `name` under `root`."""
    try:
        benchmark = LOADERS[name](root)
        splits, classnames = benchmark.read()
    except (OSError, ValueError) as e:
        return False, str(e).removeprefix(f"{name}: ")
    missing = missing_images([r for records in splits.values() for r in records])
    if missing:
        return False, f"{benchmark.dir}: {len(missing)} listed image(s) missing, e.g. {missing[0]}"
    sizes = ", ".join(f"{split} {len(records)}" for split, records in splits.items())
    return True, f"{benchmark.dir}: {len(classnames)} classes, {sizes}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m datasets.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.environ.get("DATA") or None,
                        help="the data root holding the dataset folders (default: $DATA)")
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"default: all of {', '.join(BENCHMARKS)}; also {', '.join(DG_TARGETS)}")
    args = parser.parse_args(argv)
    if not args.root:
        parser.error("no data root: pass --root /path/to/data or set DATA (DATASETS.md#layout)")
    unknown = sorted(set(args.names) - set(BENCHMARKS) - set(DG_TARGETS))
    if unknown:
        parser.error(f"unknown dataset name(s) {', '.join(unknown)}; expected some of "
                     f"{', '.join([*BENCHMARKS, *DG_TARGETS])}")
    if not Path(args.root).expanduser().is_dir():
        print(f"MISSING  data root {args.root} is not a folder; pass the folder that holds the dataset "
              f"folders ({datasets_md('layout')})")
        return 1
    usable = []
    for name in args.names or BENCHMARKS:
        ok, report = check(name, args.root)
        usable.append(ok)
        print(f"{'ok' if ok else 'MISSING':8} {name:15} {report}", flush=True)
    print(f"{sum(usable)} of {len(usable)} usable")
    return 0 if all(usable) else 1


if __name__ == "__main__":
    sys.exit(main())
