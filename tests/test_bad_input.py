"""Bad input, as a new user gives it: one message naming the key or the file, exit 1, the message in
main.log where the run has a folder, no folder where the config names none, nothing outside
paths.out_root, and a finished trial's files as they were."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures_datasets import write_benchmark
from tests.test_main import DEMO, FAST, ROOT, main_py, results

pytestmark = pytest.mark.slow  # main.py in subprocesses


def folders(tmp_path):
    return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_dir())


def one_message(proc, *needles):
    """Exit 1, every needle in one error line, no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert any(all(n in line for n in needles) for line in proc.stderr.splitlines()), proc.stderr


@pytest.mark.parametrize("override, needle", [
    ("name=../../escaped", "name='../../escaped': expected folder names under paths.out_root"),
    ("name=/tmp/elsewhere", "name='/tmp/elsewhere': expected folder names under paths.out_root"),
    ("dataset.name=../x", "dataset.name='../x': expected a folder name under paths.out_root"),
    ("shots=0", "shots=0: expected an integer >= 1"),
    ("seed=1.5", "seed=1.5: expected an integer in [0, 2**32)"),
    ("seed=-1", "seed=-1: expected an integer in [0, 2**32)")])
def test_a_config_whose_run_folder_is_invalid_creates_no_folder(tmp_path, override, needle):
    before = folders(tmp_path)
    proc = main_py(tmp_path, *DEMO, override, check=False)
    one_message(proc, needle)
    assert folders(tmp_path) == before and not (tmp_path.parent / "escaped").exists()


def test_in_a_multirun_the_invalid_trial_leaves_no_folder_and_the_others_run(tmp_path):
    proc = main_py(tmp_path, *DEMO, "seed=1,-1", multirun=True, check=False)
    assert proc.returncode == 1 and "seed=-1: expected an integer in [0, 2**32)" in proc.stderr
    assert list(results(tmp_path)) == ["debug/synthetic/adam/4shot/seed1/results.json"]
    assert not (tmp_path / "out" / "debug" / "synthetic" / "adam" / "4shot" / "seed-1").exists()


@pytest.mark.parametrize("override, needle", [
    ("+foo=1", "+foo=1: adds the key 'foo', which nothing reads"),
    ("compile=foo", "compile='foo': expected one of none, default"),
    ("eval_only=true", "eval_only=true: "),
    ("precision=fp16", "precision=fp16 steps through a GradScaler"),
    ("optimizer=galore", "method=zeroshot with optimizer=galore"),
])
def test_a_config_mistake_is_one_message_in_main_log_before_any_model(tmp_path, override, needle):
    method = ["method=so"] if override == "precision=fp16" else ["method=zeroshot"] if "galore" in override else []
    proc = main_py(tmp_path, *DEMO, *method, override, check=False)
    one_message(proc, needle)
    assert "zero-shot eval" not in proc.stdout + proc.stderr  # nothing was evaluated, nothing built
    (log,) = (tmp_path / "out").rglob("main.log")
    assert needle in log.read_text()


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_refused_or_skipped_run_leaves_the_finished_trials_files_as_they_were(tmp_path):
    main_py(tmp_path, *DEMO)
    (run_dir,) = (p.parent for p in (tmp_path / "out").rglob("results.json"))
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "main.log", "results.json"} <= set(_snapshot(run_dir))
    before = _snapshot(run_dir)
    refused = main_py(tmp_path, *DEMO, "max_iters=5", check=False)
    one_message(refused, "max_iters: 4 there, 5 now")
    again = main_py(tmp_path, *DEMO)  # the same trial: skipped, its result printed
    assert "(already run)" in again.stdout and "final top-1" in again.stdout
    assert _snapshot(run_dir) == before


def test_a_trial_started_while_another_holds_the_lock_writes_nothing(tmp_path):
    run_dir = tmp_path / "out" / "debug" / "synthetic" / "adam" / "4shot" / "seed1"
    code = ("import sys, time; from so.files import RunLock\n"
            "with RunLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = main_py(tmp_path, *DEMO)
        assert "another process is running this trial" in busy.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "main.log"]  # no .hydra/ of its own
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_temporary_of_a_killed_write_is_removed_by_the_next_run(tmp_path):
    run_dir = tmp_path / "out" / "debug" / "synthetic" / "adam" / "4shot" / "seed1"
    run_dir.mkdir(parents=True)
    stale = run_dir / ".results.json.k1ll3d.tmp"
    stale.write_bytes(b"x" * 1000)
    proc = main_py(tmp_path, *DEMO)
    assert not stale.exists() and "Removed .results.json.k1ll3d.tmp" in proc.stderr
    assert not list(run_dir.glob("*.tmp")) and (run_dir / "results.json").is_file()


def _zero_bytes(path):
    path.write_bytes(b"")


def _truncated(path):
    path.write_bytes(path.read_bytes()[:200])


def _not_an_image(path):
    path.unlink()
    path.symlink_to(ROOT / "README.md")


def _bomb(path):
    """A PNG whose pixel count is over twice PIL's limit: PIL refuses to decode it."""
    Image.new("1", (2 * Image.MAX_IMAGE_PIXELS // 9000 + 1, 9000)).save(path, format="PNG")


@pytest.mark.parametrize("damage, split, cache", [
    (_zero_bytes, "test", "true"), (_truncated, "test", "true"), (_not_an_image, "test", "true"),
    (_bomb, "test", "true"), (_truncated, "test", "false"), (_truncated, "train", "true")],
    ids=["zero_bytes", "truncated", "not_an_image", "bomb", "truncated_in_a_dataloader_worker", "truncated_train_image"])
def test_a_bad_image_is_one_message_naming_it(tmp_path, damage, split, cache):
    """Test images are decoded by the test split's cache (threads) or, with cache_test_split=false, in
    DataLoader workers (num_workers=2); train images by the decoding threads. Either way one line names
    the image, and main.log holds it."""
    data = tmp_path / "data"
    write_benchmark(data, "dtd")
    entries = json.loads((data / "dtd" / "split_zhou_DescribableTextures.json").read_text())[split]
    bad = data / "dtd" / "images" / entries[0][0]
    damage(bad)
    shots = 16 if split == "train" else 1  # every train image is drawn at 16 shots (5 to 7 per class)
    proc = main_py(tmp_path, *FAST, "dataset=dtd", f"paths.data_root={data}", f"shots={shots}", "num_workers=2",
                   f"cache_test_split={cache}", check=False)
    one_message(proc, f"cannot read image {bad}", "DATASETS.md#missing-or-unreadable-images")
    (log,) = (tmp_path / "out").rglob("main.log")
    assert f"cannot read image {bad}" in log.read_text()


def test_an_open_clip_tag_offline_says_why_and_points_to_a_local_file(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "main.py", *DEMO, "model=vit_b32", f"paths.out_root={tmp_path / 'out'}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    one_message(proc, "your environment sets HF_HUB_OFFLINE=1", "model.pretrained=/path/to/ViT-B-16.pt")
