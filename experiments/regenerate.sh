#!/usr/bin/env bash
# Remakes every piece of evidence the README and docs cite, in order, on this machine:
# results/ and the assignment example's results (examples/assignment/results/).
#   bash experiments/regenerate.sh [DATA_DIR]        (default ../shared/data)
# Every step resumes: rerunning skips finished work. The ResNet-20 baseline ships with
# deepzip (how it was trained: results/baseline/README.md); the LeNet baselines are
# trained here. Long: about a day on a 2-core CPU, most of it the ResNet-20 pipelines.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
mkdir -p results/bench results/export

record() {  # record FILE CMD...: run CMD, append the command and its output to FILE
  local file=$1; shift
  { echo "\$ $*"; "$@"; } 2>&1 | grep -v -e '^\s*$' -e '^W[0-9]\{4\} ' | tee -a "$file"
}
publish() {  # publish RUN [DEST]: a pipeline run's report and .dzip file, into DEST
  local dest=${2:-results/$1}
  mkdir -p "$dest"
  cp "runs/$1"/{report.md,report.json,layers.png,recipe.yaml,command.txt,model.dzip} "$dest/"
}

# Benchmarks, each against a named alternative in the same run.
rm -f results/bench/{train_throughput,mask_overhead,kmeans,huffman,fuzz}.txt
record results/bench/train_throughput.txt python bench/train_throughput.py --data-dir "$DATA" --compile
record results/bench/mask_overhead.txt python bench/mask_overhead.py --data-dir "$DATA"
record results/bench/kmeans.txt python bench/kmeans.py
record results/bench/huffman.txt python bench/huffman.py
record results/bench/fuzz.txt python bench/fuzz.py
record results/bench/fuzz.txt python bench/fuzz.py --only outputs --data-dir "$DATA"
python bench/c_reader.py --out results/bench/c-reader.txt
python bench/scale.py --models vgg16,gpt2,vit-b16,decoder-1.1b --out results/bench/scale.md
python bench/scale.py --masked --out results/bench/masks.md
python bench/scale.py --io --out results/bench/io.md

# ResNet-20 on CIFAR-10. The default recipe (max_loss 1 with a margin of two paired
# standard errors) on the shipped ResNet-20, two seeds: 5,000 test images decide, the other
# 5,000 report.
deepzip run default --seed 0 --data-dir "$DATA" --out runs/default && publish default
deepzip run default --seed 1 --data-dir "$DATA" --out runs/default-seed1 && publish default-seed1
# An ablation, not adopted: sharing calibrated for each layer's outputs, on copies of the
# two runs above (results/default-calibrated/README.md; seed 1 was stopped early there).
for s in 0 1; do
  [ -d runs/cal-s$s ] || cp -r runs/default$([ $s = 1 ] && echo -seed1) runs/cal-s$s
  deepzip run results/default-calibrated/recipe.yaml --seed $s --data-dir "$DATA" --out runs/cal-s$s
done
# An ablation, not adopted: the 50% step not retrained, its epochs moved to 80-90%.
deepzip run experiments/recipes/default-late.yaml --seed 0 --data-dir "$DATA" \
  --out runs/default-late && publish default-late
# An ablation, not adopted: five pruning steps (the default of commit f1ef573), seed 0.
git show f1ef573:src/deepzip/recipes/default.yaml > runs/default-5steps.yaml
deepzip run runs/default-5steps.yaml --seed 0 --data-dir "$DATA" --out runs/default-5steps \
  && publish default-5steps
# The agp90 and small recipes, two seeds each; small shares agp90's pruned models (the
# same pruning settings), so only its sharing runs.
deepzip run agp90 --seed 0 --data-dir "$DATA" --out runs/agp90 && publish agp90
deepzip run agp90 --seed 1 --data-dir "$DATA" --out runs/agp90-seed1 && publish agp90-seed1
for seed in 0 1; do
  out=runs/small; src=runs/agp90
  [ $seed = 1 ] && out=runs/small-seed1 && src=runs/agp90-seed1
  [ -f $out/state.json ] || { mkdir -p $out && cp -r $src/prune $src/state.json $out/; }
  deepzip run small --seed $seed --data-dir "$DATA" --out $out
done
publish small && publish small-seed1
deepzip run share-5bit --data-dir "$DATA" --out runs/share-5bit && publish share-5bit

# Deep Compression's Table 1 on MNIST: the LeNet baselines, then their pipelines.
deepzip train --model lenet300 --task mnist --epochs 60 --lr 0.05 --weight-decay 0.0005 \
  --precision fp32 --data-dir "$DATA" --out runs/lenet300-baseline
python experiments/ship_baseline.py runs/lenet300-baseline --data-dir "$DATA"
deepzip train --model lenet5 --task mnist --epochs 40 --lr 0.02 --warmup-epochs 1 \
  --weight-decay 0.0005 --precision fp32 --data-dir "$DATA" --out runs/lenet5-baseline
python experiments/ship_baseline.py runs/lenet5-baseline --data-dir "$DATA"
deepzip run lenet300 --data-dir "$DATA" --out runs/lenet300 && publish lenet300
deepzip run lenet5 --data-dir "$DATA" --out runs/lenet5 && publish lenet5

# Deciding on held-out data: baselines trained without the images --validation 5000 holds
# out (not shipped), and the accuracy budget on LeNet-300-100.
deepzip train --model resnet20 --epochs 50 --seed 1 --validation 5000 --data-dir "$DATA" \
  --out runs/resnet20-val-s1
python experiments/ship_baseline.py runs/resnet20-val-s1 --data-dir "$DATA" \
  --not-shipped baseline-val-s1
deepzip train --model resnet32 --epochs 30 --seed 0 --validation 5000 --data-dir "$DATA" \
  --out runs/resnet32-val
python experiments/ship_baseline.py runs/resnet32-val --data-dir "$DATA" \
  --not-shipped baseline-resnet32-val
deepzip train --model lenet300 --task mnist --epochs 60 --lr 0.05 --weight-decay 0.0005 \
  --precision fp32 --validation 5000 --data-dir "$DATA" --out runs/lenet300-val
python experiments/ship_baseline.py runs/lenet300-val --data-dir "$DATA" \
  --not-shipped baseline-lenet300-val
deepzip run experiments/recipes/lenet300-budget.yaml --model results/baseline-lenet300-val/model.pt \
  --data-dir "$DATA" --out runs/lenet300-budget && publish lenet300-budget
deepzip run experiments/recipes/lenet300-search.yaml --model results/baseline-lenet300-val/model.pt \
  --data-dir "$DATA" --out runs/lenet300-search && publish lenet300-search
deepzip run experiments/recipes/lenet300-search.yaml --validation-from test --data-dir "$DATA" \
  --out runs/lenet300-search-test && publish lenet300-search-test
deepzip run experiments/recipes/lenet300-search.yaml --validation-from test --margin-se 1 \
  --data-dir "$DATA" --out runs/lenet300-search-margin && publish lenet300-search-margin
# The default recipe on a ResNet-20 and a ResNet-32 trained without the 5,000 images it
# decides on: the whole test set reports.
deepzip run default --model results/baseline-val-s1/model.pt --validation-from train \
  --data-dir "$DATA" --out runs/default-val-s1 && publish default-val-s1
deepzip run default --model results/baseline-resnet32-val/model.pt --validation-from train \
  --data-dir "$DATA" --out runs/default-resnet32 && publish default-resnet32
python experiments/split_noise.py resnet20 results/agp90/model.dzip \
  results/agp90-seed1/model.dzip results/small/model.dzip results/small-seed1/model.dzip \
  --data-dir "$DATA" --out results/ablations/split-noise.txt

# Deployment: ONNX against the in-memory model on the full test sets.
rm -f results/export/onnx.txt
record results/export/onnx.txt deepzip export results/agp90/model.dzip -o runs/agp90.onnx \
  --data-dir "$DATA"
record results/export/onnx.txt deepzip export results/lenet5/model.dzip -o runs/lenet5.onnx \
  --data-dir "$DATA"
# Pruning without retraining: magnitude, Wanda, SparseGPT, BatchNorm re-estimated; the
# posttrain recipe.
python experiments/oneshot.py resnet20 --data-dir "$DATA" --out results/oneshot/resnet20.md
deepzip run posttrain --data-dir "$DATA" --out runs/posttrain && publish posttrain
# Does a one-shot start need fewer epochs of retraining than the default's steps?
# (results/oneshot/retrain.md: each run's report.md; the steps75 arms are the default's
# steps to 75% in 7 epochs instead of 10, by SparseGPT and by magnitude.)
for r in oneshot75-sparsegpt oneshot75-global oneshot85-sparsegpt oneshot85-global \
    oneshot75-sparsegpt-7 oneshot75-global-7 steps75-sparsegpt steps75-global; do
  deepzip run experiments/recipes/$r.yaml --data-dir "$DATA" --out runs/$r
done
# A real language model (examples/stdlib_lm.py: the standard library, split by file):
# magnitude, Wanda and SparseGPT one shot and after a short retraining, then 4-bit
# sharing; the posttrain recipe on it, under a relative budget (1% of its perplexity).
python examples/stdlib_lm.py --out runs/stdlib-lm/model.pt
python experiments/posttrain_lm.py runs/stdlib-lm/model.pt --retrain 2000 \
  --out results/posttrain/stdlib-lm.md
(cd examples && deepzip run posttrain --model ../runs/stdlib-lm/model.pt \
  --arch stdlib_lm:StdlibGPT --task stdlib_lm:make_task --out ../runs/posttrain-lm) \
  && publish posttrain-lm
# The packed export against the fp32 one: sizes, session creation, latency, outputs.
python bench/onnx_export.py results/agp90/model.dzip results/lenet5/model.dzip \
  --data-dir "$DATA" --out results/export/packed-onnx.md

# The assignment, reproduced: Labs 1-3 and Lab 4's pipeline (recipe seed).
A=examples/assignment
deepzip run seed --data-dir "$DATA" --out runs/seed && publish seed $A/results/seed
python $A/lab1_prune.py --data-dir "$DATA"
python $A/lab2_retrain.py --data-dir "$DATA"
python $A/lab3_quantize.py --data-dir "$DATA" --pruned runs/seed/prune/model.pt --epochs 1

# Accuracy against real compression, every ResNet-20 run reported on the full test set.
deepzip pareto results/share-5bit $A/results/seed results/agp90 results/agp90-seed1 \
  results/small results/small-seed1 -o results/pareto.png | tee results/pareto.md

# What each lever buys (docs/results.md).
bash experiments/ablations.sh "$DATA"
