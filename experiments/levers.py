"""Where a pruned model's bytes can still come from: each lever, measured.

    python experiments/levers.py runs/agp90-seed1/prune/model.pt --data-dir ../shared/data

On one pruned checkpoint (no training, so each row takes one evaluation); part of
``experiments/ablations.sh``.

1. bits per value: plain k-means at 3 and 4 bits against entropy-constrained clustering
   (``QuantizeConfig(entropy_weight=...)``) at 4-6 bit caps: accuracy right after
   clustering, Huffman bits per nonzero, bytes of indices plus fp16 codebooks;
2. positions: the mask's cost under the order-0 bound of each layer (what the zero-run
   code reaches) against a code that knows how many nonzeros each 3x3 kernel holds, and
   codes with one density per output channel, input channel or kernel tap;
3. allocation: entropy-constrained clustering (6-bit cap) with one relative error for
   every layer against penalties weighted by each layer's Fisher sensitivity
   (``QuantizeConfig(sensitivity=fisher_sensitivity(...))``), over a range of weights.

Prints one table per lever (``--tables 3``: only that one); ``--out FILE`` also writes
them there.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import torch

from deepzip.codecs import nonzero_huffman_bits
from deepzip.loading import load_model as open_model
from deepzip.prune import prunable
from deepzip.quantize import QuantizeConfig, dequantize_, fisher_sensitivity, quantize_
from deepzip.render import text_table
from deepzip.task import image_task
from deepzip.train import evaluate

SHARING = [(3, 0.0), (4, 0.0), (4, 6.0), (5, 20.0), (6, 40.0), (6, 80.0)]
ALLOCATION = [(False, 80.0), (False, 130.0), (False, 200.0), (False, 320.0), (True, 80.0),
              (True, 140.0), (True, 220.0), (True, 320.0), (True, 640.0)]


def _h(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def sharing(model: torch.nn.Module, score, settings=SHARING, sensitivity=None) -> list[dict]:
    """One row per (bits, beta), penalties weighted by ``sensitivity`` if given."""
    rows = []
    for bits, beta in settings:
        m = copy.deepcopy(model)
        layers = quantize_(m, QuantizeConfig(bits=bits, entropy_weight=beta,
                                             sensitivity=sensitivity))
        acc = score(m)
        dequantize_(m)
        coded = nonzero = 0
        for t in prunable(m):
            w = t.weight.detach().numpy().ravel()
            coded += nonzero_huffman_bits(w)
            nonzero += int((w != 0).sum())
        clusters = sum(v["clusters"] for v in layers.values())
        kind = "k-means" if not beta else f"entropy-constrained {beta:g}"
        rows.append({"clustering": kind + (", Fisher-weighted" if sensitivity else ""),
                     "bits (cap)": bits, "clusters": clusters, "acc": f"{acc:.4f}",
                     "bits/nonzero": f"{coded / nonzero:.3f}",
                     "indices+codebooks B": coded // 8 + 2 * clusters})
    return rows


def _rates(nz: np.ndarray, axis: int) -> float:
    """Bits of a mask coded with one density per slice along ``axis`` (each slice's
    count sent in log2(size + 1) bits): what a code would gain if some output channels,
    input channels or kernel taps were much denser than others."""
    rows = np.moveaxis(nz, axis, 0).reshape(nz.shape[axis], -1)
    return float((_h(rows.mean(1)) * rows.shape[1]).sum()) + \
        len(rows) * math.log2(rows.shape[1] + 1)


def positions(model: torch.nn.Module) -> list[dict]:
    layer = kernel = 0.0
    sliced = {"output channel": 0.0, "input channel": 0.0, "kernel tap": 0.0}
    for t in prunable(model):
        nz = t.weight.detach().numpy() != 0
        bound = float(_h(np.array(nz.mean()))) * nz.size
        layer += bound
        flat = nz.reshape(nz.shape[0], nz.shape[1] if nz.ndim > 1 else 1, -1)
        for (name, total), axis in zip(sliced.items(), (0, 1, 2), strict=True):
            sliced[name] = total + min(bound, _rates(flat, axis))  # a code picks the cheaper
        if nz.ndim != 4:  # no kernels: the layer's bound
            kernel += bound
            continue
        k = nz.shape[2] * nz.shape[3]
        counts = nz.reshape(-1, k).sum(1)
        p = np.bincount(counts, minlength=k + 1) / len(counts)
        kernel += float(-np.log2(p[counts]).sum()) + 4 * (k + 1)  # + the count table
        kernel += sum(math.log2(math.comb(k, int(c))) for c in counts)
    return [{"mask code": "order-0 bound per layer (the zero-run code is within ~1%)",
             "bytes": int(layer / 8)},
            {"mask code": "nonzeros per 3x3 kernel, then which of the C(9, n) sets",
             "bytes": int(kernel / 8)},
            *({"mask code": f"one density per {name} (where cheaper than the layer's)",
               "bytes": int(bits / 8)} for name, bits in sliced.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a pruned model (a run's prune/model.pt)")
    ap.add_argument("--data-dir")
    ap.add_argument("--out", help="also write the tables to this file")
    ap.add_argument("--tables", default="1,2,3", help="which tables, e.g. 3")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, spec = open_model(args.checkpoint)
    model.eval()
    task = image_task("cifar10", args.data_dir)
    loader = task.eval_loader(mean=spec.mean, std=spec.std)

    def score(m: torch.nn.Module) -> float:
        return evaluate(m, loader).value

    def allocation() -> list[dict]:
        train = task.train_loader(128, 0, mean=spec.mean, std=spec.std)
        fisher = fisher_sensitivity(copy.deepcopy(model), train, task.loss)
        return [row for weighted, beta in ALLOCATION
                for row in sharing(model, score, [(6, beta)], fisher if weighted else None)]

    tables = {"1": ("1. bits per value (accuracy right after clustering, no training)",
                    lambda: sharing(model, score)),
              "2": ("2. positions of the nonzeros", lambda: positions(model)),
              "3": ("3. allocation: one relative error everywhere, or penalties weighted by "
                    "each layer's Fisher sensitivity (40 training batches; no training)",
                    allocation)}
    text = f"levers measured on {args.checkpoint} (acc: {score(model):.4f} as pruned)\n"
    print(text, flush=True)
    for key in args.tables.split(","):
        title, make = tables[key]
        rows = make()
        table = f"\n{title}\n{text_table(rows, list(rows[0]))}\n"
        print(table, flush=True)
        text += table
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
