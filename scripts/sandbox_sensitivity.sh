#!/usr/bin/env bash
# The sandbox study of the paper's two claims about training dynamics: is SO's accuracy less sensitive
# to its density than LoRA's to its rank, and does LoRA's accuracy fall with more iterations while SO's
# does not? SO over DENSITIES and LoRA over RANKS on the held-out sandbox tasks, with the tiny CLIP
# pretrained on the sandbox world, every trial run for the whole budget (stop_loss=null) with an
# accuracy curve (eval_every). Each grid point is one Hydra multirun, written under
# outputs/sandbox_sensitivity/<point>/ (so_density<D>, lora_rank<R>); aggregate.py then gives one row
# per point, the curves included (curves_<K>shot.png). The grid and budget are fixed here, before any
# result: change them by the environment, not by editing after a look.
#
# Usage: scripts/sandbox_sensitivity.sh [--dry-run] [--help] [HYDRA_OVERRIDE ...]
#   --dry-run         list the trials, one per line on stdout (totals on stderr); launch nothing
#   HYDRA_OVERRIDE    added to every trial, e.g. logger=none num_workers=0, paths.cache_dir=...
# Environment (space-separated lists):
#   DENSITIES  SO's optimizer.density, default: "5e-4 5e-3 5e-2 2e-1"
#   RANKS      LoRA's method.rank, default: "1 2 4 8"
#   DATASETS   default: "synthetic_compositions synthetic_shift"
#   SHOTS      default: "1 4"
#   SEEDS      default: "1 2 3"
#   NAME       folder for the grid points, default: sandbox_sensitivity
#   PYTHON     interpreter, default: python
source "$(dirname "$0")/_sweep.sh"

DENSITIES="${DENSITIES:-5e-4 5e-3 5e-2 2e-1}"
RANKS="${RANKS:-1 2 4 8}"
DATASETS="${DATASETS:-synthetic_compositions synthetic_shift}"
SHOTS="${SHOTS:-1 4}"
SEEDS="${SEEDS:-1 2 3}"
NAME="${NAME:-sandbox_sensitivity}"
parse_args "$@"

STUDY=(model=tiny_pretrained max_iters=300 stop_loss=null eval_every=25)  # the sandbox table's budget
pretrain_sandbox
for density in $DENSITIES; do
  sweep "$NAME/so_density$density" "$DATASETS" so "$SHOTS" "$SEEDS" "optimizer.density=$density" "${STUDY[@]}"
done
for rank in $RANKS; do
  sweep "$NAME/lora_rank$rank" "$DATASETS" lora "$SHOTS" "$SEEDS" "method.rank=$rank" "${STUDY[@]}"
done
aggregate_results "$NAME"
finish
