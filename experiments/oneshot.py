"""Pruning without retraining: magnitude against Wanda and SparseGPT, one shot, on a trained
model.

    python experiments/oneshot.py resnet20 --data-dir ../shared/data \
        --out results/oneshot/resnet20.md

For each sparsity (or N:M pattern: 2:4 keeps 2 of every 4 weights of a row), the
shipped (or given) model is pruned once and evaluated, no retraining: magnitude per
layer (percentile), magnitude across layers (global), Wanda (|w| x the norm of its
input feature, per output row; Sun et al. 2023) and SparseGPT (per layer, the mask chosen
and the remaining weights updated to keep the layer's outputs; Frantar & Alistarh 2023,
deepzip.obs), the last two reading the --calibration images; each also with its BatchNorm
statistics re-estimated on them ("+BN": deepzip.train.recalibrate_batchnorm_, no weight
changes). Calibration images are the first ones of the training set, without
augmentation, so the test set is read only by the evaluations. Test accuracy in fp32 on
the whole test set.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from deepzip import stages
from deepzip.data import BatchLoader
from deepzip.loading import load_model
from deepzip.prune import PruneConfig, prune_
from deepzip.render import markdown_table
from deepzip.task import image_task
from deepzip.train import recalibrate_batchnorm_


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a shipped name, checkpoint or .dzip")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,2:4",
                   help="fractions pruned, or N:M (of every M weights of a row, N kept)")
    p.add_argument("--calibration", type=int, default=1024, help="training images")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    task = image_task("cifar10", args.data_dir)
    model, spec = load_model(args.model, task=task)
    from deepzip.data import load_cifar10

    train = load_cifar10(args.data_dir, train=True).subset(args.calibration)
    calibration = BatchLoader(train, 128, train=False, mean=spec.mean, std=spec.std)
    base = stages.score(model, task, spec).value
    rows = []
    methods = ("percentile", "global", "wanda", "sparsegpt")
    reads = ("wanda", "sparsegpt")
    for sparsity in args.sparsities.split(","):
        row = {"sparsity": sparsity}
        pattern = sparsity if ":" in sparsity else None  # N:M (2:4): per row, no global
        for method in methods:
            if pattern and method == "global":
                row[method] = row[f"{method} +BN"] = "n/a"
                continue
            trial = copy.deepcopy(model)
            prune_(trial, PruneConfig(method, 0.0 if pattern else float(sparsity),
                                      n_m=pattern), bake=True,
                   calibration=calibration if method in reads else None,
                   calibration_batches=len(calibration))
            row[method] = round(100 * stages.score(trial, task, spec).value, 2)
            recalibrate_batchnorm_(trial, calibration, batches=len(calibration))
            row[f"{method} +BN"] = round(100 * stages.score(trial, task, spec).value, 2)
        rows.append(row)
    columns = ["sparsity", *[f"{m}{bn}" for m in methods for bn in ("", " +BN")]]
    text = (f"$ python experiments/oneshot.py {' '.join(sys.argv[1:])}\n\n"
            f"{args.model}: {100 * base:.2f}% before pruning, on {task.description}. Test "
            "accuracy (%) after one-shot pruning, no retraining; +BN: with the BatchNorm "
            f"statistics re-estimated on {len(train):,} training images.\n\n"
            + markdown_table(rows, columns) + "\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
