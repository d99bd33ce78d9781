"""Classify images with a trained run (its classes and templates), or zero-shot with a model.

    python scripts/predict.py RUN_DIR IMAGE_OR_FOLDER... [--top-k 5] [--csv FILE]
    python scripts/predict.py --model vit_b16 --classes "mug,bottle,box" IMAGE_OR_FOLDER... [--templates photo]

Prints each image's top-k classes with their probabilities (softmax of 100 x cosine, as in training);
--csv writes them as rows path,rank,class,probability. A folder is read recursively (image
extensions). RUN_DIR is a run of main.py with save=true. --model takes a configs/model/ name (its
open_clip model and weights) or an open_clip model name with --pretrained (a tag or a file);
--classes a comma-separated list or a file with one class per line. Flags and positional lists: an
argparse command line, not a Hydra app.
"""
import argparse
import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
from datasets.folder import EXTENSIONS  # noqa: E402
from datasets.pipeline import read_image  # noqa: E402
from datasets.templates import resolve  # noqa: E402


def image_paths(items):
    """Files as given, folders walked for images, in sorted order."""
    paths = []
    for item in map(Path, items):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        elif item.is_file():
            paths.append(item)
        else:
            raise SystemExit(f"predict.py: {item} is neither an image file nor a folder")
    if not paths:
        raise SystemExit(f"predict.py: no image in {', '.join(items)}")
    return paths


def zero_shot_model(model, pretrained, device):
    """The model of a configs/model/ name, or of an open_clip name and --pretrained."""
    from so.clip.model import build_clip

    if (ROOT / "configs" / "model" / f"{model}.yaml").is_file():
        from omegaconf import OmegaConf

        from main import compose

        cfg = OmegaConf.to_container(compose("dataset=synthetic", f"model={model}"), resolve=True)["model"]
        model, pretrained = cfg["name"], pretrained or cfg["pretrained"]
    return build_clip(model, pretrained, device=device)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python scripts/predict.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR_OR_IMAGE")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--csv", type=Path, help="also write path,rank,class,probability rows here")
    parser.add_argument("--model", help="zero-shot: a configs/model/ name or an open_clip model name")
    parser.add_argument("--pretrained", help="zero-shot: an open_clip tag or a weights file")
    parser.add_argument("--classes", help="zero-shot: 'a,b,c' or a file with one class per line")
    parser.add_argument("--templates", default="photo", help="zero-shot: photo, ensemble7, imagenet80")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    from so.clip.adapted import classify, load_run

    try:
        if args.model:
            if not args.classes:
                parser.error("--model needs --classes")
            model, transform, tokenizer = zero_shot_model(args.model, args.pretrained, args.device)
            source = Path(args.classes)
            classnames = source.read_text().splitlines() if source.is_file() else args.classes.split(",")
            classnames, templates = [c.strip() for c in classnames if c.strip()], resolve(args.templates)
            images = args.inputs
        else:
            model, transform, tokenizer, results = load_run(args.inputs[0], args.device)
            classnames, templates, images = results["classnames"], results["templates"], args.inputs[1:]
            if not images:
                parser.error("give images or folders after RUN_DIR")
        paths = image_paths(images)
        probabilities = classify(model, tokenizer, transform, classnames, templates,
                                 [read_image(p) for p in paths], args.device, args.batch_size)
    except (OSError, ValueError) as e:
        raise SystemExit(f"predict.py: {e}") from None
    k = min(args.top_k, len(classnames))
    rows = []
    for path, p in zip(paths, probabilities):
        top = p.topk(k)
        ranked = [(classnames[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
        print(f"{path}: " + ", ".join(f"{name} {value:.3f}" for name, value in ranked))
        rows += [(str(path), rank, name, f"{value:.6f}") for rank, (name, value) in enumerate(ranked, 1)]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([("path", "rank", "class", "probability"), *rows])


if __name__ == "__main__":
    main()
