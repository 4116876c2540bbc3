"""Does choosing the clusters for each layer's outputs (quantize.calibration) make the
default's sharing cheaper? Budget probes of a finished default run's kept pruning steps,
shared with and without it, side by side.

    python experiments/probe_calibration.py runs/default-v2 --steps 3,4 --bits 2.0,3.25 \
        --data-dir ../shared/data --out results/ablations/probe-calibration.md

Each probe is the default's: a copy of the step's model shared at that budget of Huffman
bits per nonzero index (entropy-constrained, 6-bit cap), one epoch of distilled centroid
training, rounded to the file's precision, scored on the 5,000 deciding test images with
its margin (two paired standard errors) and its file measured. With calibration, the
clusters are chosen for each layer's outputs on 1,024 training images first (GPTQ's
rounding, shared values refitted: deepzip.obs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

from deepzip import dzip_torch, stages
from deepzip.context import RunContext
from deepzip.quantize import shared_index_bits
from deepzip.recipe import load_recipe
from deepzip.render import markdown_table
from deepzip.sparsity import step_path
from deepzip.task import image_task


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run of the default recipe")
    p.add_argument("--steps", default="3,4")
    p.add_argument("--bits", default="2.0,3.25")
    p.add_argument("--calibration", type=int, default=1024)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    recipe = load_recipe(args.run / "recipe.yaml")
    task = image_task("cifar10", args.data_dir, validation=recipe.validation,
                      validation_from=recipe.validation_from)
    ctx = RunContext(recipe, args.run, task,
                     log=lambda _: None)
    base, spec = ctx.start()
    baseline, _ = ctx.judge(base, spec)
    q = recipe.quantize
    probe = recipe.train_config({"weight_decay": 0.0, **q.train}, q.probe_epochs)
    encoding = dataclasses.asdict(recipe.encode)
    rows = []
    for step in (int(s) for s in args.steps.split(",")):
        model, _ = ctx.load(step_path(args.run, step), spec)
        for bits in (float(b) for b in args.bits.split(",")):
            for cal in (0, args.calibration):
                trial = copy.deepcopy(model)
                t0 = time.perf_counter()
                stages.share(trial, ctx.task, spec, dataclasses.replace(
                    q.config(recipe.seed), target_bits=bits), centroids=probe,
                    loss_fn=ctx.loss(q.distill), calibration=cal)
                dzip_torch.round_to_file_precision_(trial, **encoding)
                value, margin = ctx.judge(trial, spec)
                rows.append({"step": step, "target bits": bits, "calibration": cal,
                             "index bits": round(shared_index_bits(trial), 3),
                             "acc": value, "loss": round(100 * (baseline - value), 2),
                             "margin": round(margin, 3),
                             "bytes": stages.file_bytes(trial, spec, encoding),
                             "seconds": round(time.perf_counter() - t0)})
                print(rows[-1], flush=True)
    text = (f"$ python experiments/probe_calibration.py {' '.join(sys.argv[1:])}\n\n"
            f"Probes of {args.run}'s kept steps; baseline {baseline:.4f} on the deciding "
            "images. loss: points against it.\n\n" + markdown_table(rows, list(rows[0])) + "\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
