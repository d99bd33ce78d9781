"""Throughput of the data pipeline on generated JPEGs of about 500x375 (written to a temporary folder).

    python scripts/bench_data.py --json [--images 256] [--batch-size 32] [--size 224] [--workers N] [--threads N]

Measures: test images/s through datasets.pipeline.test_loader (open_clip's eval transform), through
the decoded test split (datasets.test_cache: `test_cache_build` decodes it once, as the first trial of a
sweep does, `test_cached` is what every later evaluation reads); the one-off decode of the train images and the ms per augmented batch of TrainImages.batch, on CPU and on CUDA
when present; and, for comparison, ms per batch of the per-sample PIL pipeline that decodes and
augments every image in DataLoader workers at every step (torchvision RandomResizedCrop).
With --json, one JSON object per line.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets.base import Record  # noqa: E402
from datasets.pipeline import ImageRecords, TrainImages, test_loader  # noqa: E402
from datasets.test_cache import TestImages  # noqa: E402

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def write_images(folder, n, seed=0):
    """n photo-like JPEGs of 500x375: smooth colour fields plus fine noise, so files are of realistic size."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(low, dtype=np.int16) + rng.integers(-20, 21, (375, 500, 3))
        path = Path(folder) / f"{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        records.append(Record(str(path), i % 10, f"class {i % 10}"))
    return records


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(records, device, size, batch_size, iters=30):
    start = time.perf_counter()
    train = TrainImages(records, device, size, MEAN, STD, torch.Generator().manual_seed(0))
    sync(device)
    decode_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(1)
    draw = lambda: torch.randint(len(records), (batch_size,), generator=g)
    for _ in range(3):
        train.batch(draw())
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        train.batch(draw())
    sync(device)
    return decode_s, (time.perf_counter() - start) / iters * 1000, train.on_device


def bench_reference(records, size, batch_size, workers):
    augment = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    loader = DataLoader(ImageRecords(records, augment), batch_size=batch_size, shuffle=True, num_workers=workers,
                        drop_last=True)
    start, n = time.perf_counter(), 0
    for _ in loader:
        n += 1
    return (time.perf_counter() - start) / n * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="model input size S")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = {"images": args.images, "image_size": args.size, "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__}

    def emit(**row):
        row = {**row, **common}
        print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    with tempfile.TemporaryDirectory() as folder:
        records = write_images(folder, args.images)
        transform = open_clip.image_transform(args.size, is_train=False, mean=MEAN, std=STD)
        for workers in sorted({0, args.workers}):
            start = time.perf_counter()
            for _ in test_loader(records, transform, args.batch_size, workers):
                pass
            emit(bench="test_loader", device="cpu", workers=workers,
                 images_per_s=round(args.images / (time.perf_counter() - start), 1))
        start = time.perf_counter()  # the decoded cache: built once (what the first trial pays), then read
        TestImages.of("bench", records, transform, args.batch_size, torch.device("cpu"), folder)
        emit(bench="test_cache_build", device="cpu", images_per_s=round(args.images / (time.perf_counter() - start), 1))
        start = time.perf_counter()
        for _ in TestImages.of("bench", records, transform, args.batch_size, torch.device("cpu"), folder):
            pass
        emit(bench="test_cached", device="cpu", images_per_s=round(args.images / (time.perf_counter() - start), 1))
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        for device in devices:
            decode_s, batch_ms, on_device = bench_train(records, device, args.size, args.batch_size)
            emit(bench="train_decode", device=str(device), images_per_s=round(args.images / decode_s, 1))
            emit(bench="train_batch", device=str(device), batch_size=args.batch_size, ms=round(batch_ms, 2),
                 images_on_device=on_device)
        emit(bench="train_batch_per_sample_pil", device="cpu", workers=args.workers, batch_size=args.batch_size,
             ms=round(bench_reference(records, args.size, args.batch_size, args.workers), 2))


if __name__ == "__main__":
    main()
