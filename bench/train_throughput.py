"""Training throughput: deepzip's step vs a plain PyTorch loop, same model, batch and run.

deepzip: the in-memory uint8 CIFAR-10 tensor, batch-wise crop/flip, channels_last and
the autocast ``precision: auto`` chooses (bf16 on CUDA and AVX-512 CPUs, fp32 on other
CPUs), also timed in the precision it did not choose. Baseline: fp32, a per-sample
``DataLoader`` over a ``Dataset`` applying torchvision-style transforms (pad+random crop,
flip, normalize) to each image in Python, as most CIFAR training scripts do.

    python bench/train_throughput.py --data-dir ../shared/data [--steps 40] [--workers 0]
        [--compile]

Prints images/s of each, their ratio, and the share of step time spent waiting for data.
``--compile`` also times deepzip's step on a ``torch.compile``d model (its compilation,
in the warm-up steps, reported apart).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from deepzip.data import CIFAR10_MEAN, CIFAR10_STD, BatchLoader, load_cifar10
from deepzip.models import get
from deepzip.train import _autocast, auto_precision, default_device


class PerSampleCifar(Dataset):
    """torchvision-style per-image transforms, written in plain torch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float() / 255  # ToTensor
        x = F.pad(x, (4, 4, 4, 4))  # RandomCrop(32, padding=4)
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        x = x[:, dy:dy + 32, dx:dx + 32]
        if torch.rand(()) < 0.5:  # RandomHorizontalFlip
            x = x.flip(2)
        return (x - self.mean) / self.std, self.labels[i]  # Normalize


def measure(model, batches, steps, autocast, device, channels_last
            ) -> tuple[float, float, float]:
    """(images/s, share of wall time spent fetching batches) over ``steps`` steps, and the
    seconds the five warm-up steps took."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    it = iter(batches)
    data_t, n = 0.0, 0
    start = time.perf_counter()
    for step in range(steps + 5):
        if step == 5:  # warm-up done
            sync(device)
            t0, data_t, n = time.perf_counter(), 0.0, 0
            warm = t0 - start
        td = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)
        data_t += time.perf_counter() - td
        with autocast:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(y)
    sync(device)
    total = time.perf_counter() - t0
    return n / total, data_t / total, warm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="baseline DataLoader workers")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd model")
    args = ap.parse_args()
    device = default_device()
    train = load_cifar10(args.data_dir, train=True)

    torch.manual_seed(0)
    ours_loader = BatchLoader(train, args.batch_size, train=True, device=device,
                              channels_last=True)
    chosen = auto_precision(device)
    autocast, _ = _autocast(device, chosen)
    ours, ours_data, _ = measure(get("resnet20").to(device), _cycle(ours_loader), args.steps,
                                 autocast, device, channels_last=True)
    other = "fp32" if chosen != "fp32" else "bf16"  # what auto did not choose, for the ratio
    torch.manual_seed(0)
    alt, _, _ = measure(get("resnet20").to(device), _cycle(ours_loader), args.steps,
                        _autocast(device, other)[0], device, channels_last=True)
    if args.compile:
        torch.manual_seed(0)
        comp, _, comp_warm = measure(torch.compile(get("resnet20").to(device)),
                                     _cycle(ours_loader), args.steps, autocast, device,
                                     channels_last=True)

    torch.manual_seed(0)
    base_loader = DataLoader(PerSampleCifar(train.images, train.labels), args.batch_size,
                             shuffle=True, drop_last=True, num_workers=args.workers,
                             persistent_workers=args.workers > 0)
    fp32, _ = _autocast(device, "fp32")
    base, base_data, _ = measure(get("resnet20").to(device), _cycle(base_loader), args.steps,
                                 fp32, device, channels_last=False)

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.steps} timed steps each")
    print(f"deepzip   : {ours:8.0f} images/s, data {ours_data * 100:5.1f}% of step time "
          f"(precision auto: {chosen}, CPU capability {torch.backends.cpu.get_cpu_capability()})")
    print(f"  in {other:4}  : {alt:8.0f} images/s (auto's choice is {ours / alt:.2f}x that)")
    print(f"plain fp32: {base:8.0f} images/s, data {base_data * 100:5.1f}% of step time "
          f"(DataLoader, {args.workers} workers)")
    if args.compile:
        print(f"compiled  : {comp:8.0f} images/s ({comp / ours:.2f}x deepzip's eager step; "
              f"warm-up with compilation {comp_warm:.0f} s)")
    print(f"ratio     : {ours / base:.2f}x")


def _cycle(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
