"""Cost of pruning masks during retraining: masked vs unmasked training step, same run.

    python bench/mask_overhead.py --data-dir ../shared/data [--steps 30 --rounds 3]

Both models are ResNet-20 with bf16 autocast and channels_last on the same batches; the
masked one carries deepzip's masks (bool, a parametrization) on every Conv/Linear weight (80%
global sparsity). Rounds alternate between the two to spread machine noise evenly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from deepzip.data import BatchLoader, load_cifar10
from deepzip.models import get
from deepzip.prune import PruneConfig, prune_
from deepzip.train import _autocast, default_device


def step_time(model, batches, steps, autocast) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    for i, (x, y) in enumerate(batches):
        if i == 3:
            t0 = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == steps + 2:
            break
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = default_device()
    split = load_cifar10(args.data_dir, train=True).subset(128 * (args.steps + 3))
    autocast, _ = _autocast(device, "auto")
    torch.manual_seed(0)
    plain = get("resnet20").to(device).to(memory_format=torch.channels_last)
    masked = get("resnet20").to(device)
    prune_(masked, PruneConfig("global", 0.8))
    masked.to(memory_format=torch.channels_last)
    times = {"plain": [], "masked": []}
    for _ in range(args.rounds):
        for name, model in (("plain", plain), ("masked", masked)):
            loader = BatchLoader(split, 128, train=True, device=device, channels_last=True)
            times[name].append(step_time(model, loader, args.steps, autocast))
    p, m = statistics.median(times["plain"]), statistics.median(times["masked"])
    print(f"device {device}, torch {torch.__version__}, batch 128, {args.steps} steps x "
          f"{args.rounds} rounds, median step time")
    print(f"unmasked: {p * 1000:7.1f} ms/step")
    print(f"masked  : {m * 1000:7.1f} ms/step")
    print(f"overhead: {(m / p - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
