"""A real language model to compress: a small GPT trained on the Python standard library.

Every machine with Python has the corpus: the standard library's own ``.py`` files (tests
and IDLE left out, about 12 MB), split by file into train (90%), validation (5%) and test
(5%) by a hash of each file's path, read as bytes (a 256-symbol vocabulary: no tokenizer
to download or to fit). ``StdlibGPT`` is a pre-LayerNorm decoder (4 layers, width 256,
4 heads, 256 bytes of context, 3.3M parameters) whose output layer is tied to its byte
embedding, as GPT-2's is; its attention and MLP are plain ``nn.Linear`` layers, as
deepzip's calibration-based pruning needs. The metric is perplexity per byte.

    python examples/stdlib_lm.py --out runs/stdlib-lm/model.pt
    deepzip eval runs/stdlib-lm/model.pt --arch stdlib_lm:StdlibGPT --task stdlib_lm:make_task

(``deepzip`` commands from this folder, or with it on ``PYTHONPATH``: entry points are
found as ``python -m`` finds modules).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepzip

CONTEXT = 256
SPLITS = {"train": (0, 90), "val": (90, 95), "test": (95, 100)}  # percent of files, by hash


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class StdlibGPT(nn.Module):
    """A byte-level GPT: logits ``(batch, time, 256)`` for token ids ``(batch, time)``."""

    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4, vocab: int = 256,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's output layer
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith(
                    ("proj.weight", "out.weight")) else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def corpus(split: str, root: str | Path | None = None) -> bytes:
    """The split's files, concatenated in path order: every ``.py`` of the standard
    library outside its tests and IDLE whose path hashes into the split's share."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    lo, hi = SPLITS[split]
    parts = []
    for f in sorted(base.rglob("*.py")):
        rel = f.relative_to(base).as_posix()
        if any(p in ("test", "tests", "idlelib", "site-packages") for p in f.parts):
            continue
        if lo <= int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100 < hi:
            parts.append(f.read_bytes())
    return b"\n".join(parts)


def windows(data: bytes, limit: int | None = None) -> TensorDataset:
    """Non-overlapping windows of ``CONTEXT`` bytes and their next bytes."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = (len(t) - 1) // CONTEXT
    if limit is not None:
        n = min(n, limit)
    x = t[: n * CONTEXT].view(n, CONTEXT)
    y = t[1: n * CONTEXT + 1].view(n, CONTEXT)
    return TensorDataset(x, y)


def make_task(batch_size: int = 32, eval_limit: int | None = None, **_: object
              ) -> deepzip.Task:
    """Train, validation and test windows of the standard library; perplexity per byte.
    ``eval_limit`` caps the validation and test windows (a quicker, noisier measure)."""
    test = windows(corpus("test"), eval_limit)
    val = windows(corpus("val"), eval_limit)
    return deepzip.Task.from_loaders(
        DataLoader(windows(corpus("train")), batch_size=batch_size, shuffle=True,
                   generator=torch.Generator().manual_seed(0)),
        DataLoader(test, batch_size=64), val=DataLoader(val, batch_size=64),
        name="stdlib-lm", metric=deepzip.Perplexity(),
        description=f"stdlib-lm: {len(test):,} test windows of {CONTEXT} bytes of the "
                    "Python standard library (files no training window came from)")


def main() -> int:
    p = argparse.ArgumentParser(description="train StdlibGPT on the standard library")
    p.add_argument("--windows", type=int, default=None,
                   help="training windows (default: all, about 42,000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model, task = StdlibGPT(), make_task()
    data = task.train.dataset
    keep = len(data) if args.windows is None else min(args.windows, len(data))
    train = DataLoader(torch.utils.data.Subset(data, range(keep)), batch_size=32,
                       shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = deepzip.TrainConfig(epochs=args.epochs, lr=args.lr, optimizer="adamw",
                              weight_decay=0.1, schedule="cosine",
                              warmup_epochs=min(0.05, args.epochs / 10), eval_every=1)
    t0 = time.perf_counter()
    history = deepzip.fit(model, train, cfg, test_loader=task.val, task=task, eval_name="val")
    minutes = (time.perf_counter() - t0) / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, args.out)
    _, ppl = deepzip.evaluate(model, task.eval, task=task)
    record = {"command": "python " + " ".join(sys.argv), "parameters": sum(
        p.numel() for p in model.parameters()), "windows": keep, "epochs": args.epochs,
        "minutes": round(minutes, 1), "test_ppl": ppl, "history": history}
    (args.out.parent / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"test perplexity per byte {ppl:.4f} after {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
