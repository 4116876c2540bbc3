#!/usr/bin/env bash
# The ablations behind docs/results.md: what each lever of the agp90 and small recipes
# buys, measured on agp90's pruned ResNet-20s (runs/agp90 and runs/agp90-seed1, which
# experiments/regenerate.sh makes first). Writes results/ablations/*.txt; each run is
# resumable, so rerunning skips finished work.
#   bash experiments/ablations.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=results/ablations
mkdir -p runs/levers $OUT

from_pruned() {  # from_pruned RECIPE SEED: reshare agp90's pruned model of that seed
  local src=runs/agp90; [ "$2" = 1 ] && src=runs/agp90-seed1
  if [ ! -f "runs/$1-s$2/state.json" ]; then
    mkdir -p "runs/$1-s$2" && cp -r $src/prune $src/state.json "runs/$1-s$2/"
  fi
  deepzip run "experiments/recipes/$1.yaml" --seed "$2" --data-dir "$DATA" --out "runs/$1-s$2"
}

encode_and_eval() {  # encode_and_eval CHECKPOINT FILE GREP ARGS...: bytes, then accuracy
  local src=$1 f=$2 pattern=$3; shift 3
  echo "\$ deepzip encode $src -o $f $*"
  deepzip encode "$src" -o "$f" "$@" | grep -E "$pattern"
  echo "\$ deepzip eval $f --data-dir $DATA"
  deepzip eval "$f" --data-dir "$DATA"
}

# 1. Clustering and position codes on agp90's pruned models, no training.
python experiments/levers.py runs/agp90-seed1/prune/model.pt --data-dir "$DATA" \
  --out $OUT/agp90-seed1-pruned.txt
python experiments/levers.py runs/agp90/prune/model.pt --data-dir "$DATA" --tables 3 \
  --out $OUT/sensitivity.txt
# The position codes on the default's committed files (is there structure left to code?).
for r in default default-seed1; do
  python experiments/levers.py results/$r/model.dzip --data-dir "$DATA" --tables 2 \
    --out $OUT/positions-$r.txt
done

# 2. Sharing variants from agp90's pruned models (only quantize, encode, verify run).
for r in q320 qat320 qat500 qat80 qatlong320 budP budF defF; do from_pruned $r 0; done
from_pruned budF 1 && from_pruned defF 1
{
  for rb in q320:float16 qat320:int8 qat500:int8; do
    r=${rb%%:*}; book=${rb##*:}
    encode_and_eval runs/$r-s0/quantize/model.pt runs/levers/$r-v5.dzip '^file:' \
      --codebook-dtype "$book" --raw-dtype int8
  done
} | tee $OUT/sharing-v5.txt
{
  for run in qat80-s0 qat320-s0 qatlong320-s0 budP-s0 budF-s0 budF-s1 defF-s0 defF-s1; do
    echo "\$ deepzip inspect runs/$run/model.dzip  ($(grep -m1 '^name:' runs/$run/recipe.yaml))"
    deepzip inspect runs/$run/model.dzip | grep -E '^(file:|real|assignment)'
    echo "\$ deepzip eval runs/$run/model.dzip --data-dir $DATA"
    deepzip eval runs/$run/model.dzip --data-dir "$DATA"
  done
} | tee $OUT/qat-budget.txt

# 3. Kernel-aware pruning from the baseline, then its BatchNorm on a grid or in float16.
deepzip run experiments/recipes/kern3.yaml --data-dir "$DATA" --out runs/kern3-s0
if [ ! -f runs/kern3f-s0/state.json ]; then  # kern3's pruned model, BatchNorm in float16
  mkdir -p runs/kern3f-s0 && cp -r runs/kern3-s0/prune runs/kern3-s0/state.json runs/kern3f-s0/
fi
deepzip run experiments/recipes/kern3f.yaml --data-dir "$DATA" --out runs/kern3f-s0
{
  for raw in int8 float16; do
    encode_and_eval runs/kern3f-s0/quantize/model.pt runs/levers/kern3f-$raw.dzip \
      '^(file:|other)' --raw-dtype "$raw" --codebook-dtype int8
  done
} | tee $OUT/grid-tolerance.txt

# 4. Short probes of agp90's gradual schedule (4 of its 40 epochs) on the data a budget
# decides on: their losses, against the full stage's in results/agp90. The run
# is stopped once the search has logged them (the full stage after it is not needed).
{
  echo "\$ deepzip run experiments/recipes/agp-probes.yaml --data-dir $DATA --out runs/agp-probes"
  rm -rf runs/agp-probes
  deepzip run experiments/recipes/agp-probes.yaml --data-dir "$DATA" --out runs/agp-probes \
    2>&1 | grep --line-buffered -E "^\[baseline\]|^\[prune\] (searching|probe|no probe|gradual)|epoch 4/4" \
    | sed '/gradual pruning to/q' || true
} | tee $OUT/agp-probes.txt
