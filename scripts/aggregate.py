"""Aggregate every results.json under a folder into the paper's tables and plots.

    python scripts/aggregate.py [--ci] RESULTS_FOLDER [OUT_FOLDER]   (OUT_FOLDER defaults to RESULTS_FOLDER/aggregate)

--ci adds the 95% confidence interval of each mean over seeds (Student's t) to the table cells.

Writes to OUT_FOLDER:
- tables.md and table_<K>shot.csv: one table per shot count, rows = methods (or, when the folder holds
  several experiment names, e.g. outputs/ablations, the names: index "name"), columns = datasets +
  Average, cells "mean ± std" of top-1 over seeds (sample std, ddof=1; a single seed shows the mean only). Average is
  the mean over datasets per seed, then mean ± std over the seeds that have every dataset; where the
  folder holds domain-generalization targets (scripts/dg_table.sh), over the targets only.
  Zero-shot trials (method zeroshot) train nothing: they fill the zeroshot row of every shot table.
- summary.csv: the same numbers in long form (shots, row, dataset, mean, std, seeds, ci_low, ci_high).
- paper.md and paper.csv: measured vs paper, per cell: the mean, the published figure of
  scripts/paper_results.csv and their difference, or "no paper figure" (an Average over other datasets
  than the 11 is not compared; a figure at shots 0, zero-shot CLIP's, is held to every shot table); not
  written when no dataset is one of the 11. Rows that are methods are held to the paper's main tables
  (the SO README's and the summary's figures, and CLIP-LoRA's Table 2 for its baselines), rows that are
  experiment names (outputs/ablations) to its ablation table.
- accuracy_vs_shots.png: top-1 against shots, one panel per dataset and one for the average.
- base_to_novel.md and base_to_novel.csv, for trials run with base_to_novel: per shot count, rows x
  datasets, the base and novel top-1 (means over seeds) and their harmonic mean; the Average column is
  the mean base, the mean novel and their harmonic mean, as CoCoOp reports it.
- curves.csv and curves_<K>shot.png, for trials run with eval_every: top-1 against iterations, mean
  and band (± std) over seeds, one line per row, one panel per dataset.
- diverged.txt: trials whose training diverged (status "diverged" in results.json), left out of every
  mean and listed here; unreadable.txt: results.json files that cannot be read (a truncated file), left
  out, each with why.
A cell is the mean over the seeds of one config: seeds trained with different configs (another lr for
one of them) stop the aggregation with the keys and files that differ.
- missing.txt: trials of the expected grid (every row x dataset x shots x seed seen, zero-shot once per
  dataset) without a results.json, one per line as Hydra overrides; duplicates.txt: results.json files
  that repeat a trial (same name, dataset, method, shots, seed); the first path in sorted order is used.
Two positional arguments and a flag need no parser, and a Hydra app would add its own output folders and
logging.
"""
import json
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from datasets.catalog import BENCHMARKS, DG_TARGETS  # noqa: E402  (the paper's column order)
from datasets.classes import harmonic_mean  # noqa: E402
from so.clip.runs import identity  # noqa: E402

PAPER_ORDER = list(BENCHMARKS)
KEY = ["name", "dataset", "method", "shots", "seed"]
ZEROSHOT = "zeroshot"
PAPER = Path(__file__).with_name("paper_results.csv")  # the published figures, with their sources
# Student's t at 0.975 for 1..30 degrees of freedom (standard tables); no scipy for 30 numbers.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t975(dof):
    """The two-sided 95% critical value of Student's t: the table, then the Cornish-Fisher expansion."""
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2) \
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3)


def load(folder):
    """One row per readable results.json: the trial key, top1, the file's path and the identity of
    its config less the seed; and the files that could not be read, each with why."""
    paths = sorted(Path(folder).rglob("results.json"))
    if not paths:
        raise SystemExit(f"aggregate.py: no results.json under {folder}")
    rows, unreadable = [], []
    for path in paths:
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON (a truncated file)
            unreadable.append(f"{path}: {e}")
            continue
        missing = [k for k in KEY + ["top1"] if k not in res] if isinstance(res, dict) else KEY + ["top1"]
        if missing:
            unreadable.append(f"{path}: lacks {', '.join(missing)} (not a results.json of main.py)")
            continue
        rows.append({**{k: res[k] for k in KEY + ["top1"]}, "status": res.get("status", "finished"),
                     "novel_top1": res.get("novel_top1"), "curve": res.get("curve") or None, "path": str(path),
                     "identity": cell_identity(res.get("config") or {})})
    if not rows:
        raise SystemExit(f"aggregate.py: no readable results.json under {folder}: {unreadable[0]}")
    return pd.DataFrame(rows).astype({"name": str}), unreadable


def cell_identity(config):
    """What must agree across the seeds of a cell: the trial's identity less its seed (and
    trained_from, which names each seed's own run)."""
    return {k: v for k, v in identity(config).items() if k not in ("seed", "trained_from")}


def check_cells(df):
    """A cell's mean is over trials of one config: stop, naming the cell, the keys and the files, when
    its seeds were trained with different configs (another lr for one seed, ...)."""
    for key, cell_rows in df.groupby(["name", "dataset", "method", "shots"]):
        first = cell_rows.iloc[0]
        for _, other in cell_rows.iloc[1:].iterrows():
            differ = sorted(k for k in first["identity"].keys() | other["identity"].keys()
                            if first["identity"].get(k, "<absent>") != other["identity"].get(k, "<absent>"))
            if differ:
                shown = "; ".join(f"{k}: {first['identity'].get(k, '<absent>')!r} in {first['path']}, "
                                  f"{other['identity'].get(k, '<absent>')!r} in {other['path']}" for k in differ[:4])
                raise SystemExit(f"aggregate.py: the cell {key[2]} {key[3]}-shot on {key[1]} (name {key[0]}) mixes "
                                 f"trials of different configs: {shown}. A cell averages the seeds of one config: "
                                 "give the other config its own name=, or move those results away.")


def label_rows(df):
    """Row label: the method when one experiment name, else the name (minus the shared prefix)."""
    if df["name"].nunique() == 1:
        return df["method"]
    prefix = os.path.commonpath(list(df["name"].unique()))
    names = df["name"].str.slice(len(prefix) + 1 if prefix else 0)
    if (df.groupby("name")["method"].nunique() == 1).all():
        return names
    return names + " " + df["method"]


def expected_grid(df):
    """The trials the grid implies: zero-shot once per (row, dataset), the others at every shots x seed."""
    trained = df[df["method"] != ZEROSHOT]
    rows = df[["row", "name", "method"]].drop_duplicates()
    zs = rows["method"] == ZEROSHOT
    grid = rows[~zs].merge(df[["dataset"]].drop_duplicates(), how="cross")
    grid = grid.merge(trained[["shots"]].drop_duplicates(), how="cross")
    grid = grid.merge(df[["seed"]].drop_duplicates(), how="cross")
    zs_grid = rows[zs].merge(df[["dataset"]].drop_duplicates(), how="cross")
    zs_done = df[df["method"] == ZEROSHOT]
    zs_grid = zs_grid.assign(shots=zs_done["shots"].min(), seed=zs_done["seed"].min())
    return grid, zs_grid


def missing_trials(df):
    grid, zs_grid = expected_grid(df)
    lost = grid.merge(df[KEY], how="left", on=KEY, indicator=True).query("_merge == 'left_only'")
    zs_have = df.loc[df["method"] == ZEROSHOT, ["name", "dataset"]].drop_duplicates()
    zs_lost = zs_grid.merge(zs_have, how="left", on=["name", "dataset"], indicator=True).query("_merge == 'left_only'")
    both = pd.concat([zs_lost, lost])
    return [f"name={r.name} dataset={r.dataset} {method_overrides(r.method)} shots={int(r.shots)} seed={int(r.seed)}"
            for r in both.itertuples()]


def method_overrides(label):
    """The overrides that run a method of results.json: lora -> method=lora, lora+so -> method=lora optimizer=so."""
    method, _, optimizer = label.partition("+")
    return f"method={method}" + (f" optimizer={optimizer}" if optimizer else "")


def per_shot_scores(df):
    """top1 per (shots, row, dataset, seed), the zero-shot rows repeated for every shot count."""
    trained = df[df["method"] != ZEROSHOT]
    zeroshot = df[df["method"] == ZEROSHOT].groupby(["row", "dataset", "seed"], as_index=False)["top1"].mean()
    shot_counts = sorted(int(k) for k in (trained if len(trained) else df)["shots"].unique())
    repeated = [zeroshot.assign(shots=k) for k in shot_counts]
    return pd.concat([trained[["shots", "row", "dataset", "seed", "top1"]], *repeated], ignore_index=True)


def summarize(scores, datasets):
    """Long table: mean, std and seed count per (shots, row, dataset), plus the Average column."""
    stats = scores.groupby(["shots", "row", "dataset"])["top1"].agg(mean="mean", std="std", seeds="count")
    per_seed = scores.pivot_table(index=["shots", "row", "seed"], columns="dataset", values="top1")
    complete = per_seed.reindex(columns=datasets).dropna()
    average = complete.mean(axis=1).groupby(["shots", "row"]).agg(mean="mean", std="std", seeds="count")
    average = average.assign(dataset="Average").set_index("dataset", append=True)
    out = pd.concat([stats, average]).reset_index().sort_values(["shots", "row"], kind="stable", ignore_index=True)
    half = [t975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan for n, sd in zip(out["seeds"], out["std"])]
    return out.assign(ci_low=out["mean"] - half, ci_high=out["mean"] + half)


def cell(r, ci=False):
    if pd.isna(r["mean"]):
        return ""
    if pd.isna(r["std"]):
        return f"{r['mean']:.2f}"
    interval = f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if ci else ""
    return f"{r['mean']:.2f} ± {r['std']:.2f}{interval}"


def paper_figures(table, path=PAPER):
    """The published figures of one table ("main" or "ablation"): row, dataset, shots, paper, printed_as.
    One figure per (row, dataset, shots): should the file give a cell twice (a row listed in two
    figures' `rows`), the first line is kept and the others named on stderr, so no cell is compared twice."""
    ref = pd.read_csv(path)
    ref = ref[ref["table"] == table].assign(row=lambda d: d["rows"].str.split("|")).explode("row")
    ref = ref.rename(columns={"top1": "paper"})[["row", "dataset", "shots", "paper", "printed_as", "source"]]
    twice = ref.duplicated(["row", "dataset", "shots"])
    if twice.any():
        cells = ", ".join(f"{r.row} {r.dataset} {r.shots}-shot" for r in ref[twice].itertuples())
        print(f"aggregate.py: {Path(path).name} gives these cells of the {table} table twice, the first figure is used: "
              f"{cells}", file=sys.stderr)
    return ref[~twice]


def compare(summary, reference, datasets):
    """measured vs paper per cell of summary: the paper's figure and the difference (NaN where none).
    The paper averages the 11 benchmarks: an Average over fewer datasets is not compared. A figure at
    shots 0 (zero-shot CLIP, which trains nothing) is held to that row at every shot count, as the
    zero-shot trials fill every shot table; a figure at the shot count itself comes first."""
    partial = set(datasets) != set(PAPER_ORDER)
    if partial:
        reference = reference[reference["dataset"] != "Average"]
    zero = reference["shots"] == 0
    reference = pd.concat([reference[~zero], *(reference[zero].assign(shots=k) for k in summary["shots"].unique())])
    reference = reference.drop_duplicates(["row", "dataset", "shots"])
    merged = summary.merge(reference, how="left", on=["row", "dataset", "shots"])
    merged = merged.assign(difference=merged["mean"] - merged["paper"])
    return merged.assign(partial_average=partial & (merged["dataset"] == "Average"))


def versus(r):
    if pd.isna(r["mean"]):
        return ""
    if r["partial_average"]:
        return f"{r['mean']:.2f} (not the paper's 11 datasets)"
    if pd.isna(r["paper"]):
        return f"{r['mean']:.2f} (no paper figure)"
    return f"{r['mean']:.2f} vs {r['paper']:.1f} ({r['difference']:+.2f})"


def row_order(rows):
    return sorted(rows, key=lambda r: (r != ZEROSHOT, r))


def tables(summary, datasets, rows_are, format_cell=cell):
    """{shots: DataFrame} of format_cell's strings ("mean ± std"), rows x (datasets + Average); rows_are
    names the index."""
    out = {}
    for shots, part in summary.groupby("shots"):
        table = part.assign(cell=part.apply(format_cell, axis=1)).pivot(index="row", columns="dataset", values="cell")
        table = table.reindex(index=row_order(table.index), columns=datasets + ["Average"]).astype(object).fillna("")
        out[int(shots)] = table.rename_axis(index=rows_are, columns=None)
    return out


def base_to_novel(df, datasets):
    """{shots: DataFrame} of base, novel and HM per row x dataset (means over seeds), and the Average."""
    part = df[df["novel_top1"].notna()]
    if part.empty:
        return {}
    means = part.groupby(["shots", "row", "dataset"])[["top1", "novel_top1"]].mean()
    out = {}
    for shots, table in means.groupby("shots"):
        rows = {}
        for (_, row, dataset), r in table.iterrows():
            rows.setdefault(row, {}).update({(dataset, "base"): r["top1"], (dataset, "novel"): r["novel_top1"],
                                             (dataset, "HM"): harmonic_mean(r["top1"], r["novel_top1"])})
        frame = pd.DataFrame.from_dict(rows, orient="index")
        present = [d for d in datasets if (d, "base") in frame.columns]
        base, novel = frame[[(d, "base") for d in present]].mean(axis=1), frame[[(d, "novel") for d in present]].mean(axis=1)
        frame[("Average", "base")], frame[("Average", "novel")] = base, novel
        frame[("Average", "HM")] = [harmonic_mean(b, n) for b, n in zip(base, novel)]
        columns = [(d, k) for d in present + ["Average"] for k in ("base", "novel", "HM")]
        out[int(shots)] = frame.reindex(index=row_order(frame.index), columns=columns).round(2)
    return out


def curves(df):
    """Long table of the curves: mean, std and seed count of top-1 per (shots, row, dataset, iteration)."""
    points = [{"shots": r.shots, "row": r.row, "dataset": r.dataset, "seed": r.seed, "iteration": p["iteration"],
               "top1": p["top1"]} for r in df.itertuples() if r.curve for p in r.curve]
    if not points:
        return None
    stats = pd.DataFrame(points).groupby(["shots", "row", "dataset", "iteration"])["top1"]
    return stats.agg(mean="mean", std="std", seeds="count").reset_index()


def panel_grid(count, rows):
    """A figure of `count` panels, four per line, unused cells off, and a colour per row label (tab20's
    when the default cycle's 10 would repeat)."""
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] if len(rows) <= 10 else plt.get_cmap("tab20").colors
    colors = dict(zip(rows, list(palette) * len(rows)))
    cols = min(4, count)
    lines = -(-count // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 3.4 * lines), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count], colors


def band(ax, x, line, color, label, **style):
    """The mean of `line` against x, and a band of ± its std."""
    std = line["std"].fillna(0)
    ax.plot(x, line["mean"], color=color, label=label, **style)
    ax.fill_between(x, line["mean"] - std, line["mean"] + std, color=color, alpha=0.2)


def legend_below(fig, handles, labels, ncol):
    """The legend under the panels, with the room its lines take."""
    fig.legend(handles, labels, loc="lower center", ncol=ncol)
    fig.tight_layout(rect=(0, (0.3 + 0.3 * -(-len(labels) // ncol)) / fig.get_figheight(), 1, 1))


def plot_curves(table, datasets, shots):
    """Top-1 against iterations at `shots`: one panel per dataset, one line (and band) per row."""
    part = table[table["shots"] == shots]
    panels = [d for d in datasets if d in set(part["dataset"])]
    rows = row_order(part["row"].unique())
    fig, axes, colors = panel_grid(len(panels), rows)
    for ax, dataset in zip(axes, panels):
        for row in rows:
            line = part[(part["dataset"] == dataset) & (part["row"] == row)].sort_values("iteration")
            if not line.empty:
                band(ax, line["iteration"], line, colors[row], row)
        ax.set(title=dataset, xlabel="iteration", ylabel="top-1 (%)")
    fig.suptitle(f"{shots}-shot")
    legend_below(fig, *axes[0].get_legend_handles_labels(), ncol=min(len(rows), 2 * min(4, len(panels))))
    return fig


def plot(summary, datasets, path):
    panels = datasets + ["Average"]
    rows = row_order(summary["row"].unique())
    shots = sorted(summary["shots"].unique())
    fig, axes, colors = panel_grid(len(panels), rows)
    markers = {row: "o" if len(rows) <= 10 else "osD^v"[i % 5] for i, row in enumerate(rows)}  # with the colour
    for ax, dataset in zip(axes, panels):                                                     # a pair per row
        part = summary[summary["dataset"] == dataset]
        for row in rows:
            line = part[part["row"] == row].sort_values("shots")
            band(ax, line["shots"], line, colors[row], row,
                 **(dict(linestyle="--") if row == ZEROSHOT else dict(marker=markers[row])))
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set(title=dataset, xlabel="shots", ylabel="top-1 (%)")
    handles = [plt.Line2D([], [], color=colors[row], linestyle="--" if row == ZEROSHOT else "-",
                          marker="" if row == ZEROSHOT else markers[row]) for row in rows]
    legend_below(fig, handles, rows, ncol=min(6, len(rows)))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    ci = "--ci" in argv[1:]
    args = [a for a in argv[1:] if a != "--ci"]
    if len(args) not in (1, 2) or any(a.startswith("-") for a in args):
        raise SystemExit(__doc__)
    folder = Path(args[0])
    if not folder.is_dir():
        raise SystemExit(f"aggregate.py: results folder {folder} does not exist")
    out = Path(args[1]) if len(args) == 2 else folder / "aggregate"
    out.mkdir(parents=True, exist_ok=True)

    df, unreadable = load(folder)
    repeated = df[df.duplicated(KEY, keep=False)]
    df = df.drop_duplicates(KEY).assign(row=lambda d: label_rows(d))
    check_cells(df)
    missing = missing_trials(df)  # a diverged trial is done: re-running the sweep skips it
    diverged = df[df["status"] == "diverged"]
    (out / "diverged.txt").write_text("".join(p + "\n" for p in diverged["path"]))
    df = df[df["status"] != "diverged"]
    if df.empty:
        raise SystemExit(f"aggregate.py: every trial under {folder} diverged (diverged.txt)")
    seen = set(df["dataset"])
    known = PAPER_ORDER + list(DG_TARGETS)  # the paper's order, then CoOp's for the targets
    datasets = [d for d in known if d in seen] + sorted(seen - set(known))

    averaged = [d for d in datasets if d in DG_TARGETS] or datasets  # DG: the targets' mean, as CoOp's
    summary = summarize(per_shot_scores(df), averaged)
    summary.to_csv(out / "summary.csv", index=False)
    markdown = []
    rows_are = "method" if df["name"].nunique() == 1 else "name"
    for shots, table in tables(summary, datasets, rows_are, lambda r: cell(r, ci)).items():
        table.to_csv(out / f"table_{shots}shot.csv")
        markdown.append(f"## {shots}-shot\n\n{table.to_markdown()}\n")
    (out / "tables.md").write_text("\n".join(markdown))
    versus_md = []
    if set(datasets) & set(PAPER_ORDER):  # the paper has figures for its 11 benchmarks only
        paper = "main" if rows_are == "method" else "ablation"
        comparison = compare(summary, paper_figures(paper), datasets)
        comparison.drop(columns=["std", "ci_low", "ci_high"]).to_csv(out / "paper.csv", index=False)
        versus_md = [f"## {shots}-shot: measured vs paper ({paper} table)\n\n{table.to_markdown()}\n"
                     for shots, table in tables(comparison, datasets, rows_are, versus).items()]
        (out / "paper.md").write_text("\n".join(versus_md))
    plot(summary, datasets, out / "accuracy_vs_shots.png")
    b2n = base_to_novel(df, datasets)
    if b2n:
        flat = {k: t.set_axis([f"{d} {m}" for d, m in t.columns], axis=1) for k, t in b2n.items()}
        pd.concat(flat, names=["shots", "row"]).to_csv(out / "base_to_novel.csv")
        b2n_md = "\n".join(f"## {k}-shot: base / novel / HM\n\n{t.to_markdown()}\n" for k, t in flat.items())
        (out / "base_to_novel.md").write_text(b2n_md)
        print(b2n_md)
    curve_table = curves(df)
    if curve_table is not None:
        curve_table.to_csv(out / "curves.csv", index=False)
        for shots in sorted(curve_table["shots"].unique()):
            fig = plot_curves(curve_table, datasets, shots)
            fig.savefig(out / f"curves_{shots}shot.png", dpi=120)
            plt.close(fig)
    (out / "missing.txt").write_text("".join(line + "\n" for line in missing))
    (out / "duplicates.txt").write_text("".join(p + "\n" for p in repeated["path"]))
    (out / "unreadable.txt").write_text("".join(line + "\n" for line in unreadable))

    print("\n".join(markdown + versus_md))
    print(f"{len(df)} trials, {len(missing)} missing (missing.txt), {len(repeated)} files in duplicated trials "
          f"(duplicates.txt). Re-running the sweep script launches only the missing trials.")
    if len(diverged):
        print(f"{len(diverged)} diverged trials are left out of every mean (diverged.txt).")
    if unreadable:
        print(f"{len(unreadable)} results.json could not be read and are left out (unreadable.txt), e.g. "
              f"{unreadable[0]}")
    wrote = "tables.md, table_<K>shot.csv, summary.csv, " + ("paper.md, paper.csv, " if versus_md else "")
    print(f"Wrote {wrote}accuracy_vs_shots.png to {out}")


if __name__ == "__main__":
    main(sys.argv)
