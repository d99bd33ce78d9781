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
    assert [(r["method"], r["classes"]) for r in rows] == [(m, c) for c in (3, 10) for m in methods]
    for row in rows:
        assert row["s_per_iter"] > 0 and row["peak_gib"] is None and row["device"] == "cpu" and row["gflops"] > 0
        assert (row["model"], row["batch_size"], row["compile"]) == ("tiny", 32, "none")


def test_bench_train_step_interleaved_counts_the_flops_and_gradients_sparse_so_saves():
    """so-tiny, batch 32 of 17 tokens, 3 prompts of 4 tokens: SO's sparse backward drops exactly the
    weight-gradient GEMMs of its 96 matrices; Adam keeps every dense gradient until its step."""
    rows = {r["method"]: r for r in json_lines(
        "scripts/bench_train_step.py", "--device", "cpu", "--model", "tiny", "--classes", "3", "--iters", "2",
        "--warmup", "1", "--interleave", "--methods", "so,so:optimizer.sparse_backward=false,adam")}
    sparse, dense, adam = rows["so"], rows["so:optimizer.sparse_backward=false"], rows["adam"]
    weights = 2 * 12 * 49152  # the tiny towers' 96 matrices, half in each tower
    vision = 2 * (32 * 17) * weights / 2 / 1e9  # the vision tower's dW GEMMs: 32 images of 17 tokens
    text = 2 * 3 * 77 * weights / 2 / 1e9  # the text tower's: 3 prompts of at most 77 tokens
    assert vision < dense["gflops"] - sparse["gflops"] < vision + text and adam["gflops"] == dense["gflops"]
    assert adam["grad_bytes"] == 4 * weights and sparse["grad_bytes"] < adam["grad_bytes"] / 100


def test_bench_data_on_small_images():
    rows = json_lines("scripts/bench_data.py", "--images", "8", "--batch-size", "4", "--size", "32",
                      "--workers", "0")
    benches = {r["bench"]: r for r in rows}
    assert {"test_loader", "test_cache_build", "test_cached", "train_decode", "train_batch",
            "train_batch_per_sample_pil"} <= benches.keys()
    assert benches["test_cached"]["images_per_s"] > benches["test_loader"]["images_per_s"]
    assert benches["test_loader"]["images_per_s"] > 0 and benches["train_batch"]["ms"] > 0
