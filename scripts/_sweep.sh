# Shared by the sweep scripts (sourced, not run): argument handling, the trial listing of --dry-run and
# the Hydra multirun launch. A method may be METHOD+OPTIMIZER (lora+so: SO on LoRA's factors). A script sets its defaults, calls `parse_args "$@"`, then calls
# `sweep NAME DATASETS METHODS SHOTS SEEDS [METHOD_OVERRIDE ...]` once per multirun (or `table`, the same
# arguments, for a table with zero-shot once per dataset) and `finish` at the end;
# the sandbox sweeps call `pretrain_sandbox` first and `aggregate_results NAME` last.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DRY_RUN=0
OVERRIDES=()   # extra Hydra overrides for every trial (launcher, max_iters, ...)
TRIALS=0
FAILED=()

# The field's comparison table (configs/method/): what the word baselines stands for in METHODS.
BASELINES="coop coop4 cocoop kgcoop clip_adapter tip_adapter tip_adapter_f taskres lp clap"

benchmarks() {  # the 11 benchmarks, in the paper's order: the list every part reads (datasets/catalog.py)
  (cd "$ROOT" && "$PYTHON" -m datasets.catalog) || { echo "$(basename "$0"): cannot list the benchmarks with $PYTHON" >&2; exit 2; }
}

usage() {  # the header comment of the calling script
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

parse_args() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      -*) echo "$(basename "$0"): unknown option '$arg' (expected --dry-run, --help or Hydra overrides key=value)" >&2
          exit 2 ;;
      *=*) OVERRIDES+=("$arg") ;;
      *) echo "$(basename "$0"): '$arg' is not a Hydra override (expected key=value, e.g. hydra/launcher=slurm)" >&2
         exit 2 ;;
    esac
  done
  local data_root="${DATA:-<unset: pass paths.data_root=... or set DATA>}"
  for arg in "${OVERRIDES[@]}"; do [[ $arg == paths.data_root=* ]] && data_root="${arg#paths.data_root=}"; done
  echo "paths.data_root: $data_root" >&2
  if ((${#OVERRIDES[@]})); then echo "extra overrides for every trial: ${OVERRIDES[*]}" >&2; fi
}

join() { local IFS=,; echo "$*"; }

# sweep NAME "DATASETS" "METHODS" "SHOTS" "SEEDS" [METHOD_OVERRIDE ...]
# One Hydra multirun over the product DATASETS x METHODS x SHOTS x SEEDS (space-separated lists),
# written under ${paths.out_root}/NAME. --dry-run prints its trials instead, one per line, in launch order.
sweep() {
  local name="$1" dataset method shots seed n
  local -a datasets methods shot_list seeds fixed plain=()
  read -ra datasets <<<"$2"; read -ra methods <<<"$3"; read -ra shot_list <<<"$4"; read -ra seeds <<<"$5"
  fixed=("${@:6}")
  if [[ " $3" == *+* ]]; then  # METHOD+OPTIMIZER (lora+so): a multirun of its own, with optimizer=OPTIMIZER
    for method in "${methods[@]}"; do [[ $method == *+* ]] || plain+=("$method"); done
    if ((${#plain[@]})); then sweep "$1" "$2" "${plain[*]}" "$4" "$5" "${fixed[@]}"; fi
    for method in "${methods[@]}"; do
      if [[ $method == *+* ]]; then sweep "$1" "$2" "${method%%+*}" "$4" "$5" "optimizer=${method#*+}" "${fixed[@]}"; fi
    done
    return
  fi
  n=$((${#datasets[@]} * ${#methods[@]} * ${#shot_list[@]} * ${#seeds[@]}))
  TRIALS=$((TRIALS + n))
  if ((DRY_RUN)); then
    for dataset in "${datasets[@]}"; do for method in "${methods[@]}"; do
      for shots in "${shot_list[@]}"; do for seed in "${seeds[@]}"; do
        echo "name=$name dataset=$dataset method=$method${fixed[*]:+ ${fixed[*]}} shots=$shots seed=$seed"
      done; done
    done; done
    return
  fi
  local -a cmd=("$PYTHON" main.py -m "name=$name" "dataset=$(join "${datasets[@]}")"
                "method=$(join "${methods[@]}")" "${fixed[@]}" "shots=$(join "${shot_list[@]}")"
                "seed=$(join "${seeds[@]}")" "${OVERRIDES[@]}")
  echo "Launching $n trials: ${cmd[*]}" >&2
  (cd "$ROOT" && "${cmd[@]}") || FAILED+=("$name")
}

# table NAME "DATASETS" "METHODS" "SHOTS" "SEEDS" [OVERRIDE ...]
# A table's multiruns: zero-shot (when in METHODS) once per dataset at the first shots and seed, since it
# trains nothing; the other methods over the whole grid.
table() {
  local name="$1" datasets="$2" shots="$4" seeds="$5" method
  local -a shot_list seed_list trained=() fixed=("${@:6}")
  read -ra shot_list <<<"$shots"; read -ra seed_list <<<"$seeds"
  for method in $3; do [[ $method == zeroshot ]] || trained+=("$method"); done
  if [[ " $3 " == *" zeroshot "* ]]; then
    sweep "$name" "$datasets" zeroshot "${shot_list[0]}" "${seed_list[0]}" "${fixed[@]}"
  fi
  if ((${#trained[@]})); then
    sweep "$name" "$datasets" "${trained[*]}" "$shots" "$seeds" "${fixed[@]}"
  fi
}

override() {  # the value of key $1 among the overrides, or $2
  local arg value="$2"
  for arg in "${OVERRIDES[@]}"; do [[ $arg == "$1="* ]] && value="${arg#"$1="}"; done
  echo "$value"
}

pretrain_sandbox() {  # the sandbox model, built once before a sweep uses it (parallel launchers race)
  local cache_dir
  if ((!DRY_RUN)); then
    cache_dir="$(override paths.cache_dir "")"
    "$PYTHON" "$ROOT/scripts/pretrain_sandbox.py" ${cache_dir:+"paths.cache_dir=$cache_dir"}
  fi
}

aggregate_results() {  # aggregate.py on the sweep's output folder NAME
  local results
  if ((!DRY_RUN)); then
    results="$(override paths.out_root outputs)/$1"
    [[ $results == /* ]] || results="$ROOT/$results"
    "$PYTHON" "$ROOT/scripts/aggregate.py" "$results" || FAILED+=("aggregate")
  fi
}

finish() {
  echo "$TRIALS trials in all$( ((DRY_RUN)) && echo " (dry run: nothing launched)")." >&2
  if ((${#FAILED[@]})); then
    echo "Multiruns with failed trials: ${FAILED[*]}. Re-run the same command: finished trials are skipped." >&2
    exit 1
  fi
}
