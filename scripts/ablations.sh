#!/usr/bin/env bash
# The SO ablations (the paper's Tables 3 and 4), row for row: each variant changes one switch of the SO
# rule (so/rule.py), or is dense Adam, and is one Hydra multirun over datasets x shots x seeds, written
# under outputs/ablations/<variant>/ so that `python scripts/aggregate.py outputs/ablations` gives one
# row per variant, beside the paper's figure (scripts/paper_results.csv). Variants, as the paper's rows:
#   adam            dense gradient + dense momentum: method=adam on the same weights
#   moment_dense    sparse gradient + dense momentum: optimizer.moment_selection=dense
#   so              SO: random gradient + top-k (importance) momentum, dynamic support, momentum
#   grad_topk       importance gradient + importance momentum: optimizer.grad_selection=topk
#   moment_random   random gradient + random momentum: optimizer.moment_selection=random
#   support_static  static support set, drawn once: optimizer.support=static
#   no_momentum     no momentum: optimizer.momentum=false
# The paper's ablation averages (SO: 74.6 at 1 shot) differ from its main table's (73.8), so they may
# come from a subset of the datasets: DATASETS chooses it.
#
# Usage: scripts/ablations.sh [--dry-run] [--help] [HYDRA_OVERRIDE ...]
#   --dry-run         list the trials, one per line on stdout (totals on stderr); launch nothing
#   HYDRA_OVERRIDE    added to every trial, e.g. hydra/launcher=slurm, optimizer.density=5e-5
# Environment (space-separated lists):
#   DATA      data root holding the benchmark folders (DATASETS.md), or pass paths.data_root=...
#   VARIANTS  default: all seven above
#   DATASETS  default: the 11 benchmarks
#   SHOTS     default: "1 4" (the shots the ablation tables report)
#   SEEDS     default: "1 2 3"
#   NAME      folder for the variants, default: ablations (trials go to NAME/<variant>)
#   PYTHON    interpreter, default: python
source "$(dirname "$0")/_sweep.sh"

declare -A SWITCHES=(
  [adam]=""
  [so]=""
  [grad_topk]="optimizer.grad_selection=topk"
  [moment_random]="optimizer.moment_selection=random"
  [moment_dense]="optimizer.moment_selection=dense"
  [support_static]="optimizer.support=static"
  [no_momentum]="optimizer.momentum=false"
)
ALL_VARIANTS="adam moment_dense so grad_topk moment_random support_static no_momentum"
VARIANTS="${VARIANTS:-$ALL_VARIANTS}"
DATASETS="${DATASETS:-$(benchmarks)}"
SHOTS="${SHOTS:-1 4}"
SEEDS="${SEEDS:-1 2 3}"
NAME="${NAME:-ablations}"
parse_args "$@"

for variant in $VARIANTS; do
  if [[ ! -v "SWITCHES[$variant]" ]]; then
    echo "ablations.sh: unknown variant '$variant' in VARIANTS (expected some of: $ALL_VARIANTS)" >&2
    exit 2
  fi
done
for variant in $VARIANTS; do
  method=so; [[ $variant == adam ]] && method=adam
  # shellcheck disable=SC2086  # the switches are words on purpose
  sweep "$NAME/$variant" "$DATASETS" "$method" "$SHOTS" "$SEEDS" ${SWITCHES[$variant]}
done
finish
