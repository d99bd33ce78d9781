#!/usr/bin/env bash
# The sandbox table: the main table's methods on the synthetic world's held-out tasks, with the tiny CLIP
# pretrained on that world (model=tiny_pretrained), then aggregated like the paper's tables (tables.md,
# table_<K>shot.csv, accuracy_vs_shots.png in outputs/sandbox_table/aggregate/). Runs offline on a CPU.
# The checkpoint is pretrained first when missing (scripts/pretrain_sandbox.py, a few minutes), so
# parallel launchers never build it twice. Zero-shot runs once per task, as in scripts/main_table.sh.
#
# Usage: scripts/sandbox_table.sh [--dry-run] [--help] [HYDRA_OVERRIDE ...]
#   --dry-run         list the trials, one per line on stdout (totals on stderr); launch nothing
#   HYDRA_OVERRIDE    added to every trial, e.g. max_iters=300 logger=none num_workers=0, paths.cache_dir=...
# Environment (space-separated lists):
#   DATASETS  default: "synthetic_compositions synthetic_shift"
#   METHODS   default: "so relora lora galore adam zeroshot"; the word baselines stands for the field's table
#             (coop coop4 cocoop kgcoop clip_adapter tip_adapter tip_adapter_f taskres lp clap)
#   SHOTS     default: "1 4 16"
#   SEEDS     default: "1 2 3"
#   NAME      experiment name, default: sandbox_table
#   PYTHON    interpreter, default: python
source "$(dirname "$0")/_sweep.sh"

DATASETS="${DATASETS:-synthetic_compositions synthetic_shift}"
METHODS="${METHODS:-so relora lora galore adam zeroshot}"
METHODS="${METHODS//baselines/$BASELINES}"
SHOTS="${SHOTS:-1 4 16}"
SEEDS="${SEEDS:-1 2 3}"
NAME="${NAME:-sandbox_table}"
parse_args "$@"

pretrain_sandbox
table "$NAME" "$DATASETS" "$METHODS" "$SHOTS" "$SEEDS" model=tiny_pretrained
aggregate_results "$NAME"
finish
