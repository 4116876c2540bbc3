"""Compression without retraining on a trained language model: magnitude, Wanda and
SparseGPT pruning, then 4-bit sharing by k-means or for each layer's outputs.

    python examples/stdlib_lm.py --out runs/stdlib-lm/model.pt
    python experiments/posttrain_lm.py runs/stdlib-lm/model.pt \
        --out results/posttrain/stdlib-lm.md

The model is examples/stdlib_lm.py's byte-level GPT trained on the Python standard
library; its test perplexity per byte is measured on the test files (no training window
came from them). Each row prunes a fresh copy one shot (the tied embedding and output
layer left dense, as Wanda and SparseGPT leave them; every Linear of the blocks pruned at
the row's sparsity, or 2:4), then shares every weight with 4 bits (16 values per layer):
plain k-means of the weights, or with --calibration windows choosing each layer's
clusters for its outputs (quantize_(calibration=...): GPTQ's rounding, shared values
refitted). Wanda, SparseGPT and the calibrated sharing read the same calibration windows,
drawn from the training files. The time column is the pruning's and the sharing's.
With --retrain N, each pruned row is also retrained for N training windows (AdamW, its
zeros kept), then shared for its outputs: what a short retraining adds, and costs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import stdlib_lm  # noqa: E402

from deepzip import TrainConfig, evaluate, fit  # noqa: E402
from deepzip.prune import PruneConfig, prune_  # noqa: E402
from deepzip.quantize import QuantizeConfig, quantize_  # noqa: E402
from deepzip.render import markdown_table  # noqa: E402
from deepzip.targets import bake_, restore_masks_  # noqa: E402

METHODS = {"magnitude": "percentile", "wanda": "wanda", "sparsegpt": "sparsegpt"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a checkpoint of stdlib_lm.StdlibGPT")
    p.add_argument("--sparsities", default="0.5,0.7,2:4")
    p.add_argument("--calibration", type=int, default=128, help="training windows")
    p.add_argument("--retrain", type=int, default=0,
                   help="training windows of a short retraining after pruning (0: none)")
    p.add_argument("--eval-limit", type=int, default=None, help="test windows (all)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    task = stdlib_lm.make_task(eval_limit=args.eval_limit)
    model = stdlib_lm.StdlibGPT()
    state = torch.load(args.model, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    model.eval()
    data = task.train.dataset
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    calibration = DataLoader(Subset(data, pick[: args.calibration].tolist()), batch_size=16)
    batches = len(calibration)
    retrain = DataLoader(Subset(data, pick[args.calibration: args.calibration + args.retrain]
                                .tolist()), batch_size=32, shuffle=True,
                         generator=torch.Generator().manual_seed(2))

    def ppl(m: torch.nn.Module) -> float:
        return round(evaluate(m, task.eval, task=task).value, 4)

    base = ppl(model)
    rows = [{"sparsity": "0", "method": "dense", "pruned": base, "4-bit k-means":
             _shared(model, None, batches, ppl)[0], "4-bit for outputs":
             _shared(model, calibration, batches, ppl)[0], "seconds": ""}]
    for sparsity in args.sparsities.split(","):
        pattern = sparsity if ":" in sparsity else None
        for name, method in METHODS.items():
            trial = copy.deepcopy(model)
            t0 = time.perf_counter()
            prune_(trial, PruneConfig(method, 0.0 if pattern else float(sparsity),
                                      n_m=pattern, exclude=["embed"]), bake=True,
                   calibration=calibration if method != "percentile" else None,
                   calibration_batches=batches)
            pruned_s = time.perf_counter() - t0
            plain, _ = _shared(trial, None, batches, ppl)
            fitted, share_s = _shared(trial, calibration, batches, ppl)
            rows.append({"sparsity": sparsity, "method": name, "pruned": ppl(trial),
                         "4-bit k-means": plain, "4-bit for outputs": fitted,
                         "seconds": f"{pruned_s:.1f} + {share_s:.1f}"})
            if args.retrain:
                t0 = time.perf_counter()
                restore_masks_(trial, exclude=["embed"])
                fit(trial, retrain, TrainConfig(epochs=1, lr=5e-4, optimizer="adamw",
                                                weight_decay=0.0, schedule="cosine"), task=task)
                bake_(trial)
                retrain_s = time.perf_counter() - t0
                again, share_s = _shared(trial, calibration, batches, ppl)
                rows[-1].update({"retrained": ppl(trial), "retrained, 4-bit for outputs":
                                 again, "retrain seconds": f"{retrain_s:.1f} + {share_s:.1f}"})
            print(rows[-1], flush=True)
    text = (f"$ python experiments/posttrain_lm.py {' '.join(sys.argv[1:])}\n\n"
            f"{task.description}. Test perplexity per byte, dense {base:.4f}; one shot, no "
            f"retraining; calibration: {args.calibration} training windows "
            f"({args.calibration * stdlib_lm.CONTEXT:,} bytes). seconds: pruning + the "
            "calibrated sharing, on this machine"
            + (f"; retrained: {args.retrain:,} other training windows, one pass, AdamW "
               "(lr 5e-4, cosine), the zeros kept, then shared for its outputs; retrain "
               "seconds: retraining + sharing" if args.retrain else "") + ".\n\n"
            + markdown_table(rows, list(rows[-1])) + "\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


def _shared(model: torch.nn.Module, calibration: DataLoader | None, batches: int, ppl
            ) -> tuple[float, float]:
    """(perplexity, seconds) of a copy shared with 4 bits, for its outputs if calibrated."""
    trial = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize_(trial, QuantizeConfig(bits=4), calibration=calibration,
              calibration_batches=batches)
    return ppl(trial), time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
