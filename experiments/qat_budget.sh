#!/usr/bin/env bash
# Issue #13's quantization-aware training and size-budget runs (experiments/recipes/qat80,
# qat320, qatlong320, budF, budP, defF; run into runs/NAME-sSEED by experiments/regenerate.sh from
# the default's pruned models): each run's file as written and its decoded accuracy.
# Writes results/levers/qat-budget.txt.
#   bash experiments/qat_budget.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=results/levers/qat-budget.txt
mkdir -p results/levers
: > $OUT
for run in qat80-s0 qat320-s0 qatlong320-s0 budP-s0 budF-s0 budF-s1 defF-s0 defF-s1; do
  [ -f runs/$run/model.dzip ] || continue
  {
    echo "\$ deepzip inspect runs/$run/model.dzip  ($(grep -m1 '^name:' runs/$run/recipe.yaml))"
    deepzip inspect runs/$run/model.dzip | grep -E '^(file:|real|assignment)'
    echo "\$ deepzip eval runs/$run/model.dzip --data-dir $DATA"
    deepzip eval runs/$run/model.dzip --data-dir "$DATA"
  } | tee -a $OUT
done
