"""End to end through Hydra: main.py on the tiny model and the synthetic dataset, on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "num_workers=0", "max_iters=4"]


def main_py(tmp_path, *overrides, check=True, multirun=False):
    cmd = [sys.executable, "main.py", *(["-m"] if multirun else []), f"out_root={tmp_path / 'out'}",
           f"cache_dir={tmp_path / 'cache'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def results(tmp_path):
    return {p.relative_to(tmp_path / "out").as_posix(): json.loads(p.read_text())
            for p in sorted((tmp_path / "out").rglob("results.json"))}


def test_demo_writes_results_and_overrides_reach_the_harness(tmp_path):
    proc = main_py(tmp_path, "experiment=demo", *FAST, "shots=2", "seed=3")
    assert "zero-shot top-1" in proc.stdout and "final top-1" in proc.stdout
    (path, res), = results(tmp_path).items()
    assert path == "demo/synthetic/adam/2shot/seed3/results.json"
    assert (res["dataset"], res["shots"], res["seed"], res["method"], res["name"]) == ("synthetic", 2, 3, "adam", "demo")
    assert res["config"]["shots"] == 2 and res["config"]["seed"] == 3
    assert res["iterations"] == 4 and res["stopped_early"] is False
    for key in ("zeroshot_top1", "top1"):
        assert isinstance(res[key], float) and 0.0 <= res[key] <= 100.0
    assert isinstance(res["train_seconds"], float) and res["train_seconds"] > 0
    assert isinstance(res["trainable_params"], int) and res["trainable_params"] > 0
    assert res["peak_memory_gib"] is None and res["device"] == "cpu"
    assert isinstance(res["final_loss"], float)
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_existing_results_are_skipped_unless_forced(tmp_path):
    main_py(tmp_path, "experiment=demo", *FAST, "shots=1")
    path = next((tmp_path / "out").rglob("results.json"))
    path.write_text(json.dumps({"marker": True}))
    proc = main_py(tmp_path, "experiment=demo", *FAST, "shots=1")
    assert "Skipping" in proc.stdout + proc.stderr and json.loads(path.read_text()) == {"marker": True}
    main_py(tmp_path, "experiment=demo", *FAST, "shots=1", "force=true")
    assert "marker" not in json.loads(path.read_text())


def test_multirun_writes_one_results_file_per_trial(tmp_path):
    main_py(tmp_path, "experiment=demo", *FAST, "seed=1,2", "shots=1,2", multirun=True)
    assert sorted(results(tmp_path)) == [f"demo/synthetic/adam/{k}shot/seed{s}/results.json"
                                         for k in (1, 2) for s in (1, 2)]


def test_missing_data_root_names_the_path_and_datasets_md(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = main_py(tmp_path, "dataset=dtd", "model=tiny", *FAST, f"data_root={missing}", check=False)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "DATASETS.md" in proc.stderr


def test_unset_data_root_names_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA", raising=False)
    proc = main_py(tmp_path, "dataset=dtd", "model=tiny", *FAST, check=False)
    assert proc.returncode != 0 and "data_root is not set" in proc.stderr
