#!/usr/bin/env bash
# Raw stores that give way to float16 where a grid is too coarse (dzip.GRID_TOLERANCE):
# kern3f's trained model (kernel-aware pruning, BatchNorm scales with outliers up to 290x
# the median) encoded with --raw-dtype int8 and with float16, each decoded file
# evaluated; kern3's own file (int8 everywhere, before the rule) is in results/kern3-s0.
# Needs runs/kern3f-s0 (experiments/regenerate.sh). Writes results/levers/grid-tolerance.txt.
#   bash experiments/grid_tolerance.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=results/levers/grid-tolerance.txt
mkdir -p runs/levers results/levers
: > $OUT
for raw in int8 float16; do
  f=runs/levers/kern3f-$raw.dzip
  {
    echo "\$ deepzip encode runs/kern3f-s0/quantize/model.pt -o $f --raw-dtype $raw --codebook-dtype int8"
    deepzip encode runs/kern3f-s0/quantize/model.pt -o $f --raw-dtype $raw --codebook-dtype int8 \
      | grep -E '^(file:|other)'
    echo "\$ deepzip eval $f --data-dir $DATA"
    deepzip eval $f --data-dir "$DATA"
  } | tee -a $OUT
done
