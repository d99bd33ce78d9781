"""Files every part of the project writes: atomically, with the umask's permissions, and a lock per folder.

- `write_atomic` / `write_json_atomic` / `save_atomic`: a temporary file and a rename, so a reader
  (or a crash, or a full disk) never leaves a partial file; files get the umask's permissions.
  JSON is strict: non-finite floats are written as null.
- `RunLock`: an flock on <folder>/.lock; the kernel drops it when its process dies, so a killed
  trial never blocks a re-run.
Standard library only (torch is imported by save_atomic when it is called): datasets/ and the CLIP
harness both use it, and neither needs the optimizer for it.
"""
import fcntl
import io
import json
import math
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


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
