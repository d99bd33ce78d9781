"""Run folders: atomic writes, strict JSON, permissions, the run lock (so.files); trial identity (so.clip.runs)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from so import files
from so.clip import runs

CONFIG = {"name": "demo", "shots": 4, "seed": 1, "max_iters": 60,
          "method": {"name": "so", "kind": "weights"}, "optimizer": {"name": "so", "lr": 2e-4, "density": 5e-4},
          "dataset": {"name": "dtd", "root": "/data"}, "paths": {"out_root": "outputs"}, "num_workers": 8,
          "force": False}


class DiskFull:
    """A file object that takes half of what it is given, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")


def test_an_interrupted_save_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "trained.pt"
    files.save_atomic({"w": torch.ones(3)}, path)
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: DiskFull(fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        files.save_atomic({"w": torch.zeros(100_000)}, path)
    with pytest.raises(OSError, match="No space left"):
        files.save_atomic({"w": torch.zeros(3)}, tmp_path / "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained.pt"]  # no partial file, no .tmp
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_files_get_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    files.write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~files._UMASK


def test_json_is_strict_with_null_for_non_finite_numbers(tmp_path):
    files.write_json_atomic(tmp_path / "r.json", {"loss": float("nan"), "curve": [1.0, float("inf")],
                                                 "nested": {"x": -float("inf")}, "ok": 2.5})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "loss": None, "curve": [1.0, None], "nested": {"x": None}, "ok": 2.5}


def test_identity_ignores_where_and_how_fast_and_names_what_differs(tmp_path):
    files.write_json_atomic(tmp_path / "results.json", {"config": CONFIG})
    moved = json.loads(json.dumps(CONFIG))
    moved["paths"]["out_root"], moved["dataset"]["root"], moved["num_workers"] = "elsewhere", "/mnt", 2
    assert runs.check_finished(tmp_path, moved)
    other = json.loads(json.dumps(CONFIG))
    other["optimizer"]["density"], other["max_iters"] = 5e-5, 100
    other["model"] = {"name": "ViT-B-16-quickgelu"}
    with pytest.raises(runs.TrialMismatch) as error:
        runs.check_finished(tmp_path, other)
    message = str(error.value)
    assert "max_iters: 60 there, 100 now" in message and "optimizer.density: 0.0005 there, 5e-05 now" in message
    assert "model.name: '<absent>' there, 'ViT-B-16-quickgelu' now" in message and "force=true" in message
    assert not runs.check_finished(tmp_path / "empty", CONFIG)


def _holder(run_dir):
    code = ("import sys, time; from so.files import RunLock\n"
            "with RunLock(sys.argv[1]) as held:\n    print(held, flush=True)\n    time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stdout.readline().strip() == "True"
    return proc


def test_a_held_lock_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    holder = _holder(tmp_path)
    lock = files.RunLock(tmp_path)
    with lock as held:
        assert held is False and lock.holder().startswith(f"pid {holder.pid} on ")
    holder.send_signal(signal.SIGKILL)  # a trial killed mid-run: its lock file stays behind
    holder.wait()
    assert (tmp_path / ".lock").exists()
    with files.RunLock(tmp_path) as held:
        assert held is True
    with files.RunLock(tmp_path) as held:  # and released again on exit
        assert held is True


SO_ARGS = {"lr": 2e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "density": 5e-4, "refresh_every": 10,
           "grad_selection": "random", "moment_selection": "topk", "support": "dynamic", "momentum": True}
LORA = {"encoder": "both", "position": "all", "targets": ["q", "k", "v"], "rank": 2, "alpha": 1, "dropout": 0.25}
ADAMW_ARGS = {"lr": 2e-4, "betas": [0.9, 0.999], "weight_decay": 0.01}
# The method of each preset as results.json recorded it before method= and optimizer= were two groups.
EARLIER = {
    "so": {"name": "so", "kind": "so", "encoder": "both", "position": "all", "step_in_backward": True,
           "optimizer": SO_ARGS},
    "so_reference_cli": {"name": "so_reference_cli", "kind": "so", "encoder": "both", "position": "all",
                         "step_in_backward": True, "optimizer": SO_ARGS | {"density": 5e-5, "refresh_every": 5}},
    "adam": {"name": "adam", "kind": "adam", "encoder": "both", "position": "all",
             "optimizer": {"lr": 2e-4, "betas": [0.9, 0.999], "weight_decay": 0.0}},
    "lora": {"name": "lora", "kind": "lora", **LORA, "dora": False, "optimizer": ADAMW_ARGS},
    "dora": {"name": "dora", "kind": "lora", **LORA, "dora": True, "optimizer": ADAMW_ARGS},
    "relora": {"name": "relora", "kind": "relora", **LORA, "dora": False,
               "optimizer": ADAMW_ARGS | {"reset_every": 500, "restart_warmup": 10, "prune_ratio": 0.9,
                                          "prune_together": True}},
    "galore": {"name": "galore", "kind": "galore", "encoder": "both", "position": "all",
               "optimizer": {"lr": 2e-4, "rank": 2, "update_proj_gap": 200, "scale": 0.25, "betas": [0.9, 0.999],
                             "weight_decay": 0.0}},
    "zeroshot": {"name": "zeroshot", "kind": "zeroshot"},
}


@pytest.mark.parametrize("name", list(EARLIER))
def test_a_result_of_the_earlier_layout_is_the_same_trial(tmp_path, name):
    """Finished sweeps stay finished: a results.json whose method held its optimizer's arguments is read
    in today's layout, and is the trial today's preset runs; a changed argument still differs, named."""
    from omegaconf import OmegaConf

    from main import compose

    now = OmegaConf.to_container(compose("dataset=synthetic", f"method={name}"), resolve=True)
    earlier = {k: v for k, v in now.items() if k not in ("method", "optimizer")} | {"method": EARLIER[name]}
    files.write_json_atomic(tmp_path / "results.json", {"config": earlier})
    assert runs.check_finished(tmp_path, now)
    if name != "zeroshot":
        changed = json.loads(json.dumps(earlier))
        changed["method"]["optimizer"]["lr"] = 1e-3
        files.write_json_atomic(tmp_path / "results.json", {"config": changed})
        with pytest.raises(runs.TrialMismatch, match="optimizer.lr: 0.001 there, 0.0002 now"):
            runs.check_finished(tmp_path, now)


def test_the_lock_never_follows_a_symbolic_link(tmp_path):
    """A .lock planted as a link to another file must not get that file truncated and overwritten."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    with pytest.raises(OSError, match=r"\.lock is a symbolic link; a run folder's lock must be a regular file"):
        with files.RunLock(run_dir):
            pass
    assert victim.read_text() == "precious"
    (run_dir / ".lock").unlink()
    (run_dir / ".lock").mkdir()
    with pytest.raises(OSError, match="is not a regular file"):
        with files.RunLock(run_dir):
            pass


def test_a_failed_write_names_its_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    files.write_json_atomic(path, {"top1": 1.0})
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: DiskFull(fdopen(*a, **k)))
    with pytest.raises(OSError, match=rf"cannot write {path}: No space left on device") as error:
        files.write_json_atomic(path, {"top1": 2.0})
    assert error.value.errno == 28 and json.loads(path.read_text()) == {"top1": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_stale_temporaries_are_removed_and_results_kept(tmp_path):
    for name in (".results.json.abc123.tmp", ".trained.pt.x.tmp", "results.json", "keep.tmp"):
        (tmp_path / name).write_text("x")
    removed = files.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".results.json.abc123.tmp", ".trained.pt.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "results.json"]
