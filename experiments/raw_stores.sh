#!/usr/bin/env bash
# BatchNorm scale/shift and biases on N-bit grids (encode.raw_dtype), measured on trained
# files: the previous default's two .dzip files (fp16, seeds 0 and 1) re-encoded with each
# store (shared weights unchanged) and the decoded models evaluated. Writes
# results/levers/raw-stores.txt.
#   bash experiments/raw_stores.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=results/levers/raw-stores.txt
mkdir -p runs/levers results/levers
: > $OUT
for run in previous-default previous-default-seed1; do
  for raw in float16 int8 int6; do
    f=runs/levers/$run-$raw.dzip
    {
      echo "\$ deepzip encode results/$run/model.dzip -o $f --codebook-dtype float16 --raw-dtype $raw"
      deepzip encode results/$run/model.dzip -o $f --codebook-dtype float16 --raw-dtype $raw \
        | grep '^file:'
      echo "\$ deepzip eval $f --data-dir $DATA"
      deepzip eval $f --data-dir "$DATA"
    } | tee -a $OUT
  done
done
