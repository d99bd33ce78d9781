"""scripts/aggregate.py on results.json files written here: tables, numbers, missing and duplicate trials."""
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def write(out, name, dataset, method, shots, seed, top1, **extra):
    path = out / name / dataset / method / f"{shots}shot" / f"seed{seed}" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "dataset": dataset, "method": method, "shots": shots,
                                "seed": seed, "top1": top1, "zeroshot_top1": 1.0, **extra}))
    return path


def aggregate_cli(*args):
    proc = subprocess.run([sys.executable, "scripts/aggregate.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


_spec = importlib.util.spec_from_file_location("aggregate", ROOT / "scripts" / "aggregate.py")
aggregate_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aggregate_module)


def aggregate(capsys, *args):
    """In-process (fast): returns stdout."""
    aggregate_module.main(["aggregate.py", *map(str, args)])
    return capsys.readouterr().out


def aggregate_error(*args):
    with pytest.raises(SystemExit) as exc:
        aggregate_module.main(["aggregate.py", *map(str, args)])
    return str(exc.value)


@pytest.fixture
def main_table(tmp_path):
    """dtd and eurosat; zero-shot once; adam and so at 1 and 2 shots x seeds 1-3, one trial missing.
    top1 = base + method offset + shots + seed, so every mean and std is known."""
    out = tmp_path / "out"
    for dataset, base in (("dtd", 40.0), ("eurosat", 60.0)):
        write(out, "main_table", dataset, "zeroshot", 1, 1, base)
        for method, offset in (("adam", 1.0), ("so", 5.0)):
            for shots in (1, 2):
                for seed in (1, 2, 3):
                    if (dataset, method, shots, seed) != ("eurosat", "so", 2, 3):
                        write(out, "main_table", dataset, method, shots, seed, base + offset + shots + seed)
    return out


def test_tables_have_rows_columns_means_and_stds(main_table, tmp_path):
    stdout = aggregate_cli(main_table, tmp_path / "agg")
    agg = tmp_path / "agg"
    assert sorted(p.name for p in agg.iterdir()) == [
        "accuracy_vs_shots.png", "diverged.txt", "duplicates.txt", "missing.txt", "paper.csv", "paper.md",
        "summary.csv", "table_1shot.csv", "table_2shot.csv", "tables.md", "unreadable.txt"]
    one = pd.read_csv(agg / "table_1shot.csv", index_col="method", keep_default_na=False)
    assert list(one.index) == ["zeroshot", "adam", "so"]
    assert list(one.columns) == ["eurosat", "dtd", "Average"]  # the paper's dataset order
    assert one.loc["adam"].tolist() == ["64.00 ± 1.00", "44.00 ± 1.00", "54.00 ± 1.00"]
    assert one.loc["so"].tolist() == ["68.00 ± 1.00", "48.00 ± 1.00", "58.00 ± 1.00"]
    assert one.loc["zeroshot"].tolist() == ["60.00", "40.00", "50.00"]  # one trial: no std
    two = pd.read_csv(agg / "table_2shot.csv", index_col="method", keep_default_na=False)
    assert two.loc["zeroshot"].tolist() == ["60.00", "40.00", "50.00"]  # zero-shot fills every shot table
    # eurosat so 2-shot has seeds 1 and 2 only: mean 68.5, std 0.71; Average over the complete seeds 1, 2
    assert two.loc["so"].tolist() == ["68.50 ± 0.71", "49.00 ± 1.00", "58.50 ± 0.71"]
    assert "## 1-shot" in stdout and "| adam     | 64.00 ± 1.00 |" in stdout
    assert (agg / "tables.md").read_text().count("| so ") == 2

    summary = pd.read_csv(agg / "summary.csv")
    assert list(summary.columns) == ["shots", "row", "dataset", "mean", "std", "seeds", "ci_low", "ci_high"]
    assert len(summary) == 2 * 3 * 3  # shots x rows x (datasets + Average)
    so2 = summary.query("shots == 2 and row == 'so' and dataset == 'eurosat'").iloc[0]
    assert (so2["mean"], round(so2["std"], 4), so2["seeds"]) == (68.5, 0.7071, 2)


def test_missing_and_duplicate_trials_are_listed(main_table, tmp_path, capsys):
    write(main_table / "old", "main_table", "dtd", "adam", 1, 1, 0.0)  # repeats a trial; sorts last: ignored
    shutil.rmtree(main_table / "main_table" / "dtd" / "zeroshot")
    stdout = aggregate(capsys, main_table, tmp_path / "agg")
    assert (tmp_path / "agg" / "missing.txt").read_text().splitlines() == [
        "name=main_table dataset=dtd method=zeroshot shots=1 seed=1",
        "name=main_table dataset=eurosat method=so shots=2 seed=3"]
    duplicates = (tmp_path / "agg" / "duplicates.txt").read_text().splitlines()
    assert sorted(Path(p).relative_to(main_table).as_posix() for p in duplicates) == [
        "main_table/dtd/adam/1shot/seed1/results.json", "old/main_table/dtd/adam/1shot/seed1/results.json"]
    assert "2 missing" in stdout and "2 files in duplicated trials" in stdout
    one = pd.read_csv(tmp_path / "agg" / "table_1shot.csv", index_col="method", keep_default_na=False)
    assert one.loc["adam", "dtd"] == "44.00 ± 1.00" and one.loc["zeroshot"].tolist() == ["60.00", "", ""]


def test_a_missing_trial_of_a_method_optimizer_pair_is_listed_as_its_two_overrides(tmp_path, capsys):
    for method, seed in (("lora+so", 1), ("lora", 1), ("lora", 2)):
        write(tmp_path / "out", "seam", "dtd", method, 4, seed, 50.0)
    aggregate(capsys, tmp_path / "out", tmp_path / "agg")
    assert (tmp_path / "agg" / "missing.txt").read_text().splitlines() == [
        "name=seam dataset=dtd method=lora optimizer=so shots=4 seed=2"]


def test_diverged_trials_are_listed_apart_and_left_out_of_the_means(main_table, tmp_path, capsys):
    diverged = write(main_table, "main_table", "dtd", "so", 1, 2, None, status="diverged", diverged_at=7)
    stdout = aggregate(capsys, main_table, tmp_path / "agg")
    assert (tmp_path / "agg" / "diverged.txt").read_text().splitlines() == [str(diverged)]
    assert "1 diverged trials are left out of every mean (diverged.txt)" in stdout
    one = pd.read_csv(tmp_path / "agg" / "table_1shot.csv", index_col="method", keep_default_na=False)
    assert one.loc["so", "dtd"] == "48.00 ± 1.41"  # seeds 1 and 3 alone: 47 and 49
    missing = (tmp_path / "agg" / "missing.txt").read_text().splitlines()
    assert missing == ["name=main_table dataset=eurosat method=so shots=2 seed=3"]  # a diverged trial is done


def test_experiment_names_become_rows_without_their_shared_folder(tmp_path, capsys):
    out = tmp_path / "ablations"
    for variant, offset in (("so", 2.0), ("grad_topk", 0.0)):
        for seed in (1, 2):
            write(out, f"ablations/{variant}", "dtd", "so", 4, seed, 50.0 + offset + seed)
    aggregate(capsys, out)  # default output folder: <results folder>/aggregate
    table = pd.read_csv(out / "aggregate" / "table_4shot.csv", index_col="name", keep_default_na=False)
    assert list(table.index) == ["grad_topk", "so"] and list(table.columns) == ["dtd", "Average"]
    assert table.loc["so", "dtd"] == "53.50 ± 0.71" and table.loc["grad_topk", "Average"] == "51.50 ± 0.71"


def test_bad_input_names_the_folder_or_file(tmp_path):
    assert "nowhere does not exist" in aggregate_error(tmp_path / "nowhere")
    assert f"no results.json under {tmp_path}" in aggregate_error(tmp_path)
    bad = tmp_path / "x" / "results.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"dataset": "dtd", "top1": 1.0}))
    assert f"{bad}: lacks name, method, shots, seed" in aggregate_error(tmp_path)
    assert "RESULTS_FOLDER [OUT_FOLDER]" in aggregate_error()


def test_a_truncated_results_json_is_named_skipped_and_listed(main_table, tmp_path, capsys):
    cut = main_table / "main_table" / "dtd" / "adam" / "1shot" / "seed1" / "results.json"
    cut.write_text(cut.read_text()[:20])
    stdout = aggregate(capsys, main_table, tmp_path / "agg")
    (line,) = (tmp_path / "agg" / "unreadable.txt").read_text().splitlines()
    assert line.startswith(f"{cut}: ") and "1 results.json could not be read" in stdout and str(cut) in stdout
    one = pd.read_csv(tmp_path / "agg" / "table_1shot.csv", index_col="method", keep_default_na=False)
    assert one.loc["adam", "dtd"] == "44.50 ± 0.71"  # seeds 2 and 3 alone: 44 and 45 (the fixture's 42 + seed)
    assert "name=main_table dataset=dtd method=adam shots=1 seed=1" in (tmp_path / "agg" / "missing.txt").read_text()


def test_a_cell_of_seeds_trained_with_different_configs_stops_naming_the_keys(tmp_path):
    """Seed 1 at lr 1e-3 and seed 2 at lr 2e-4 are not one cell's mean ± std."""
    out = tmp_path / "out"
    config = {"name": "mixed", "shots": 4, "seed": 1, "optimizer": {"name": "adam", "lr": 2e-4},
              "paths": {"out_root": "outputs"}, "num_workers": 8}
    first = write(out, "mixed", "dtd", "adam", 4, 1, 50.0, config=config | {"optimizer": {"name": "adam", "lr": 1e-3}})
    write(out, "mixed", "dtd", "adam", 4, 2, 52.0, config=config | {"seed": 2, "num_workers": 2})
    message = aggregate_error(out)
    assert "the cell adam 4-shot on dtd (name mixed) mixes trials of different configs" in message
    assert f"optimizer.lr: 0.001 in {first}" in message and "0.0002 in" in message and "num_workers" not in message
    write(out, "mixed", "dtd", "adam", 4, 1, 50.0, config=config)  # the same config: one cell again
    assert aggregate_cli(out)


def test_measured_vs_paper_gives_each_cell_its_difference_or_marks_it(tmp_path, capsys):
    """4-shot so and lora on dtd and eurosat: the released README's figures (SO dtd 66.4, eurosat 87.7;
    LoRA dtd 63.5, eurosat 85.2) beside the means, their differences; adam has no figure."""
    out = tmp_path / "out"
    for seed, noise in ((1, -0.5), (2, 0.5)):
        for method, dtd, eurosat in (("so", 67.0, 86.0), ("lora", 60.0, 90.25), ("adam", 50.0, 70.0)):
            write(out, "main_table", "dtd", method, 4, seed, dtd + noise)
            write(out, "main_table", "eurosat", method, 4, seed, eurosat + noise)
    stdout = aggregate(capsys, out)
    paper = pd.read_csv(out / "aggregate" / "paper.csv").set_index(["row", "dataset"])
    assert paper.loc[("so", "dtd"), "paper"] == 66.4
    assert paper.loc[("so", "dtd"), "difference"] == pytest.approx(0.6)
    assert paper.loc[("lora", "eurosat"), "difference"] == pytest.approx(5.05)
    assert paper.loc[("so", "Average")].isna()["paper"]  # over 2 datasets: not the README's 11-dataset average
    assert paper.loc[("adam", "dtd")].isna()["paper"]
    assert "67.00 vs 66.4 (+0.60)" in stdout and "86.00 vs 87.7 (-1.70)" in stdout
    assert "60.00 vs 63.5 (-3.50)" in stdout and "90.25 vs 85.2 (+5.05)" in stdout
    assert "50.00 (no paper figure)" in stdout and "76.50 (not the paper's 11 datasets)" in stdout
    md = (out / "aggregate" / "paper.md").read_text()
    assert md.startswith("## 4-shot: measured vs paper (main table)")


def test_the_average_over_the_11_datasets_is_held_to_the_papers(tmp_path, capsys):
    out = tmp_path / "out"
    for i, dataset in enumerate(aggregate_module.PAPER_ORDER):
        write(out, "main_table", dataset, "so", 4, 1, 70.0 + i)
    stdout = aggregate(capsys, out)
    paper = pd.read_csv(out / "aggregate" / "paper.csv").set_index(["row", "dataset"])
    assert paper.loc[("so", "Average"), "paper"] == 78.9
    assert paper.loc[("so", "Average"), "difference"] == pytest.approx(75.0 - 78.9)
    assert "75.00 vs 78.9 (-3.90)" in stdout


def test_ablation_rows_are_held_to_the_ablation_table(tmp_path, capsys):
    out = tmp_path / "out"
    for variant, method, top1 in (("so", "so", 75.0), ("adam", "adam", 10.0), ("no_momentum", "so", 70.0)):
        for dataset in aggregate_module.PAPER_ORDER:
            write(out, f"ablations/{variant}", dataset, method, 1, 1, top1)
    aggregate(capsys, out)
    paper = pd.read_csv(out / "aggregate" / "paper.csv").set_index(["row", "dataset"])
    assert paper.loc[("so", "Average"), "paper"] == 74.6  # not the main table's 73.8
    assert paper.loc[("adam", "Average"), "difference"] == pytest.approx(10.0 - 4.4)
    assert paper.loc[("no_momentum", "Average"), "difference"] == pytest.approx(70.0 - 67.8)
    assert paper.loc[("so", "dtd")].isna()["paper"]  # the ablation table gives averages only


def test_paper_results_name_known_rows_datasets_and_sources():
    ref = pd.read_csv(ROOT / "scripts" / "paper_results.csv")
    assert set(ref["table"]) == {"main", "ablation"}
    assert ref["source"].notna().all() and (ref["source"].str.strip() != "").all()  # a source for every figure
    primary = ref["source"].str.startswith("github.com/nairouz/SO README")  # the SO authors' own release
    assert (primary | ref["source"].str.contains("secondary") | ref["note"].str.contains("secondary", na=False)).all()
    assert set(ref["dataset"]) <= set(aggregate_module.PAPER_ORDER) | {"Average"}
    assert set(ref["shots"]) <= {0, 1, 2, 4, 8, 16} and set(ref.loc[ref["shots"] == 0, "rows"]) <= {"zeroshot"}
    cells = ref.assign(row=ref["rows"].str.split("|")).explode("row")
    twice = cells[cells.duplicated(["table", "row", "dataset", "shots"], keep=False)]
    assert twice.empty, twice  # one figure per (table, row, dataset, shots): none compared twice
    ablation_rows = set(ref.loc[ref["table"] == "ablation", "rows"])
    script = (ROOT / "scripts" / "ablations.sh").read_text()
    variants = script.split('ALL_VARIANTS="')[1].split('"')[0].split()
    assert ablation_rows == set(variants)  # one published row per ablation variant
    readme = ref[(ref["table"] == "main") & (ref["shots"] == 4) & primary]
    for rows, part in readme.groupby("rows"):  # the README's averages are the means of its 11 cells
        cells = part[part["dataset"] != "Average"]
        assert len(cells) == 11
        assert part.loc[part["dataset"] == "Average", "top1"].item() == pytest.approx(cells["top1"].mean(), abs=0.05)


def test_clip_lora_table_2_figures_are_compared(tmp_path, capsys):
    """CLIP-LoRA's Table 2 (ViT-B/16) holds the baselines: coop (16 tokens) 4-shot on dtd 59.5 and
    eurosat 69.7, coop4 on dtd 58.5, lora 1-shot on oxford_flowers 83.2 (the SO README has LoRA at 4
    shots only), zero-shot CLIP on oxford_flowers 71.4 in every shot table."""
    out = tmp_path / "out"
    for dataset, coop, coop4 in (("dtd", 60.0, 58.0), ("eurosat", 70.0, 66.0), ("oxford_flowers", 92.0, 87.0)):
        write(out, "main_table", dataset, "coop", 4, 1, coop)
        write(out, "main_table", dataset, "coop4", 4, 1, coop4)
        write(out, "main_table", dataset, "zeroshot", 1, 1, 70.0)
    write(out, "main_table", "oxford_flowers", "lora", 1, 1, 80.0)
    stdout = aggregate(capsys, out)
    paper = pd.read_csv(out / "aggregate" / "paper.csv").set_index(["row", "dataset", "shots"])
    assert paper.loc[("coop", "dtd", 4), "paper"] == 59.5
    assert paper.loc[("coop", "eurosat", 4), "difference"] == pytest.approx(70.0 - 69.7)
    assert paper.loc[("coop4", "dtd", 4), "paper"] == 58.5
    assert paper.loc[("lora", "oxford_flowers", 1), "paper"] == 83.2
    assert paper.loc[("zeroshot", "oxford_flowers", 1), "paper"] == 71.4
    assert paper.loc[("zeroshot", "oxford_flowers", 4), "paper"] == 71.4
    assert paper.loc[("zeroshot", "dtd", 4)].isna()["paper"]
    assert len(paper) == len(pd.read_csv(out / "aggregate" / "summary.csv"))  # no cell twice
    assert "60.00 vs 59.5 (+0.50)" in stdout and "70.00 vs 71.4 (-1.40)" in stdout


def test_every_clip_lora_figure_of_a_dataset_is_compared(tmp_path, capsys):
    """A trial one point above each of CLIP-LoRA's per-dataset figures: each is compared, +1.00."""
    ref = pd.read_csv(ROOT / "scripts" / "paper_results.csv")
    clip = ref[(ref["table"] == "main") & ref["source"].str.startswith("CLIP-LoRA") & (ref["dataset"] != "Average")]
    assert len(clip) > 80 and {"coop", "coop4", "cocoop", "plotpp", "maple", "lora", "zeroshot"} <= set(clip["rows"])
    out = tmp_path / "out"
    for r in clip.itertuples():
        write(out, "main_table", r.dataset, r.rows, max(r.shots, 1), 1, r.top1 + 1.0)
    aggregate(capsys, out)
    paper = pd.read_csv(out / "aggregate" / "paper.csv").set_index(["row", "dataset", "shots"])
    for r in clip.itertuples():
        assert paper.loc[(r.rows, r.dataset, max(r.shots, 1)), "difference"] == pytest.approx(1.0), r


def test_the_summarys_prev_sota_averages_are_not_held_to_relora(tmp_path, capsys):
    """72.5/75.3/77.1, which a summary names ReLoRA's, are CLIP-LoRA's averages within 0.3: no relora Average
    figure; its per-dataset cells stay (with a note)."""
    out = tmp_path / "out"
    for dataset in aggregate_module.PAPER_ORDER:
        write(out, "main_table", dataset, "relora", 1, 1, 70.0)
    aggregate(capsys, out)
    paper = pd.read_csv(out / "aggregate" / "paper.csv").set_index(["row", "dataset"])
    assert paper.loc[("relora", "Average")].isna()["paper"]
    assert paper.loc[("relora", "fgvc_aircraft"), "paper"] == 28.8
    ref = pd.read_csv(ROOT / "scripts" / "paper_results.csv")
    moved = ref[ref["rows"] == "prev_sota_unattributed"]
    assert moved["top1"].tolist() == [72.5, 75.3, 77.1] and moved["note"].str.contains("CLIP-LoRA").all()


def test_a_cell_given_twice_is_compared_once(tmp_path, capsys):
    csv = tmp_path / "paper_results.csv"
    csv.write_text("table,rows,printed_as,dataset,shots,top1,source,note\n"
                   "main,so|so_reference_cli,SO,dtd,4,66.4,a,\nmain,so,SO,dtd,4,60.0,b,\n"
                   "main,lora,LoRA,dtd,4,63.5,a,\n")
    ref = aggregate_module.paper_figures("main", csv)
    assert "so dtd 4-shot" in capsys.readouterr().err
    assert sorted(zip(ref["row"], ref["paper"])) == [("lora", 63.5), ("so", 66.4), ("so_reference_cli", 66.4)]


def test_confidence_intervals_use_students_t(main_table, tmp_path, capsys):
    """Three seeds with std 1: the 95% half-width is t(0.975, 2) / sqrt(3) = 4.303 / 1.732 = 2.48."""
    aggregate(capsys, "--ci", main_table, tmp_path / "agg")
    one = pd.read_csv(tmp_path / "agg" / "table_1shot.csv", index_col="method", keep_default_na=False)
    assert one.loc["adam", "dtd"] == "44.00 ± 1.00 [41.52, 46.48]"
    assert one.loc["zeroshot", "dtd"] == "40.00"  # one trial: no interval
    summary = pd.read_csv(tmp_path / "agg" / "summary.csv")
    row = summary[(summary["row"] == "adam") & (summary["dataset"] == "dtd") & (summary["shots"] == 1)].iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(41.5157, abs=1e-3), pytest.approx(46.4843, abs=1e-3))
    plain = aggregate(capsys, main_table, tmp_path / "plain")
    assert "[" not in pd.read_csv(tmp_path / "plain" / "table_1shot.csv", index_col="method").loc["adam", "dtd"]


@pytest.mark.parametrize("dof", [1, 2, 3, 5, 10, 29, 30, 31, 45, 100])
def test_t975_leaves_two_and_a_half_percent_in_each_tail(dof):
    """The integral of Student's t density over [-t, t] is 0.95 (trapezoid rule on a fine grid)."""
    import numpy as np

    t = aggregate_module.t975(dof)
    x = np.linspace(-t, t, 400001)
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    density = np.exp(log_c - (dof + 1) / 2 * np.log1p(x**2 / dof))
    assert np.trapezoid(density, x) == pytest.approx(0.95, abs=2e-4)


def test_no_paper_comparison_where_the_paper_has_no_dataset(tmp_path, capsys):
    out = tmp_path / "out"
    write(out, "sandbox", "synthetic_shift", "so", 4, 1, 40.0)
    stdout = aggregate(capsys, out)
    assert not (out / "aggregate" / "paper.md").exists() and "measured vs paper" not in stdout


def test_a_domain_generalization_average_is_over_the_targets(tmp_path, capsys):
    out = tmp_path / "out"
    for dataset, top1 in (("imagenet", 70.0), ("imagenet_v2", 60.0), ("imagenet_a", 40.0)):
        write(out, "dg_table", dataset, "so", 16, 1, top1)
    aggregate(capsys, out)
    table = pd.read_csv(out / "aggregate" / "table_16shot.csv", index_col="method", keep_default_na=False)
    assert list(table.columns) == ["imagenet", "imagenet_v2", "imagenet_a", "Average"]
    assert table.loc["so"].tolist() == [70.0, 60.0, 40.0, 50.0]  # ImageNet is the source, not averaged
