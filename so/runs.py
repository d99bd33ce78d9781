"""The run folder of a trial: atomic writes, the trial's identity, and a lock so it trains once.

- `write_atomic` / `write_json_atomic` / `save_atomic`: a temporary file and a rename, so a reader
  (or a crash, or a full disk) never leaves a partial file; files get the umask's permissions.
  JSON is strict: non-finite floats are written as null.
- `check_finished`: a results.json written by the same config means the trial is done; one written
  by another config is an error that lists the keys that differ.
- `RunLock`: an flock on <run folder>/.lock; the kernel drops it when its process dies, so a killed
  trial never blocks a re-run. Standard library only.
"""
import fcntl
import io
import json
import math
import os
import tempfile
from pathlib import Path

# Keys of the resolved config that do not change a trial's result: where things are, how fast it
# runs, what else is written, and how it is logged. Every other key is the trial's identity.
RUN_ONLY = {"force", "logger", "paths", "device", "num_workers", "eval_batch_size", "save",
            "count_updates", "eval_only", "compile", "grad_checkpointing", "dataset.root"}

_UMASK = os.umask(0)
os.umask(_UMASK)


class TrialMismatch(ValueError):
    """A run folder holds the results of another config."""


def write_atomic(path, data):
    """Write bytes via a temporary file and a rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; others' output follows the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json_atomic(path, obj, indent=None):
    write_atomic(path, json.dumps(finite(obj), indent=indent, allow_nan=False).encode("utf-8"))


def save_atomic(obj, path):
    """torch.save(obj, path), atomically."""
    import torch  # here: the rest of this module needs only the standard library

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def flatten(config, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def identity(config):
    """The keys of a resolved config (a plain dict) that decide the trial's result."""
    return {k: v for k, v in flatten(config).items()
            if not any(k == r or k.startswith(f"{r}.") for r in RUN_ONLY)}


def check_finished(run_dir, config):
    """True when run_dir/results.json exists and came from a config with this identity; raises
    TrialMismatch, listing the keys that differ, when it came from another one."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise TrialMismatch(f"{path} is not a results.json of main.py ({e}); move it away, or "
                            "pass force=true to run the trial again") from None
    was, now = identity(stored), identity(config)
    differ = sorted(k for k in was.keys() | now.keys() if was.get(k, "<absent>") != now.get(k, "<absent>"))
    if differ:
        shown = "; ".join(f"{k}: {was.get(k, '<absent>')!r} there, {now.get(k, '<absent>')!r} now"
                          for k in differ[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise TrialMismatch(f"{path} holds the result of another config: {shown}{more}. Give this "
                            "run another name=..., or pass force=true to replace that result")
    return True


class RunLock:
    """`with RunLock(run_dir) as held:` held is False when another live process holds it."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def holder(self):
        """What the holding process wrote: its pid and host."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            self.file = None
            return False
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self.file.flush()
        return True

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None
