#!/usr/bin/env bash
# Regenerates everything in results/ from the shipped baseline, in order, on this machine.
#   bash experiments/regenerate.sh [DATA_DIR]        (default ../shared/data)
# Each step is resumable: rerunning skips finished work. Benchmarks are recorded with the
# command that made them.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
mkdir -p results/bench

record() {  # record FILE CMD...: run CMD, append the command and its output to FILE
  local file=$1; shift
  { echo "\$ $*"; "$@"; } 2>&1 | grep -v '^\s*$' | tee -a "$file"
}

rm -f results/bench/*.txt
record results/bench/train_throughput.txt python bench/train_throughput.py --data-dir "$DATA"
record results/bench/mask_overhead.txt python bench/mask_overhead.py --data-dir "$DATA"
record results/bench/kmeans.txt python bench/kmeans.py
record results/bench/huffman.txt python bench/huffman.py

# The shipped baseline at 5 bits (no pruning): Huffman length, both ratios, and the decoded
# file's accuracy against the in-memory model's.
Q5=results/resnet20-5bit; mkdir -p $Q5; rm -f $Q5/*
deepzip quantize resnet20 --bits 5 --data-dir "$DATA" -o runs/q5
cp runs/q5/quantize.json $Q5/
record $Q5/log.txt deepzip eval runs/q5/model.pt --data-dir "$DATA"
record $Q5/log.txt deepzip encode runs/q5/model.pt -o $Q5/lossless.dzip --raw-dtype float32 --no-fold-batchnorm
record $Q5/log.txt deepzip eval $Q5/lossless.dzip --data-dir "$DATA"
record $Q5/log.txt deepzip encode runs/q5/model.pt -o $Q5/compact.dzip
record $Q5/log.txt deepzip eval $Q5/compact.dzip --data-dir "$DATA"
record $Q5/log.txt deepzip inspect $Q5/compact.dzip
python experiments/lab1_prune.py --data-dir "$DATA"
publish() {  # publish RUN: copy a pipeline run's report and .dzip file into results/
  mkdir -p "results/$1"
  cp "runs/$1"/{report.md,report.json,layers.png,recipe.yaml,command.txt,model.dzip} "results/$1/"
}

deepzip run seed --data-dir "$DATA" --out runs/seed && publish seed
python experiments/lab3_quantize.py --data-dir "$DATA" --pruned runs/seed/prune/model.pt --epochs 1
python experiments/lab2_retrain.py --data-dir "$DATA"
deepzip run default --data-dir "$DATA" --out runs/default && publish default
# A second seed of the default: run-to-run variation (issue #13 asks for the mean of two).
deepzip run default --seed 1 --data-dir "$DATA" --out runs/default-seed1 && publish default-seed1
# The levers of issue #13, measured on the default's pruned model (no training).
python experiments/levers.py runs/default-seed1/prune/model.pt --data-dir "$DATA" \
  --out results/levers/default-seed1-pruned.txt
# small: the default's pruned models (the same pruning settings) shared to issue #13's size.
for seed in 0 1; do
  out=runs/small; src=runs/default
  [ $seed = 1 ] && out=runs/small-seed1 && src=runs/default-seed1
  [ -f $out/state.json ] || { mkdir -p $out && cp -r $src/prune $src/state.json $out/; }
  deepzip run small --seed $seed --data-dir "$DATA" --out $out
done
publish small && publish small-seed1
# Issue #13 experiments. Format v5 re-encoding the default's files; sharing variants that
# resume from the default's pruned model (seed 0: its prune stage copied into a fresh
# folder, so only quantize, encode and verify run); kernel-aware pruning from scratch.
bash experiments/format_v5.sh "$DATA"
from_pruned() {  # from_pruned RECIPE SEED: the default's pruned model of that seed, resharing
  local src=runs/default; [ "$2" = 1 ] && src=runs/default-seed1
  if [ ! -f "runs/$1-s$2/state.json" ]; then
    mkdir -p "runs/$1-s$2" && cp -r $src/prune $src/state.json "runs/$1-s$2/"
  fi
  deepzip run "experiments/recipes/$1.yaml" --seed "$2" --data-dir "$DATA" --out "runs/$1-s$2"
}
for r in q320 qat320 qat500 qat80 qatlong320 budP budF defF; do from_pruned $r 0; done
from_pruned budF 1 && from_pruned defF 1
publish defF-s0 && publish defF-s1
bash experiments/sharing_v5.sh "$DATA"
bash experiments/qat_budget.sh "$DATA"
deepzip run experiments/recipes/kern3.yaml --data-dir "$DATA" --out runs/kern3-s0 \
  && publish kern3-s0
if [ ! -f runs/kern3f-s0/state.json ]; then  # kern3's pruned model, BatchNorm in float16
  mkdir -p runs/kern3f-s0 && cp -r runs/kern3-s0/prune runs/kern3-s0/state.json runs/kern3f-s0/
fi
deepzip run experiments/recipes/kern3f.yaml --data-dir "$DATA" --out runs/kern3f-s0 \
  && publish kern3f-s0
# The bits axis from the default's pruned model, and weight sharing alone from the baseline.
deepzip run share-3bit --model runs/default/prune/model.pt --reference resnet20 \
  --data-dir "$DATA" --out runs/default-3bit && publish default-3bit
deepzip run share-5bit --model runs/default/prune/model.pt --reference resnet20 \
  --data-dir "$DATA" --out runs/default-5bit && publish default-5bit
deepzip run share-5bit --data-dir "$DATA" --out runs/share-5bit && publish share-5bit
# results/previous-*: the default and small recipes until issue #13, kept as made (see
# their README.md); default-3bit and default-5bit start from the default's pruned model.
RUNS="runs/share-5bit runs/seed runs/default-5bit results/previous-default runs/default-3bit
      results/previous-small runs/default runs/default-seed1 results/small92 runs/kern3f-s0
      runs/defF-s0 runs/defF-s1 runs/small runs/small-seed1"
deepzip pareto $RUNS -o results/pareto.png | tee results/pareto.md

# Deep Compression's Table 1 on MNIST: the LeNet baselines (trained here, then shipped),
# and their pipelines.
deepzip train --model lenet300 --task mnist --epochs 60 --lr 0.05 --weight-decay 0.0005 \
  --precision fp32 --data-dir "$DATA" --out runs/lenet300-baseline
python experiments/ship_baseline.py runs/lenet300-baseline --data-dir "$DATA"
deepzip train --model lenet5 --task mnist --epochs 40 --lr 0.02 --warmup-epochs 1 \
  --weight-decay 0.0005 --precision fp32 --data-dir "$DATA" --out runs/lenet5-baseline
python experiments/ship_baseline.py runs/lenet5-baseline --data-dir "$DATA"
deepzip run lenet300 --data-dir "$DATA" --out runs/lenet300 && publish lenet300
deepzip run lenet5 --data-dir "$DATA" --out runs/lenet5 && publish lenet5
