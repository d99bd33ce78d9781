"""What a trial changed in CLIP's weights: maps and per-block statistics of |delta W| = |W_trained - W_initial|.

    python scripts/plot_updates.py TRIAL_FOLDER [OUT_FOLDER]     (OUT_FOLDER defaults to TRIAL_FOLDER)

TRIAL_FOLDER is a trial run with save=true by a method that trains CLIP's own weights (so, adam): it holds
results.json and trained.pt. The initial weights are rebuilt from the trial's config (the model's weights,
or for a randomly initialised model the trial's seed, as main.py does). Writes:
- delta_maps_<tower>.png: per tensor, |delta W| on a log colour scale (max-pooled to at most 96 x 96
  cells, so a cell is coloured when any weight in it moved); rows blocks, columns weight matrices.
  White: unchanged.
- delta_per_block.png: per block, the fraction of entries that changed (delta W != 0, i.e. updated at
  least once) and ||delta W|| / ||W_initial||; histograms of
  log10 |delta W| over the changed entries, one curve per block.
- delta_per_tensor.csv: those numbers per tensor (tower, block, weight, entries, changed, relative_change,
  max_abs_delta; with update counts also mean_updates and max_updates).
- updates_maps_<tower>.png and updates_per_block.png, when the trial also ran with count_updates=true
  (SO): how often each weight was updated (update_counts.pt), as maps and per-block histograms.
Two positional arguments need no parser, and a Hydra app would add its own output folders and logging.
"""
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from so.clip.model import build_clip  # noqa: E402
from so.clip.runtime import seed_everything  # noqa: E402

BLOCK = re.compile(r"^(?P<tower>.+)\.resblocks\.(?P<block>\d+)\.(?P<weight>.+)$")
TOWERS = {"visual.transformer": "vision", "transformer": "text"}
MAP_CELLS = 96


def load_trial(trial):
    """(config dict, {name: trained tensor}, {name: update counts} or None) of a trial folder, with
    errors that say what is missing."""
    results, trained = trial / "results.json", trial / "trained.pt"
    if not results.exists():
        raise SystemExit(f"plot_updates.py: {results} not found (expected a trial folder of main.py)")
    if not trained.exists():
        raise SystemExit(f"plot_updates.py: {trained} not found (run the trial with save=true)")
    config = json.loads(results.read_text())["config"]
    saved = torch.load(trained, map_location="cpu", weights_only=True)
    counts = trial / "update_counts.pt"
    return config, saved["tensors"], torch.load(counts, weights_only=True) if counts.exists() else None


def initial_weights(config, names):
    """The weights before training: the same model built the way main.py builds it."""
    seed_everything(config["seed"])
    model, _, _ = build_clip(config["model"]["name"], config["model"]["pretrained"], device="cpu")
    params = dict(model.named_parameters())
    unknown = sorted(set(names) - params.keys())
    if unknown:
        raise SystemExit(f"plot_updates.py: trained.pt holds {unknown[0]} (and {len(unknown) - 1} more) that "
                         f"CLIP does not have: method {config['method']['name']} trains adapters, not CLIP's "
                         f"weights (expected so or adam)")
    return {n: params[n].detach() for n in names}


def per_tensor(trained, initial, counts=None):
    rows, deltas, updates = [], {}, {}
    for name, after in trained.items():
        match = BLOCK.match(name)
        if not match:
            continue
        delta = (after.float() - initial[name].float()).abs()
        tower = TOWERS.get(match["tower"], match["tower"])
        key = (tower, int(match["block"]), match["weight"])
        deltas[key] = delta
        rows.append({"tower": tower, "block": key[1], "weight": key[2], "entries": delta.numel(),
                     "changed": int((delta > 0).sum()),
                     "relative_change": float(delta.norm() / initial[name].float().norm()),
                     "max_abs_delta": float(delta.max())})
        if counts is not None:
            updates[key] = counts[name].float()
            rows[-1].update(mean_updates=float(updates[key].mean()), max_updates=int(updates[key].max()))
    if not rows:
        raise SystemExit("plot_updates.py: no trained tensor lies in a transformer block (<tower>.resblocks.<i>.*)")
    return pd.DataFrame(rows).sort_values(["tower", "block", "weight"], ignore_index=True), deltas, updates


def pooled(delta):
    """|delta W| as a 2-D map of at most MAP_CELLS x MAP_CELLS cells (max over each cell)."""
    grid = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
    size = (min(grid.shape[0], MAP_CELLS), min(grid.shape[1], MAP_CELLS))
    return torch.nn.functional.adaptive_max_pool2d(grid[None, None], size)[0, 0]


def plot_maps(table, values, tower, path, label="|delta W|"):
    """Per tensor of `tower`, a pooled map of `values` ({(tower, block, weight): tensor}) on a log scale."""
    part = table[table["tower"] == tower]
    blocks, weights = sorted(part["block"].unique()), sorted(part["weight"].unique())
    vmax = max(max(float(v.max()) for k, v in values.items() if k[0] == tower), 1e-12)
    norm = LogNorm(vmin=vmax * 1e-4, vmax=vmax)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="white", under=plt.get_cmap("magma_r")(0))  # bad: 0
    height = 1.6 * len(blocks) + 1.0  # inches; a fixed layout: constrained layout is slow with many maps
    fig, axes = plt.subplots(len(blocks), len(weights), figsize=(2.2 * len(weights) + 1.2, height), squeeze=False,
                             gridspec_kw=dict(left=0.08, right=0.84, top=1 - 0.8 / height, bottom=0.2 / height,
                                              wspace=0.08, hspace=0.12))
    for i, block in enumerate(blocks):
        for j, weight in enumerate(weights):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if (tower, block, weight) in values:
                cells = pooled(values[(tower, block, weight)]).numpy()
                ax.imshow(cells, norm=norm, cmap=cmap, aspect="auto", interpolation="nearest")
            if i == 0:
                ax.set_title(weight, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"block {block}", fontsize=8)
    fig.suptitle(f"{tower}: {label} (white: zero)", y=1 - 0.2 / height)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=fig.add_axes((0.88, 0.3, 0.03, 0.4)),
                 label=label)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_block(table, deltas, path):
    fig, (changed, relative, hist) = plt.subplots(1, 3, figsize=(16, 4.2))
    for (tower, weight), part in table.groupby(["tower", "weight"]):
        style = "-" if tower == "vision" else "--"
        changed.plot(part["block"], 100 * part["changed"] / part["entries"], style, marker="o",
                     label=f"{tower} {weight}")
        relative.plot(part["block"], part["relative_change"], style, marker="o", label=f"{tower} {weight}")
    changed.set(xlabel="block", ylabel="entries changed (%)", title="fraction of weights that moved")
    relative.set(xlabel="block", ylabel="||delta W|| / ||W initial||", title="relative change", yscale="log")
    changed.legend(fontsize=7)
    blocks = sorted(table["block"].unique())
    colors = plt.cm.viridis([i / max(1, len(blocks) - 1) for i in range(len(blocks))])
    for color, block in zip(colors, blocks):
        values = torch.cat([d[d > 0] for (_, b, _), d in deltas.items() if b == block])
        if len(values):
            hist.hist(values.log10().numpy(), bins=40, histtype="step", color=color, label=f"block {block}")
    hist.set(xlabel="log10 |delta W| (changed entries)", ylabel="entries", title="per block, both towers")
    hist.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_updates_per_block(updates, path):
    """Per block, the histogram of how often each weight was updated (never-updated weights included)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    blocks = sorted({b for _, b, _ in updates})
    colors = plt.cm.viridis([i / max(1, len(blocks) - 1) for i in range(len(blocks))])
    top = int(max(float(u.max()) for u in updates.values()))
    for color, block in zip(colors, blocks):
        values = torch.cat([u.flatten() for (_, b, _), u in updates.items() if b == block])
        ax.hist(values.numpy(), bins=range(top + 2), histtype="step", color=color, label=f"block {block}")
    ax.set(xlabel="times updated", ylabel="weights", yscale="log", title="update counts per block, both towers")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) not in (2, 3) or argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    trial = Path(argv[1])
    out = Path(argv[2]) if len(argv) == 3 else trial
    out.mkdir(parents=True, exist_ok=True)
    config, trained, counts = load_trial(trial)
    table, deltas, updates = per_tensor(trained, initial_weights(config, trained), counts)
    table.to_csv(out / "delta_per_tensor.csv", index=False)
    for tower in sorted(table["tower"].unique()):
        plot_maps(table, deltas, tower, out / f"delta_maps_{tower}.png")
        if updates:
            plot_maps(table, updates, tower, out / f"updates_maps_{tower}.png", label="times updated")
    plot_per_block(table, deltas, out / "delta_per_block.png")
    if updates:
        plot_updates_per_block(updates, out / "updates_per_block.png")
    for tower, part in table.groupby("tower"):
        print(f"{tower}: {len(part)} tensors, {part['changed'].sum():,} of {part['entries'].sum():,} weights changed "
              f"({100 * part['changed'].sum() / part['entries'].sum():.3f}%)")
    print(f"Wrote delta_maps_<tower>.png, delta_per_block.png, delta_per_tensor.csv"
          f"{', updates_maps_<tower>.png, updates_per_block.png' if updates else ''} to {out}")


if __name__ == "__main__":
    main(sys.argv)
