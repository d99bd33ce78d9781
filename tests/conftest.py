"""Shared test set-up: offline, quiet, deterministic, and the repository root on sys.path."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One intra-op thread: the tiny model gains nothing from more, and OpenMP threads that spin-wait on a
# shared 2-core machine made CPU steps 20-50x slower (measured: 0.6 s vs 31 s for five iterations).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from datasets.catalog import register_configs  # noqa: E402  (what main.py registers: tests compose configs too)
from so.clip.config import register_resolvers  # noqa: E402

register_configs()
register_resolvers()
