#!/usr/bin/env bash
# The base-to-novel table (CoCoOp's protocol, base_to_novel=true): on every dataset, train on the first
# half of the classes (base) and evaluate on the base and the novel test classes; zero-shot CLIP once
# per dataset. `python scripts/aggregate.py outputs/base_to_novel` writes base_to_novel.md: base, novel
# and their harmonic mean per method and dataset. One Hydra multirun per group, under outputs/NAME/.
#
# Usage: scripts/base_to_novel.sh [--dry-run] [--help] [HYDRA_OVERRIDE ...]
#   --dry-run         list the trials, one per line on stdout (totals on stderr); launch nothing
#   HYDRA_OVERRIDE    added to every trial, e.g. hydra/launcher=slurm, model.pretrained=/path/ViT-B-16.pt
# Environment (space-separated lists):
#   DATA      data root holding the benchmark folders (DATASETS.md), or pass paths.data_root=...
#   DATASETS  default: the 11 benchmarks
#   METHODS   default: "so relora lora galore adam zeroshot" (zeroshot: once per dataset)
#   SHOTS     default: "16" (CoCoOp's base-to-novel setting)
#   SEEDS     default: "1 2 3"
#   NAME      experiment name, default: base_to_novel
#   PYTHON    interpreter, default: python
source "$(dirname "$0")/_sweep.sh"

DATASETS="${DATASETS:-$(benchmarks)}"
METHODS="${METHODS:-so relora lora galore adam zeroshot}"
SHOTS="${SHOTS:-16}"
SEEDS="${SEEDS:-1 2 3}"
NAME="${NAME:-base_to_novel}"
parse_args "$@"

table "$NAME" "$DATASETS" "$METHODS" "$SHOTS" "$SEEDS" base_to_novel=true
finish
