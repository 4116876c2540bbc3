"""Lab 1: prune the shipped ResNet-20 by std and by percentile, no retraining.

    python examples/assignment/lab1_prune.py --data-dir ../shared/data

Writes examples/assignment/results/lab1/{README.md, lab1.json, accuracy.png, filters_*.png,
layer_sparsity.png}.
"""

from __future__ import annotations

import copy
from pathlib import Path

from common import baseline_and_test, command_line, parser, write_json, write_text

from deepzip.prune import PruneConfig, prunable, prune_, sparsity_of
from deepzip.render import label_axes, markdown_table, plot_filter_norms, pyplot, save_figure
from deepzip.report import summary
from deepzip.train import evaluate

# The student's numbers from ../shared/seed (reference points, not truth).
SEED = {("std", 0.0): (0.0, 0.914), ("std", 0.25): (0.2053, 0.9082),
        ("std", 0.5): (0.3973, 0.8748), ("std", 1.0): (0.6951, 0.4718),
        ("percentile", 0.0): (0.0, 0.914), ("percentile", 0.25): (0.25, 0.9058),
        ("percentile", 0.5): (0.5, 0.852), ("percentile", 0.75): (0.75, 0.2367)}
GRID = [("std", s) for s in (0.0, 0.25, 0.5, 1.0)] + [("percentile", q) for q in
                                                       (0.0, 0.25, 0.5, 0.75)]


def main() -> None:
    args = parser(__doc__).parse_args()
    out = Path(args.out) / "lab1"
    out.mkdir(parents=True, exist_ok=True)
    base, _, test = baseline_and_test(args.data_dir)
    convs = [t.name for t in prunable(base)]
    shown = [convs[1], convs[13]]  # the assignment's "layer 1 and layer 13"
    rows, per_layer = [], {}
    for method, amount in GRID:
        model = copy.deepcopy(base)
        prune_(model, PruneConfig(method, amount))
        acc = evaluate(model, test)[1]
        sp = sparsity_of(model)
        seed_sp, seed_acc = SEED[(method, amount)]
        rows.append({"method": method, "amount": amount, "sparsity": sp, "test_acc": acc,
                     "seed_sparsity": seed_sp, "seed_test_acc": seed_acc})
        per_layer[f"{method}={amount}"] = {r["name"]: r["sparsity"]
                                           for r in summary(model)["layers"]}
        print(f"{method} {amount}: sparsity {sp:.4f}, accuracy {acc:.4f}", flush=True)
        if amount == 0.25:
            plot_filter_norms(model, shown, out / f"filters_{method}_0.25.png",
                              title=f"per-filter L1 norms after {method} pruning at 0.25")
    _plot(rows, per_layer, out)
    write_json(out / "lab1.json", {"command": command_line(), "rows": rows,
                                   "per_layer_sparsity": per_layer})
    cols = ["method", "amount", "sparsity", "test_acc", "seed_sparsity", "seed_test_acc"]
    layers = list(next(iter(per_layer.values())))
    std_rows = [{"layer": n, **{k: v[n] for k, v in per_layer.items() if k.startswith("std")}}
                for n in layers]
    s025 = per_layer["std=0.25"]
    high = sorted(s025, key=s025.get, reverse=True)[:4]
    deviation = (
        f"Measured at s=0.25, the layers range from {min(s025.values()) * 100:.1f}% to "
        f"{max(s025.values()) * 100:.1f}%. The most pruned are "
        + ", ".join(f"{n} ({s025[n] * 100:.1f}%)" for n in high)
        + ": their weights crowd near zero around a few large ones (heavier tails than a "
        "normal distribution), so s*std is a wider band for them. So std pruning is not "
        "percentile pruning in disguise: it prunes where the weight distribution is peaked, "
        "which says nothing about how sensitive a layer is (`deepzip sensitivity` measures "
        "that)."
    )
    write_text(out / "README.md", f"""# Lab 1: pruning ResNet-20 without retraining

Made by `{command_line()}` from the shipped baseline
(`deepzip.pretrained("resnet20")`), all Conv and Linear weights pruned, accuracy on
the full CIFAR-10 test set (fp32). `seed_*` columns: the assignment's student answers in
`../shared/seed/` (their own baseline, 91.4%).

{markdown_table(rows, cols)}

![accuracy vs sparsity](accuracy.png)

## Per-layer sparsity under std pruning

For normally distributed weights, |w| < s*std would remove erf(s/sqrt 2) of every layer:
19.7% at s=0.25, 38.3% at 0.5, 68.3% at 1.0. {deviation}

{markdown_table(std_rows, ["layer"] + [k for k in per_layer if k.startswith("std")])}

![per-layer sparsity](layer_sparsity.png)

## Is the sparsity structured?

No. Per-filter L1 norms of the assignment's layers 1 and 13 ({shown[0]}, {shown[1]})
after pruning at 0.25; the titles count filters that became entirely zero.

![std](filters_std_0.25.png)
![percentile](filters_percentile_0.25.png)
""")
    print(f"wrote {out}")


def _plot(rows, per_layer, out: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in [("std", "tab:blue"), ("percentile", "tab:orange")]:
        r = [x for x in rows if x["method"] == method]
        ax.plot([x["sparsity"] for x in r], [x["test_acc"] for x in r], "o-", color=color,
                label=f"{method} (deepzip)")
        ax.plot([x["seed_sparsity"] for x in r], [x["seed_test_acc"] for x in r], "x--",
                color=color, alpha=0.6, label=f"{method} (assignment)")
    label_axes(ax, "model sparsity", "test accuracy", "Pruning without retraining")
    save_figure(fig, out / "accuracy.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    for key, sp in per_layer.items():
        if key.startswith("std") and key != "std=0.0":
            ax.plot(range(len(sp)), list(sp.values()), "o-", label=key)
    ax.set_xticks(range(len(sp)), list(sp), rotation=75, fontsize=7)
    label_axes(ax, None, "sparsity", "Per-layer sparsity, std pruning")
    save_figure(fig, out / "layer_sparsity.png")


if __name__ == "__main__":
    main()
