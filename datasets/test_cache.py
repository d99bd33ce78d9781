"""The test split decoded once: every trial of a sweep evaluates from one uint8 array on disk.

open_clip's eval transform is PIL work (resize, centre crop, RGB) followed by ToTensor and Normalize.
`TestImages` runs the PIL part once per (test records, transform), stores the results as a uint8
[N, 3, S, S] .npy file under <cache_dir>/test_images/, memory-mapped, and yields batches of
ToTensor + Normalize of them: the same floats, bit for bit, as the DataLoader over the images.
The key is the records (path, label, size, modification time) and the transform, so an edited image
or another crop size makes a new array. Written once, atomically (a temporary file and a rename):
parallel trials that build it at once waste time, never each other's file.
"""
import hashlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from datasets.pipeline import read_image

log = logging.getLogger(__name__)


def split_transform(transform):
    """(the PIL part, Normalize) of an open_clip eval transform; None when it is not
    Compose([..., ToTensor(), Normalize(...)])."""
    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    return T.Compose(steps[:-2]), steps[-1]


def key(records, pil, size):
    """The content key of the decoded split: the records with their files' size and time, the transform."""
    digest = hashlib.blake2b(digest_size=16)
    for r in records:
        stat = os.stat(r.path)
        digest.update(f"{r.path}\0{r.label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update(f"{pil!r}\0{size}".encode())
    return digest.hexdigest()


class TestImages:
    """Batches (normalised float images on `device`, labels) of `records`, from the decoded cache.
    `TestImages.of(...)` builds or reuses the array, or returns None where the transform is not
    open_clip's shape (the caller then streams the images)."""

    __test__ = False  # not a test, for pytest modules that import it

    def __init__(self, array, labels, normalize, batch_size, device, indices=None):
        self.array, self.labels, self.batch_size, self.device = array, labels, batch_size, device
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        shape = (1, 3, 1, 1)
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32, device=device).view(shape)
        self.normalize = normalize

    @classmethod
    def of(cls, name, records, transform, batch_size, device, cache_dir):
        parts = split_transform(transform)
        if parts is None:
            log.info("The eval transform is not ToTensor + Normalize after PIL steps: %s's test images are "
                     "decoded by every trial.", name)
            return None
        pil, normalize = parts
        sample = np.asarray(pil(read_image(records[0].path)))
        folder = Path(cache_dir).expanduser() / "test_images" / name
        path = folder / f"{key(records, pil, sample.shape)}.npy"
        if path.is_file():
            log.info("Test split of %s: %d decoded images reused from %s.", name, len(records), path)
        else:
            try:
                build(path, records, pil, sample.shape)
            except NotWritten as e:  # a cache: the trial goes on without it
                log.warning("Test split of %s: not cached (%s); its images are decoded by every evaluation.", name, e)
                return None
            log.info("Test split of %s: %d images decoded once into %s.", name, len(records), path)
        labels = torch.tensor([r.label for r in records])
        return cls(np.load(path, mmap_mode="r"), labels, normalize, batch_size, device)

    def subset(self, indices):
        """The same decoded images, `indices` of them."""
        return TestImages(self.array, self.labels, self.normalize, self.batch_size, self.device,
                          self.indices[np.asarray(indices, dtype=np.int64)])

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            index = self.indices[start:start + self.batch_size]
            contiguous = index[-1] - index[0] + 1 == len(index)  # a slice of the memory map: no gather
            chunk = self.array[index[0]:index[-1] + 1] if contiguous else self.array[index]
            images = torch.from_numpy(np.array(chunk)).to(self.device, non_blocking=True)  # off the map
            yield images.float().div_(255).sub_(self.mean).div_(self.std), self.labels[index].to(self.device)


class NotWritten(OSError):
    """The cache file could not be made (no space, no permission)."""


def build(path, records, pil, shape, threads=None):
    """Decode `records` through `pil` into a uint8 [N, 3, H, W] .npy at `path`, atomically. Its space
    is reserved first (a full disk is NotWritten here, not a crash while the map is written)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                          shape=(len(records), shape[2], shape[0], shape[1]))
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise NotWritten(e.errno, f"cannot write {path}: {e.strerror or e}") from None

    def decode(i):
        image = np.asarray(pil(read_image(records[i].path)))
        if image.shape != shape:
            raise ValueError(f"image {records[i].path}: the eval transform gives {image.shape}, expected {shape}")
        array[i] = image.transpose(2, 0, 1)

    try:
        with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            list(pool.map(decode, range(len(records))))
        array.flush()
        del array
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
