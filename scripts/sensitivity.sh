#!/usr/bin/env bash
# SO's sensitivity to its two hyperparameters: a density x refresh_every grid on a few datasets.
# Each grid point is one Hydra multirun over datasets x shots x seeds, written under
# outputs/sensitivity/density<D>_refresh<T>/, so that `python scripts/aggregate.py outputs/sensitivity`
# gives one row per grid point.
#
# Usage: scripts/sensitivity.sh [--dry-run] [--help] [HYDRA_OVERRIDE ...]
#   --dry-run         list the trials, one per line on stdout (totals on stderr); launch nothing
#   HYDRA_OVERRIDE    added to every trial, e.g. hydra/launcher=slurm, max_iters=1000
# Environment (space-separated lists):
#   DATA           data root holding the benchmark folders (DATASETS.md), or pass paths.data_root=...
#   DENSITIES      optimizer.density values, default: "1e-5 5e-5 1e-4 5e-4 1e-3"
#   REFRESH_EVERY  optimizer.refresh_every values, default: "1 5 10 20 50"
#   DATASETS       default: "dtd eurosat oxford_pets"
#   SHOTS          default: "4"
#   SEEDS          default: "1 2 3"
#   METHOD         the SO config to vary, default: so
#   NAME           folder for the grid points, default: sensitivity
#   PYTHON         interpreter, default: python
source "$(dirname "$0")/_sweep.sh"

DENSITIES="${DENSITIES:-1e-5 5e-5 1e-4 5e-4 1e-3}"
REFRESH_EVERY="${REFRESH_EVERY:-1 5 10 20 50}"
DATASETS="${DATASETS:-dtd eurosat oxford_pets}"
SHOTS="${SHOTS:-4}"
SEEDS="${SEEDS:-1 2 3}"
METHOD="${METHOD:-so}"
NAME="${NAME:-sensitivity}"
parse_args "$@"

for density in $DENSITIES; do
  for refresh_every in $REFRESH_EVERY; do
    sweep "$NAME/density${density}_refresh${refresh_every}" "$DATASETS" "$METHOD" "$SHOTS" "$SEEDS" \
      "optimizer.density=$density" "optimizer.refresh_every=$refresh_every"
  done
done
finish
