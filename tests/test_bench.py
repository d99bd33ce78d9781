"""The benchmark scripts run on CPU and print one well-formed JSON object per line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test runs a benchmark script in a subprocess


def json_lines(*args):
    proc = subprocess.run([sys.executable, *args, "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_bench_train_step_on_the_tiny_model():
    rows = json_lines("scripts/bench_train_step.py", "--device", "cpu", "--model", "tiny",
                      "--classes", "3,10", "--iters", "2", "--warmup", "1")
    methods = ("so", "adam", "lora", "relora", "galore")
    assert [(r["method"], r["classes"]) for r in rows] == [(m, c) for m in methods for c in (3, 10)]
    for row in rows:
        assert row["s_per_iter"] > 0 and row["peak_gib"] is None and row["device"] == "cpu"
        assert (row["model"], row["batch_size"], row["compile"]) == ("tiny", 32, "none")


def test_bench_data_on_small_images():
    rows = json_lines("scripts/bench_data.py", "--images", "8", "--batch-size", "4", "--size", "32",
                      "--workers", "0")
    benches = {r["bench"]: r for r in rows}
    assert {"test_loader", "train_decode", "train_batch", "train_batch_per_sample_pil"} <= benches.keys()
    assert benches["test_loader"]["images_per_s"] > 0 and benches["train_batch"]["ms"] > 0
