#!/usr/bin/env bash
# The beta-320/500 sharing experiments of issue #13 (experiments/recipes/q320.yaml,
# qat320.yaml, qat500.yaml, run into runs/NAME-s0 by experiments/regenerate.sh), their
# quantized models encoded in format v5 with the codebook store each was trained for,
# and the decoded files evaluated. Writes results/levers/sharing-v5.txt.
#   bash experiments/sharing_v5.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=results/levers/sharing-v5.txt
mkdir -p runs/levers results/levers
: > $OUT
for rb in q320:float16 qat320:int8 qat500:int8; do
  r=${rb%%:*}; book=${rb##*:}; f=runs/levers/$r-v5.dzip
  {
    echo "\$ deepzip encode runs/$r-s0/quantize/model.pt -o $f --codebook-dtype $book --raw-dtype int8"
    deepzip encode runs/$r-s0/quantize/model.pt -o $f --codebook-dtype $book --raw-dtype int8 \
      | grep '^file:'
    echo "\$ deepzip eval $f --data-dir $DATA"
    deepzip eval $f --data-dir "$DATA"
  } | tee -a $OUT
done
