"""Files every part of the project writes: atomically, with the umask's permissions, and a lock per folder.

- `write_atomic` / `write_json_atomic` / `save_atomic`: a temporary file and a rename, so a reader
  (or a crash, or a full disk) never leaves a partial file; files get the umask's permissions.
  JSON is strict: non-finite floats are written as null.
- `remove_stale_temporaries`: what a write killed mid-way left behind.
- `content_key`: the hex digest that names a cache file after what its content depends on.
- `RunLock`: an flock on <folder>/.lock (never through a symbolic link); the kernel drops it when its
  process dies, so a killed trial never blocks a re-run.
Standard library only (torch is imported by save_atomic when it is called): datasets/ and the CLIP
harness both use it, and neither needs the optimizer for it.
"""
import fcntl
import hashlib
import io
import json
import math
import os
import stat
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
TMP_SUFFIX = ".tmp"


def content_key(*parts):
    """A 32-hex-digit digest of `parts`: bytes as they are, anything else as its str and a NUL."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else f"{part}\0".encode())
    return digest.hexdigest()


def write_atomic(path, data):
    """Write bytes via a temporary file and a rename, so readers never see a partial file. A write
    that fails (a full disk) leaves the earlier file as it was and names the file it could not write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; others' output follows the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder):
    """Delete what writes killed mid-way left in `folder` (.<name>.<random>.tmp); call it only while
    holding the folder's RunLock, so that no live write is removed. Returns the paths removed."""
    stale = sorted(Path(folder).glob(f".*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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
    """`with RunLock(run_dir) as held:` held is False when another live process holds it. The lock
    file is opened without following a symbolic link and must be a regular file: a link planted in
    a run folder cannot make the lock truncate another file."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def holder(self):
        """What the holding process wrote: its pid and host."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return "unknown"
        with os.fdopen(fd, "rb") as f:
            return f.read(200).decode("utf-8", "replace").strip() or "unknown"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~_UMASK)
        except OSError as e:
            if self.path.is_symlink():
                raise OSError(e.errno, f"{self.path} is a symbolic link; a run folder's lock must be a regular "
                                       "file: remove the link") from None
            if self.path.exists():
                raise OSError(e.errno, f"{self.path} is not a regular file; remove it") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a fifo or a device
            os.close(fd)
            raise OSError(f"{self.path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self.fd = fd
        return True

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
