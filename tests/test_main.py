"""End to end through Hydra: main.py on the tiny model and the synthetic dataset, on CPU."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test runs main.py in a subprocess
DEMO = ["experiment=demo", "dataset=synthetic", "debug=fast"]  # the demo on the tiny random model
FAST = ["debug=fast"]


class Touch:
    """Unpickling it creates a file: what a crafted checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


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
    assert path == "debug/synthetic/adam/2shot/seed3/results.json"  # debug=fast: a name of its own
    assert (res["dataset"], res["shots"], res["seed"], res["method"], res["name"]) == ("synthetic", 2, 3, "adam", "debug")
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
    path.write_text(json.dumps({**res, "marker": True}))
    proc = main_py(tmp_path, *DEMO, "shots=2", "seed=3")
    assert "Skipping" in proc.stderr and json.loads(path.read_text())["marker"] is True
    main_py(tmp_path, *DEMO, "shots=2", "seed=3", "force=true")
    assert json.loads(path.read_text())["seed"] == 3


def test_multirun_writes_one_results_file_per_trial(tmp_path):
    main_py(tmp_path, *DEMO, "seed=1,2", "shots=1,2", multirun=True)
    assert sorted(results(tmp_path)) == [f"debug/synthetic/adam/{k}shot/seed{s}/results.json"
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
    methods = ("so", "so_reference_cli", "adam", "lora", "dora", "relora", "galore", "zeroshot")
    main_py(tmp_path, *DEMO, f"method={','.join(methods)}", multirun=True)
    found = {res["method"]: res for res in results(tmp_path).values()}
    assert sorted(found) == sorted(methods)
    assert found["zeroshot"]["iterations"] == 0 and found["zeroshot"]["trainable_params"] == 0
    assert found["zeroshot"]["top1"] == found["zeroshot"]["zeroshot_top1"]
    assert all(found[m]["iterations"] == 4 for m in methods if m != "zeroshot")
    assert found["so"]["trainable_params"] == found["adam"]["trainable_params"] > found["lora"]["trainable_params"]
    assert found["relora"]["trainable_params"] == found["lora"]["trainable_params"]
    assert found["galore"]["trainable_params"] == found["so"]["trainable_params"]


def test_saved_training_evaluates_identically(tmp_path):
    main_py(tmp_path, *DEMO, "method=so,lora", "save=true", multirun=True)
    trained = results(tmp_path)
    assert len(trained) == 2 and all((tmp_path / "out" / p).with_name("trained.pt").is_file() for p in trained)
    main_py(tmp_path, *DEMO, "method=so,lora", "eval_only=true", "force=true", multirun=True)
    for path, reloaded in results(tmp_path).items():
        assert reloaded["iterations"] == 0 and reloaded["top1"] == trained[path]["top1"], path


def test_a_result_of_another_config_is_not_reused(tmp_path):
    main_py(tmp_path, *DEMO)
    (path, first), = results(tmp_path).items()
    again = main_py(tmp_path, *DEMO, "num_workers=1", f"paths.cache_dir={tmp_path / 'cache'}")  # same trial
    assert "results.json exists, from this config" in again.stderr
    for change, key in (("optimizer.lr=1e-3", "optimizer.lr: 0.0002 there, 0.001 now"),
                        ("model=tiny_pretrained", "model.name: 'so-tiny' there, 'so-sandbox' now"),
                        ("max_iters=5", "max_iters: 4 there, 5 now")):
        proc = main_py(tmp_path, *DEMO, change, check=False)
        assert proc.returncode == 1 and key in proc.stderr and "force=true" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert results(tmp_path)[path] == first  # untouched
    main_py(tmp_path, *DEMO, "max_iters=5", "force=true")
    assert results(tmp_path)[path]["iterations"] == 5


def test_a_diverged_trial_is_marked_with_no_bare_nan_and_the_sweep_goes_on(tmp_path):
    proc = main_py(tmp_path, *DEMO, "method=so,adam", "optimizer.lr=1e30", "max_iters=40", multirun=True)
    texts = {p: (tmp_path / "out" / p).read_text() for p in results(tmp_path)}
    assert len(texts) == 2 and "DIVERGED" in proc.stdout + proc.stderr
    for path, text in texts.items():
        res = json.loads(text, parse_constant=lambda c: pytest.fail(f"{path}: bare {c}"))
        assert res["status"] == "diverged" and res["top1"] is None and 1 <= res["diverged_at"] < 40
        assert res["iterations"] == res["diverged_at"] and isinstance(res["zeroshot_top1"], float)
    proc = main_py(tmp_path, *DEMO, "method=adam", "optimizer.lr=1e30", "max_iters=40")
    assert "results.json exists" in proc.stderr  # a diverged trial is done: re-runs skip it


def test_max_iters_seed_and_batch_size_are_checked_before_anything_runs(tmp_path):
    for override, message in (("max_iters=0", "max_iters=0: expected an integer >= 1"),
                              ("max_iters=-5", "max_iters=-5: expected an integer >= 1"),
                              ("seed=1.5", "seed=1.5: expected an integer"),
                              ("batch_size=0", "batch_size=0: expected an integer >= 1")):
        proc = main_py(tmp_path, *DEMO, override, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not results(tmp_path)


def test_user_errors_are_one_message_in_main_log_and_the_traceback_is_opt_in(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = main_py(tmp_path, "dataset=dtd", *FAST, f"paths.data_root={missing}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR=1" in proc.stderr
    (log,) = (tmp_path / "out").rglob("main.log")
    assert str(missing) in log.read_text()
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "main.py", "dataset=dtd", *FAST, f"paths.data_root={missing}",
           f"paths.out_root={tmp_path / 'out'}"]
    full = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_a_checkpoint_that_would_run_code_does_not(tmp_path):
    touched = tmp_path / "touched"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Touch(touched)}))
    proc = main_py(tmp_path, *DEMO, f"model.pretrained={evil}", check=False)
    assert proc.returncode == 1 and "can run code" in proc.stderr and not touched.exists()


def test_two_identical_trials_launched_together_train_once(tmp_path):
    cmd = [sys.executable, "main.py", *DEMO, "max_iters=60", f"paths.out_root={tmp_path / 'out'}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    trained = [out for out, _ in outs if "final top-1" in out]
    skipped = [err for _, err in outs if "another process is running this trial" in err
               or "results.json exists" in err]
    assert len(trained) == 1 and len(skipped) == 1, outs


def test_a_killed_trials_lock_does_not_block_the_rerun(tmp_path):
    run_dir = tmp_path / "out" / "debug" / "synthetic" / "adam" / "4shot" / "seed1"
    code = ("import sys, time; from so.files import RunLock\n"
            "with RunLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    busy = main_py(tmp_path, *DEMO)
    assert "another process is running this trial (pid" in busy.stderr and not results(tmp_path)
    holder.kill()
    holder.wait()
    main_py(tmp_path, *DEMO)
    assert len(results(tmp_path)) == 1


def test_an_unwritable_output_folder_is_named(tmp_path):
    (tmp_path / "out").write_text("a file where the output folder should be")  # unwritable, even for root
    proc = main_py(tmp_path, *DEMO, check=False)
    assert proc.returncode == 1 and "cannot write the output folder" in proc.stderr
    assert f"{tmp_path / 'out'} is not a folder this process can write to" in proc.stderr
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "out").unlink()
        (tmp_path / "out").mkdir(mode=0o555)
        proc = main_py(tmp_path, *DEMO, check=False)
        assert proc.returncode == 1 and f"{tmp_path / 'out'} is not a folder" in proc.stderr


def test_a_numeric_name_stays_a_name(tmp_path):
    main_py(tmp_path, *DEMO, "name=nan")
    (path, res), = results(tmp_path).items()
    assert path.startswith("nan/") and res["name"] == "nan"
