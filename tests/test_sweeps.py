"""A real sweep through scripts/main_table.sh and Hydra multirun (tiny model, synthetic data, CPU):
it runs the trials its --dry-run lists, a re-run skips them all, a deleted result re-runs alone; then
aggregate.py and plot_updates.py on its output; and the launcher configs compose."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def sweep(out, *args):
    # one thread per process: on a busy CPU, torch's default thread pool makes the trials several times slower
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "DATASETS": "synthetic", "METHODS": "adam so",
           "SHOTS": "1 2", "SEEDS": "1 2", "NAME": "sweep"}
    overrides = ["experiment=demo", "debug=fast", "max_iters=2", "save=true", "count_updates=true",
                 f"paths.out_root={out / 'out'}", f"paths.cache_dir={out / 'cache'}"]
    proc = subprocess.run(["bash", "scripts/main_table.sh", *args, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def trial_dir(out, line):
    """The folder of a --dry-run line 'name=.. dataset=.. method=.. shots=.. seed=..'."""
    key = dict(word.split("=", 1) for word in line.split())
    return out / "out" / key["name"] / key["dataset"] / key["method"] / f"{key['shots']}shot" / f"seed{key['seed']}"


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in (out / "out").rglob("results.json")}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    lines = sweep(out, "--dry-run").stdout.splitlines()
    first = sweep(out)
    return out, lines, first


@pytest.mark.slow  # a sweep of main.py trials
def test_the_sweep_runs_exactly_the_dry_run_trials(swept):
    out, lines, first = swept
    assert len(lines) == 8 and first.stderr.count("Launching 8 trials") == 1
    assert sorted(mtimes(out)) == sorted(trial_dir(out, line) / "results.json" for line in lines)
    for line in lines:
        res = json.loads((trial_dir(out, line) / "results.json").read_text())
        assert line == " ".join(f"{key}={res[key]}" for key in ("name", "dataset", "method", "shots", "seed"))
        assert res["iterations"] == 2 and (trial_dir(out, line) / "trained.pt").exists()
    assert not list((out / "out").rglob("*.tmp"))


@pytest.mark.slow  # a sweep of main.py trials
def test_a_rerun_skips_every_trial_and_completes_only_a_deleted_one(swept):
    out, lines, _ = swept
    before = mtimes(out)
    again = sweep(out)
    assert (again.stdout + again.stderr).count("Skipping ") == 8 and mtimes(out) == before
    printed = [line for line in again.stdout.splitlines() if "(2 iterations) -> " in line]
    assert len(printed) == 8 and all(line.endswith("(already run)") for line in printed)  # stored, not run

    deleted = trial_dir(out, lines[-1]) / "results.json"
    deleted.unlink()
    third = sweep(out)
    log = third.stdout + third.stderr
    assert log.count("Skipping ") == 7 and f"Skipping {deleted.parent}" not in log
    assert third.stdout.count("(already run)") == 7 and f"(2 iterations) -> {deleted}\n" in third.stdout
    after = mtimes(out)
    assert after.keys() == before.keys()
    assert [p for p in after if after[p] != before[p]] == [deleted]


@pytest.mark.slow  # a sweep of main.py trials
def test_aggregate_makes_the_table_of_the_sweep(swept):
    out, _, _ = swept
    proc = subprocess.run([sys.executable, "scripts/aggregate.py", str(out / "out"), str(out / "agg")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 trials, 0 missing" in proc.stdout
    results = pd.DataFrame([json.loads(p.read_text()) for p in (out / "out").rglob("results.json")])
    for shots in (1, 2):
        table = pd.read_csv(out / "agg" / f"table_{shots}shot.csv", index_col="method", keep_default_na=False)
        assert list(table.index) == ["adam", "so"] and list(table.columns) == ["synthetic", "Average"]
        for method in ("adam", "so"):
            top1 = results.query("method == @method and shots == @shots")["top1"]
            assert len(top1) == 2
            expected = f"{top1.mean():.2f} ± {top1.std():.2f}"
            assert table.loc[method].tolist() == [expected, expected]
    assert (out / "agg" / "accuracy_vs_shots.png").read_bytes().startswith(PNG)
    assert (out / "agg" / "missing.txt").read_text() == "" and (out / "agg" / "duplicates.txt").read_text() == ""


@pytest.mark.slow  # a sweep of main.py trials
def test_plot_updates_shows_sparse_so_and_dense_adam_changes(swept, plot_updates, capsys):
    out, _, _ = swept
    trials = out / "out" / "sweep" / "synthetic"
    changed = {}
    for method in ("so", "adam"):
        folder = out / "updates" / method
        plot_updates.main(["plot_updates.py", str(trials / method / "1shot" / "seed1"), str(folder)])
        stdout = capsys.readouterr().out
        for name in ("delta_maps_vision.png", "delta_maps_text.png", "delta_per_block.png"):
            assert (folder / name).read_bytes().startswith(PNG)
        changed[method] = pd.read_csv(folder / "delta_per_tensor.csv")
        assert "vision: 48 tensors" in stdout and "text: 48 tensors" in stdout
    so, adam = changed["so"], changed["adam"]
    # the tiny model: 2 towers x 12 blocks x the 4 weight matrices SO trains
    assert len(so) == len(adam) == 2 * 12 * 4 and set(so["weight"]) == {
        "attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    config = json.loads((trials / "so" / "1shot" / "seed1" / "results.json").read_text())["config"]
    assert config["optimizer"]["refresh_every"] > 2  # two steps on one support: only its M entries per tensor can move
    support = (so["entries"] * config["optimizer"]["density"]).astype(int).clip(lower=1)
    assert (so["changed"] >= 1).all() and (so["changed"] <= support).all()
    assert (adam["changed"] / adam["entries"] > 0.99).all()  # dense Adam moves (nearly) every weight
    # update counts (count_updates=true, SO only): both steps moved the same support, and only it
    assert (so["max_updates"] == 2).all()
    assert so["mean_updates"].tolist() == pytest.approx((2 * so["changed"] / so["entries"]).tolist())
    assert "mean_updates" not in adam
    for name in ("updates_maps_vision.png", "updates_maps_text.png", "updates_per_block.png"):
        assert (out / "updates" / "so" / name).read_bytes().startswith(PNG)
        assert not (out / "updates" / "adam" / name).exists()


def test_launcher_configs_compose(monkeypatch, tmp_path):
    monkeypatch.setenv("NUM_GPUS", "4")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        slurm = compose("config", ["experiment=demo", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                   f"paths.cache_dir={tmp_path}"], return_hydra_config=True).hydra.launcher
        parallel = compose("config", ["experiment=demo", "hydra/launcher=parallel", f"paths.cache_dir={tmp_path}"],
                           return_hydra_config=True).hydra.launcher
    assert slurm._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (slurm.partition, slurm.gpus_per_node, slurm.cpus_per_task, slurm.mem_gb) == ("gpu", 1, 8, 32)
    assert (slurm.timeout_min, slurm.array_parallelism, slurm.nodes, slurm.tasks_per_node) == (240, 64, 1, 1)
    assert parallel._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert parallel.n_jobs == 4



@pytest.fixture(scope="module")
def plot_updates():
    spec = importlib.util.spec_from_file_location("plot_updates", ROOT / "scripts" / "plot_updates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # in-process: CLIP's imports once for every call
    return module


@pytest.mark.slow  # a sweep of main.py trials
def test_plot_updates_needs_a_saved_trial(swept, plot_updates, tmp_path):
    out, _, _ = swept
    with pytest.raises(SystemExit, match=f"{tmp_path / 'results.json'} not found"):
        plot_updates.main(["plot_updates.py", str(tmp_path)])
    trial = out / "out" / "sweep" / "synthetic" / "so" / "1shot" / "seed1"
    shutil.copy(trial / "results.json", tmp_path / "results.json")
    with pytest.raises(SystemExit, match="trained.pt not found \\(run the trial with save=true\\)"):
        plot_updates.main(["plot_updates.py", str(tmp_path)])
