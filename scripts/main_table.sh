#!/usr/bin/env bash
# The paper's main table: every dataset x shots x seeds for each trained method, plus zero-shot CLIP
# once per dataset (it trains nothing, so shots and seed do not change it; aggregate.py uses it for every
# shot count). One Hydra multirun per group, results under outputs/main_table/ (NAME).
#
# Usage: scripts/main_table.sh [--dry-run] [--help] [HYDRA_OVERRIDE ...]
#   --dry-run         list the trials, one per line on stdout (totals on stderr); launch nothing
#   HYDRA_OVERRIDE    added to every trial, e.g. hydra/launcher=slurm hydra.launcher.partition=gpu,
#                     hydra/launcher=parallel (NUM_GPUS=4), max_iters=500, model.pretrained=/path/ViT-B-16.pt
# Environment (space-separated lists):
#   DATA      data root holding the benchmark folders (DATASETS.md), or pass paths.data_root=...
#   DATASETS  default: the 11 benchmarks
#   METHODS   default: "so lora adam zeroshot" (zeroshot: once per dataset, at the first SHOTS and SEEDS)
#   SHOTS     default: "1 2 4 8 16"
#   SEEDS     default: "1 2 3"
#   NAME      experiment name, default: main_table
#   PYTHON    interpreter, default: python
source "$(dirname "$0")/_sweep.sh"

DATASETS="${DATASETS:-$BENCHMARKS}"
METHODS="${METHODS:-so lora adam zeroshot}"
SHOTS="${SHOTS:-1 2 4 8 16}"
SEEDS="${SEEDS:-1 2 3}"
NAME="${NAME:-main_table}"
parse_args "$@"

read -ra shot_list <<<"$SHOTS"; read -ra seeds <<<"$SEEDS"
trained=()
for method in $METHODS; do [[ $method == zeroshot ]] || trained+=("$method"); done
if [[ " $METHODS " == *" zeroshot "* ]]; then
  sweep "$NAME" "$DATASETS" zeroshot "${shot_list[0]}" "${seeds[0]}"
fi
if ((${#trained[@]})); then
  sweep "$NAME" "$DATASETS" "${trained[*]}" "$SHOTS" "$SEEDS"
fi
finish
