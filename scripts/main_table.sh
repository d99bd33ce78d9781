#!/usr/bin/env bash
# The paper's main table: every dataset x shots x seeds for each trained method, plus zero-shot CLIP
# once per dataset (it trains nothing, so shots and seed do not change it; aggregate.py uses it for every
# shot count). One Hydra multirun per group, results under outputs/NAME/. PROTOCOL picks the protocol
# preset (configs/protocol/) and, with it, the default methods and NAME:
#   paper         what the paper's text says: so relora lora galore adam zeroshot, NAME main_table
#   official_so   the released SO code's runs: so_reference_cli zeroshot, NAME main_table_official_so
#   clip_lora     CLIP-LoRA's runs, for the LoRA row: lora, NAME main_table_clip_lora
#
# Usage: scripts/main_table.sh [--dry-run] [--help] [HYDRA_OVERRIDE ...]
#   --dry-run         list the trials, one per line on stdout (totals on stderr); launch nothing
#   HYDRA_OVERRIDE    added to every trial, e.g. hydra/launcher=slurm hydra.launcher.partition=gpu,
#                     hydra/launcher=parallel (NUM_GPUS=4), max_iters=500, model.pretrained=/path/ViT-B-16.pt
# Environment (space-separated lists):
#   DATA      data root holding the benchmark folders (DATASETS.md), or pass paths.data_root=...
#   PROTOCOL  paper (default) | official_so | clip_lora
#   DATASETS  default: the 11 benchmarks
#   METHODS   default: the PROTOCOL's (zeroshot: once per dataset, at the first SHOTS and SEEDS); the word
#             baselines stands for the field's table: coop coop4 cocoop kgcoop clip_adapter tip_adapter
#             tip_adapter_f taskres lp clap, each with its authors' schedule (README, The field's baselines:
#             not in the default list, CoOp's and CoCoOp's text-tower passes alone outweigh the paper's methods)
#   SHOTS     default: "1 2 4 8 16"
#   SEEDS     default: "1 2 3"
#   NAME      experiment name, default: the PROTOCOL's
#   PYTHON    interpreter, default: python
source "$(dirname "$0")/_sweep.sh"

PROTOCOL="${PROTOCOL:-paper}"
declare -A PROTOCOL_METHODS=([paper]="so relora lora galore adam zeroshot" [official_so]="so_reference_cli zeroshot"
                             [clip_lora]="lora")
if [[ ! -v "PROTOCOL_METHODS[$PROTOCOL]" ]]; then
  echo "main_table.sh: unknown PROTOCOL '$PROTOCOL' (expected one of: ${!PROTOCOL_METHODS[*]})" >&2
  exit 2
fi
DATASETS="${DATASETS:-$(benchmarks)}"
METHODS="${METHODS:-${PROTOCOL_METHODS[$PROTOCOL]}}"
METHODS="${METHODS//baselines/$BASELINES}"
SHOTS="${SHOTS:-1 2 4 8 16}"
SEEDS="${SEEDS:-1 2 3}"
if [[ $PROTOCOL == paper ]]; then fixed=(); NAME="${NAME:-main_table}"
else fixed=("protocol=$PROTOCOL"); NAME="${NAME:-main_table_$PROTOCOL}"; fi
parse_args "$@"

table "$NAME" "$DATASETS" "$METHODS" "$SHOTS" "$SEEDS" "${fixed[@]}"
finish
