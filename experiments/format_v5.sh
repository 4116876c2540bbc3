#!/usr/bin/env bash
# Format version 5 on trained files: the default's two .dzip files (format v4, seeds 0
# and 1) re-encoded by this deepzip (header deflated against the preset dictionary, the
# kernel layout where smaller) with float16 codebooks (lossless: the same weights) and
# with int8 grid codebooks (rounded: the decoded models evaluated). Writes
# results/levers/format-v5.txt.
#   bash experiments/format_v5.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=results/levers/format-v5.txt
mkdir -p runs/levers results/levers
: > $OUT
for run in default default-seed1; do
  {
    echo "\$ deepzip inspect results/$run/model.dzip  (format v4)"
    deepzip inspect results/$run/model.dzip | grep '^file:'
  } | tee -a $OUT
  for book in float16 int8; do
    f=runs/levers/$run-v5-$book.dzip
    {
      echo "\$ deepzip encode results/$run/model.dzip -o $f --codebook-dtype $book --raw-dtype int8"
      deepzip encode results/$run/model.dzip -o $f --codebook-dtype $book --raw-dtype int8 \
        | grep '^file:'
      echo "\$ deepzip eval $f --data-dir $DATA"
      deepzip eval $f --data-dir "$DATA"
    } | tee -a $OUT
  done
done
