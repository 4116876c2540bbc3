"""Lab 2: prune the shipped ResNet-20 (std and percentile), then masked retraining.

    python examples/assignment/lab2_retrain.py --data-dir ../shared/data [--epochs 20]

Each setting trains in runs/lab2/<name>/ (resumable: rerun the same command) and leaves
its result in examples/assignment/results/lab2/<name>.json; the table in its README.md is
rebuilt from those files on every run. s=0 and q=0 prune nothing: they are one run, shown twice.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from common import ROOT, baseline_and_test, command_line, parser, write_json, write_text

from deepzip.data import BatchLoader, load_cifar10
from deepzip.prune import FINETUNE, PruneConfig, finetune_after_prune, prune_, sparsity_of
from deepzip.render import label_axes, markdown_table, pyplot, save_figure
from deepzip.train import TrainConfig, evaluate

# The student's numbers from ../shared/seed: (sparsity, before, after); lr 0.001, 20 epochs.
SEED = {("std", 0.0): (0.0, 0.914, 0.914), ("std", 0.25): (0.2053, 0.9082, 0.9136),
        ("std", 0.5): (0.3973, 0.8748, 0.911), ("std", 1.0): (0.6951, 0.4718, 0.894),
        ("percentile", 0.0): (0.0, 0.914, 0.9138),
        ("percentile", 0.25): (0.25, 0.9058, 0.9137),
        ("percentile", 0.5): (0.5, 0.852, 0.9105), ("percentile", 0.75): (0.75, 0.2367, 0.8837)}
GRID = [("std", s) for s in (0.0, 0.25, 0.5, 1.0)] + [("percentile", q) for q in
                                                       (0.0, 0.25, 0.5, 0.75)]


def run_name(method: str, amount: float) -> str:
    return "none" if amount == 0 else f"{method}-{amount}"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=FINETUNE.epochs)
    args = p.parse_args()
    out = Path(args.out) / "lab2"
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(FINETUNE, epochs=args.epochs)
    base, spec, test = baseline_and_test(args.data_dir)
    split = None
    for method, amount in GRID:
        name = run_name(method, amount)
        if (out / f"{name}.json").is_file():
            continue
        split = split or load_cifar10(args.data_dir, train=True)
        train = BatchLoader(split, cfg.batch_size, train=True, mean=spec.mean, std=spec.std,
                            seed=cfg.seed, channels_last=cfg.channels_last)
        model = copy.deepcopy(base)
        prune_(model, PruneConfig(method, amount))
        before = evaluate(model, test)[1]
        hist = finetune_after_prune(model, train, cfg, test_loader=test, resume=True,
                                    out_dir=ROOT / "runs" / "lab2" / name, desc=name)
        write_json(out / f"{name}.json", {
            "method": method, "amount": amount, "sparsity": sparsity_of(model),
            "acc_before": before, "acc_after": evaluate(model, test)[1],
            "train_config": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
            "history": hist, "command": command_line()})
        table(out, cfg)  # after every setting, so a partial run still shows its rows
    table(out, cfg)


def table(out: Path, cfg: TrainConfig) -> None:
    rows = []
    for method, amount in GRID:
        f = out / f"{run_name(method, amount)}.json"
        r = json.loads(f.read_text()) if f.is_file() else {}
        seed = SEED[(method, amount)]
        rows.append({"method": method, "amount": amount, "sparsity": r.get("sparsity", "-"),
                     "acc_before": r.get("acc_before", "pending"),
                     "acc_after": r.get("acc_after", "pending"), "seed_sparsity": seed[0],
                     "seed_acc_before": seed[1], "seed_acc_after": seed[2]})
    write_json(out / "lab2.json", {"rows": rows})
    done = [r for r in rows if isinstance(r["acc_after"], float)]
    if done:
        _plot(done, out)
    write_text(out / "README.md", f"""# Lab 2: pruning ResNet-20 with masked retraining

Made by `python examples/assignment/lab2_retrain.py --data-dir ../shared/data --epochs {cfg.epochs}`
from the shipped baseline. Retraining: {cfg.epochs} epochs, SGD momentum {cfg.momentum}
(Nesterov), lr {cfg.lr} with a {cfg.schedule} schedule, weight decay {cfg.weight_decay},
batch {cfg.batch_size}, bf16 autocast; masks as bool parametrizations, so pruned
weights stay exactly zero. Accuracy on the full CIFAR-10 test set in fp32. `seed_*`:
the assignment's student answers (lr 0.001, batch 128, weight decay 1e-4, 20 epochs; their
own 91.4% baseline). Per-epoch logs: `<name>.json` beside this file.

{markdown_table(rows, ["method", "amount", "sparsity", "acc_before", "acc_after",
                       "seed_sparsity", "seed_acc_before", "seed_acc_after"])}

{"![before and after retraining](accuracy.png)" if done else ""}
""")


def _plot(rows, out: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in [("std", "tab:blue"), ("percentile", "tab:orange")]:
        r = sorted((x for x in rows if x["method"] == method), key=lambda x: x["sparsity"])
        if not r:
            continue
        sp = [x["sparsity"] for x in r]
        ax.plot(sp, [x["acc_before"] for x in r], "o:", color=color, alpha=0.6,
                label=f"{method}, pruned")
        ax.plot(sp, [x["acc_after"] for x in r], "o-", color=color,
                label=f"{method}, retrained")
    label_axes(ax, "model sparsity", "test accuracy", "Masked retraining recovers accuracy")
    save_figure(fig, out / "accuracy.png")


if __name__ == "__main__":
    main()
