"""End to end through Hydra: main.py on the tiny model and the synthetic dataset, on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test runs main.py in a subprocess
DEMO = ["experiment=demo", "dataset=synthetic", "debug=fast"]  # the demo on the tiny random model
FAST = ["debug=fast"]


def main_py(tmp_path, *overrides, check=True, multirun=False):
    cmd = [sys.executable, "main.py", *(["-m"] if multirun else []), f"paths.out_root={tmp_path / 'out'}",
           f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def results(tmp_path):
    return {p.relative_to(tmp_path / "out").as_posix(): json.loads(p.read_text())
            for p in sorted((tmp_path / "out").rglob("results.json"))}


def test_demo_writes_results_overrides_reach_the_harness_and_reruns_skip(tmp_path):
    proc = main_py(tmp_path, *DEMO, "shots=2", "seed=3")
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

    path = tmp_path / "out" / path
    path.write_text(json.dumps({"marker": True}))
    proc = main_py(tmp_path, *DEMO, "shots=2", "seed=3")
    assert "Skipping" in proc.stdout + proc.stderr and json.loads(path.read_text()) == {"marker": True}
    main_py(tmp_path, *DEMO, "shots=2", "seed=3", "force=true")
    assert json.loads(path.read_text())["seed"] == 3


def test_multirun_writes_one_results_file_per_trial(tmp_path):
    main_py(tmp_path, *DEMO, "seed=1,2", "shots=1,2", multirun=True)
    assert sorted(results(tmp_path)) == [f"demo/synthetic/adam/{k}shot/seed{s}/results.json"
                                         for k in (1, 2) for s in (1, 2)]


def test_missing_data_root_names_the_path_and_datasets_md(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = main_py(tmp_path, "dataset=dtd", *FAST, f"paths.data_root={missing}", check=False)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "DATASETS.md" in proc.stderr


def test_unset_data_root_names_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA", raising=False)
    proc = main_py(tmp_path, "dataset=dtd", *FAST, check=False)
    assert proc.returncode != 0 and "paths.data_root is not set" in proc.stderr


def test_every_method_runs_the_demo(tmp_path):
    methods = ("so", "so_reference_cli", "adam", "lora", "dora", "zeroshot")
    main_py(tmp_path, *DEMO, f"method={','.join(methods)}", multirun=True)
    found = {res["method"]: res for res in results(tmp_path).values()}
    assert sorted(found) == sorted(methods)
    assert found["zeroshot"]["iterations"] == 0 and found["zeroshot"]["trainable_params"] == 0
    assert found["zeroshot"]["top1"] == found["zeroshot"]["zeroshot_top1"]
    assert all(found[m]["iterations"] == 4 for m in methods if m != "zeroshot")
    assert found["so"]["trainable_params"] == found["adam"]["trainable_params"] > found["lora"]["trainable_params"]


def test_saved_training_evaluates_identically(tmp_path):
    main_py(tmp_path, *DEMO, "method=so,lora", "save=true", multirun=True)
    trained = results(tmp_path)
    assert len(trained) == 2 and all((tmp_path / "out" / p).with_name("trained.pt").is_file() for p in trained)
    main_py(tmp_path, *DEMO, "method=so,lora", "eval_only=true", "force=true", multirun=True)
    for path, reloaded in results(tmp_path).items():
        assert reloaded["iterations"] == 0 and reloaded["top1"] == trained[path]["top1"], path
