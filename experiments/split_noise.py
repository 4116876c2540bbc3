"""How far a loss measured on one half of a test set is from the loss on the other half.

    python experiments/split_noise.py resnet20 results/agp90/model.dzip \
        results/agp90-seed1/model.dzip --data-dir ../shared/data

The first model is the reference; each other one is a compressed model of it. For each,
the accuracy loss (reference minus compressed, in points) on CIFAR-10's test set is
measured on the half that ``--validation-from test`` uses for decisions (the split drawn
by seed 0) and on the other half, and over ``--draws`` random 5,000/5,000 splits: the
standard deviation of (loss on one half - loss on the other) is the noise a budget checked
on one half carries to a report made on the other; it sets the margin a budget needs.
Also how many images the two models disagree on, which drives that noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deepzip import stages
from deepzip.data import held_out_indices
from deepzip.loading import load_model
from deepzip.render import text_table
from deepzip.task import image_task

COLUMNS = ["compressed", "loss, all", "loss, decision half", "loss, report half",
           "disagree", "sd(half - half)"]


def correct(path: str, data_dir: str) -> torch.Tensor:
    """1 where the model classifies a test image right, in the test set's order (the task
    holds no validation data, so its decision data is the test set)."""
    task = image_task("cifar10", data_dir)
    model, spec = load_model(path, task=task)
    return stages.outcomes(model, task, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference")
    p.add_argument("compressed", nargs="+")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    ref = correct(args.reference, args.data_dir)
    n = ref.numel()
    report, decide = held_out_indices(n, n // 2)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for path in args.compressed:
        hit = correct(path, args.data_dir)
        diff = (ref - hit) * 100  # points per image
        diffs = []
        for _ in range(args.draws):
            order = torch.randperm(n, generator=gen)
            a, b = order[: n // 2], order[n // 2:]
            diffs.append(float(diff[a].mean() - diff[b].mean()))
        rows.append([path, f"{float(diff.mean()):+.2f}", f"{float(diff[decide].mean()):+.2f}",
                     f"{float(diff[report].mean()):+.2f}",
                     f"{float((ref != hit).float().mean()) * 100:.2f}%",
                     f"{torch.tensor(diffs).std().item():.2f}"])
    text = (f"reference {args.reference}: {float(ref.mean()) * 100:.2f}% on {n:,} test "
            f"images; loss in points (reference - compressed)\n\n"
            + text_table([dict(zip(COLUMNS, r, strict=True)) for r in rows], COLUMNS)
            + f"\nsd: over {args.draws} random 5,000/5,000 splits\n")
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
