"""The adapted CLIP of a trained run as an open_clip checkpoint, its changes merged into the weights.

    python scripts/export.py RUN_DIR OUT.safetensors

RUN_DIR is a run of main.py with save=true (results.json and trained.pt). LoRA, DoRA and ReLoRA
adapters are merged into the weights they adapt; SO, Adam and GaLore runs give their trained weights.
The file loads with open_clip alone, with no missing or unexpected key:

    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained="OUT.safetensors")

(MODEL as printed; the sandbox's tiny models need `import so.clip.model` first, which registers their
configs.) Its metadata holds the run's class names and templates. Two positional arguments need no
parser.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from so.clip.adapted import load_run, open_clip_state_dict  # noqa: E402
from so.files import write_atomic  # noqa: E402


def export(run_dir, out):
    """Write the merged model of `run_dir` to `out` (safetensors); returns the open_clip model name."""
    from safetensors.torch import save

    model, _, _, results = load_run(run_dir)
    name = results["config"]["model"]["name"]
    state = open_clip_state_dict(model, name)
    metadata = {"open_clip_model": name, "method": results["method"], "dataset": results["dataset"],
                "classnames": json.dumps(results["classnames"]), "templates": json.dumps(results["templates"])}
    write_atomic(out, save(state, metadata=metadata))
    return name


def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help") or not argv[2].endswith(".safetensors"):
        raise SystemExit(__doc__)
    try:
        name = export(Path(argv[1]), Path(argv[2]))
    except (OSError, ValueError) as e:
        raise SystemExit(f"export.py: {e}") from None
    print(f"Wrote {argv[2]}: open_clip.create_model_and_transforms({name!r}, pretrained={argv[2]!r})")


if __name__ == "__main__":
    main(sys.argv)
