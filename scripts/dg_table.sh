#!/usr/bin/env bash
# The domain-generalization table (CoOp's protocol): each method trained on ImageNet (save=true), then
# that saved run evaluated on ImageNet-V2, -Sketch, -A and -R (eval_only=true trained_from=<the ImageNet
# run's folder>), one results.json per target; zero-shot CLIP on all five. Under outputs/NAME/;
# `python scripts/aggregate.py outputs/NAME` gives one column per dataset.
#
# Usage: scripts/dg_table.sh [--dry-run] [--help] [HYDRA_OVERRIDE ...]
#   --dry-run         list the trials, one per line on stdout (totals on stderr); launch nothing
#   HYDRA_OVERRIDE    added to every trial, e.g. hydra/launcher=slurm, model.pretrained=/path/ViT-B-16.pt
# Environment (space-separated lists):
#   DATA      data root holding imagenet/ and the target folders (DATASETS.md), or pass paths.data_root=...
#   TARGETS   default: "imagenet_v2 imagenet_sketch imagenet_a imagenet_r"
#   METHODS   default: "so relora lora galore adam zeroshot"
#   SHOTS     default: "16" (CoOp's setting)
#   SEEDS     default: "1 2 3"
#   NAME      experiment name, default: dg_table
#   PYTHON    interpreter, default: python
source "$(dirname "$0")/_sweep.sh"

TARGETS="${TARGETS:-imagenet_v2 imagenet_sketch imagenet_a imagenet_r}"
METHODS="${METHODS:-so relora lora galore adam zeroshot}"
SHOTS="${SHOTS:-16}"
SEEDS="${SEEDS:-1 2 3}"
NAME="${NAME:-dg_table}"
parse_args "$@"

trained="$(for method in $METHODS; do [[ $method == zeroshot ]] || echo "$method"; done | xargs)"
if [[ " $METHODS " == *" zeroshot "* ]]; then
  table "$NAME" "imagenet $TARGETS" zeroshot "$SHOTS" "$SEEDS"
fi
if [[ -n $trained ]]; then
  sweep "$NAME" imagenet "$trained" "$SHOTS" "$SEEDS" save=true
  # shellcheck disable=SC2016  # Hydra resolves the interpolation per trial
  sweep "$NAME" "$TARGETS" "$trained" "$SHOTS" "$SEEDS" eval_only=true \
    'trained_from=${paths.out_root}/${name}/imagenet/${method.label}/${shots}shot/seed${seed}'
fi
finish
