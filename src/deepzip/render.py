"""How deepzip shows results: terminal and Markdown tables, CSV, plots, and the run
report's files. The numbers themselves come from :mod:`deepzip.report`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write, output_kind
from .errors import DeepzipError
from .report import outputs_agree, pareto_front, run_score, run_summary, structure

__all__ = ["bytes_by_kind_line", "label_axes", "markdown_table", "plot_filter_norms",
           "plot_pareto", "plot_sensitivity", "plot_weight_sharing", "pyplot", "save_figure",
           "text_table", "write_csv", "write_run_report"]


def plot_filter_norms(model: nn.Module, names: Sequence[str], path: str | os.PathLike[str],
                      title: str = "") -> None:
    """Bar plot of per-output-filter L1 norms for the chosen layers (one panel each)."""
    plt = pyplot()

    st = structure(model, names)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        l1 = st[name]["filter_l1"]
        ax.bar(range(len(l1)), l1, color="tab:blue")
        ax.set_title(f"{name}: {st[name]['empty_filters']} of {len(l1)} filters all-zero")
        ax.set_xlabel("output filter")
        ax.set_ylabel("L1 norm")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (imported lazily: plotting is rare)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_axes(ax: Any, xlabel: str | None = None, ylabel: str | None = None,
               title: str | None = None, *, grid: str = "major", **legend: Any) -> None:
    """Labels, a light grid and a legend: the one style every deepzip line plot uses."""
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which=grid)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**legend)


def plot_format(path: str | os.PathLike[str]) -> str:
    """The image format a plot's file name asks for (png without an extension), checked
    before any work: one the plotting library cannot write, or a path that is not a file
    to write, is one DeepzipError."""
    output_kind(path)
    fmt = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise DeepzipError(f"{path}: a plot can be written as {', '.join(sorted(known))}, "
                           f"not .{fmt}")
    return fmt


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Lay out, save atomically and close a matplotlib figure."""
    plt = pyplot()

    fmt = plot_format(path)
    with atomic_write(path) as f:  # "tight": long rotated tick labels are never cut off
        fig.savefig(f, format=fmt, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _cell(v: Any) -> str:
    if isinstance(v, float):  # four decimals; a small metric (an MSE) its four digits
        return f"{v:.4f}" if v == 0 or abs(v) >= 0.001 else f"{v:.3e}"
    if isinstance(v, list):
        return "x".join(map(str, v))
    return str(v)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Aligned plain-text table for the terminal."""
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if v[:1].isdigit() or v[:1] == "-" else v.ljust(w)
                        for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts to CSV (columns from the first row), atomically."""
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_sensitivity(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Accuracy vs. pruning level, one line per layer."""
    plt = pyplot()

    base = next(r["accuracy"] for r in rows if r["layer"] == "(none)")
    layers = list(dict.fromkeys(r["layer"] for r in rows if r["layer"] != "(none)"))
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        pts = sorted((r["level"], r["accuracy"]) for r in rows if r["layer"] == layer)
        ax.plot([0] + [p[0] for p in pts], [base] + [p[1] for p in pts], marker=".",
                color=cmap(i / max(1, len(layers) - 1)), label=layer)
    label_axes(ax, "fraction of the layer pruned (percentile)", "test accuracy",
               "Pruning sensitivity, one layer at a time", fontsize=6, ncol=2, loc="lower left")
    save_figure(fig, path)


def plot_weight_sharing(layers: Sequence[tuple[str, torch.Tensor, torch.Tensor,
                                               torch.Tensor]],
                        path: str | os.PathLike[str], title: str = "") -> None:
    """Per layer, the nonzero weight distribution before and after weight sharing.

    ``layers``: (name, weights before, weights after, codebook). Centroids are marked as
    vertical lines on the "before" histogram; "after" shows how many weights share each.
    """
    plt = pyplot()

    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 3 * len(layers)), squeeze=False,
                             layout="constrained")  # titles never overlap the axes above
    for (name, before, after, centroids), (ax0, ax1) in zip(layers, axes, strict=True):
        b = before.detach().flatten().float()
        b = b[b != 0].cpu().numpy()
        a = after.detach().flatten().float()
        a = a[a != 0].cpu()
        ax0.hist(b, bins=120, color="tab:gray")
        for c in centroids.detach().cpu().tolist():
            ax0.axvline(c, color="tab:red", lw=0.6, alpha=0.8)
        ax0.set_title(f"{name}: {len(b)} nonzero weights, before (red: centroids)")
        values, counts = torch.unique(a, return_counts=True)
        span = float(values.max() - values.min()) if len(values) > 1 else 1.0
        ax1.bar(values.numpy(), counts.numpy(), width=span / 150 + 1e-9, color="tab:red")
        ax1.set_title(f"{name}: after, {len(values)} shared values")
        ax1.set_xlim(ax0.get_xlim())
        for ax in (ax0, ax1):
            ax.set_xlabel("weight value")
            ax.set_ylabel("count")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def bytes_by_kind_line(kinds: dict[str, int]) -> str:
    """``header 1,385, positions 15,047, ...``: a file's bytes by kind (those it has), for
    one line of text."""
    return ", ".join(f"{k} {v:,}" for k, v in kinds.items() if v or k == "header")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _plot_layers(layers: Sequence[dict[str, Any]], path: os.PathLike[str] | str,
                 title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(layers))
    ax.bar(x, [t["bytes"] for t in layers], color="tab:blue", label="bytes in .dzip")
    ax.set_ylabel("bytes")
    ax.set_xticks(list(x), [t["name"].removesuffix(".weight") for t in layers], rotation=75,
                  fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(list(x), [t["sparsity"] for t in layers], "o-", color="tab:red", label="sparsity")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("sparsity")
    ax.set_title(f"{title}: per-layer size and sparsity")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    save_figure(fig, path)


def plot_pareto(reports: Sequence[dict[str, Any]], path: os.PathLike[str] | str) -> None:
    """Accuracy against real on-disk compression, one point per run."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = sorted((r["summary"]["real_ratio"], run_score(r["summary"], "decoded") * 100,
                  r["summary"].get("run") or r["summary"]["recipe"]) for r in reports)
    for x, y, name in pts:
        ax.scatter(x, y, color="tab:blue", zorder=3)
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    front = pareto_front([(x, y) for x, y, _ in pts])
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), color="tab:blue", alpha=0.4, label="Pareto front")
    if reports:
        base = run_score(reports[0]["summary"], "baseline") * 100
        ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline {base:.2f}%")
        ax.axhline(base - 1, color="tab:red", ls=":", lw=1, label="baseline - 1 point")
    ax.set_xscale("log")
    if pts:  # readable ratios ("20x") instead of powers of ten
        from matplotlib.ticker import FuncFormatter, NullFormatter

        lo, hi = pts[0][0], pts[-1][0]
        ax.set_xticks([t for t in (1, 2, 5, 10, 20, 30, 50, 100, 200, 500, 1000)
                       if lo / 1.5 <= t <= hi * 1.5])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    label_axes(ax, "real compression on disk (fp32 state_dict bytes / .dzip bytes)",
               "test accuracy of the decoded model (%)", "Accuracy vs. real compression",
               grid="both", loc="lower left")
    save_figure(fig, path)


def write_run_report(out: os.PathLike[str] | str, recipe: Any, state: dict[str, Any],
                     task: Any = None, command: str = "deepzip run") -> dict[str, Any]:
    """``report.md``, ``report.json`` and ``layers.png`` for one pipeline run; returns the
    report's numbers (:func:`deepzip.report.run_summary`). ``command``: how the run was
    started, which the report quotes (the run's ``command.txt`` holds the same).

    Scores are the task's metric (with its direction); the task and data set the run was
    evaluated on are named, as measured, not assumed.
    """
    out = Path(out)
    report = run_summary(recipe.name, state, task)
    st, summary_row = report["stages"], report["summary"]
    enc, ver = st["encode"], st["verify"]
    metric, higher = summary_row["metric"], summary_row["higher_is_better"]
    base = summary_row["baseline_score"]
    layers = [t for t in enc["tensors"] if "clusters" in t]
    with atomic_write(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    _plot_layers(layers, out / "layers.png", recipe.name)
    decided = _decided(summary_row, st["baseline"].get("seen_validation", False))
    fmt_ratio = f"{enc['formula_ratio']:.2f}x" if enc["formula_ratio"] else "n/a"
    score_line = _score_line(metric, higher, base, ver["score"])
    size_line = (f"{enc['file_bytes']:,} bytes vs {enc['state_dict_bytes']:,} (the fp32 "
                 f"state_dict as torch.save writes it): {enc['real_ratio']:.2f}x")
    data = getattr(task, "description", "") or "CIFAR-10 test set"
    agree = [outputs_agree(ver)] if "identical" in ver else []
    if summary_row["same_predictions"]:
        agree.append(f"{summary_row['same_predictions']} predictions equal")
    bpp = (f"| bits per parameter (file bits / parameters) | "
           f"{summary_row['bits_per_param']:.3f} |\n") if summary_row["bits_per_param"] else ""
    md = f"""# deepzip run: {recipe.name}

{recipe.description}

Made by `{command}` with the recipe in `recipe.yaml` beside this file (the exact
settings are also in `report.json`). Task `{summary_row['task']}`, evaluated on: {data};
metric `{metric}` ({'higher' if higher else 'lower'} is better), fp32. {decided}

## Result

| | |
|---|---|
| {metric}, baseline -> decoded .dzip | {score_line} |
| **real size on disk** | **{size_line}** |
{bpp}{_budget_row(st["quantize"].get("budget"))}| {INDICES_ONLY} | {fmt_ratio} |
| weight sparsity | {(summary_row['sparsity'] or 0) * 100:.1f}% |
| Huffman, average bits per nonzero index | {enc['huffman_avg']:.3f} |
| decoded model agrees with the in-memory model | {'; '.join(agree)} |

{_scores_table(st, metric)}
{_search_section(st["prune"].get("search"), metric)}{_budget_section(
    st["quantize"].get("budget"), metric)}
## Time per stage

"time" is the stage's wall time in the process that finished it (a resumed stage counts
only its last process); "training" sums the training time of its epochs over every process
that ran them (evaluation passes not included).

{markdown_table([{"stage": k, "time": _duration(v),
                  "training": _duration(report["training_seconds"][k])
                  if report["training_seconds"][k] else ""}
                 for k, v in report["seconds"].items()], ["stage", "time", "training"])}

## Per layer

{markdown_table(layers, ["name", "shape", "params", "nonzero", "sparsity", "clusters", "bits",
                         "huffman_avg", "encoding", "gap_bits", "bytes"])}

Where the bytes go: {bytes_by_kind_line(enc.get("bytes_by_kind", {}))}
("positions": where the nonzero weights are, the Huffman-coded zero runs; "values": their
cluster indices; "unshared weights": weight tensors stored as they are; "other": norms'
scales and buffers).

![per-layer sparsity and bytes](layers.png)
"""
    with atomic_write(out / "report.md", "w") as f:
        f.write(md)
    return report


def _scores_table(st: dict[str, Any], metric: str) -> str:
    """Each model of the run (baseline, pruned, shared, decoded) scored on test and, where
    the run decided on it, validation data."""
    key, val_key = f"test {metric}", f"validation {metric}"
    step = st["quantize"].get("step")  # prune.keep_steps: the pruning step the file ships
    kept = {r["step"]: r["score"] for r in st["prune"].get("search", {}).get("steps", [])}
    pruned = {**st["prune"], "val_score": kept[step]} if step in kept else st["prune"]
    rows = [{"model": name, key: _blank(stage.get(field)),
             val_key: _blank(stage.get(f"val_{field}"))}
            for name, stage, field in [
                ("baseline", st["baseline"], "score"),
                ("pruned + retrained" + (f" (step {step})" if step else ""), pruned, "score"),
                ("quantized (k-means)", st["quantize"], "score_kmeans"),
                ("quantized (final, file precision)", st["quantize"], "score"),
                ("decoded from .dzip", st["verify"], "score")]
            if stage.get(field) is not None or stage.get(f"val_{field}") is not None]
    columns = ["model", key] + ([val_key] if any(r[val_key] != "" for r in rows) else [])
    return markdown_table(rows, columns)


def _decided(summary_row: dict[str, Any], seen_validation: bool) -> str:
    """What the run's decisions read, for the report's opening."""
    if summary_row.get("decisions_on") == "validation":
        n = summary_row["validation_examples"]
        held = summary_row.get("validation_data") or (
            f"{f'{n:,} examples ' if n else ''}held out of the training data")
        decided = ("Every decision of the run (training-time evaluations, sensitivity "
                   f"scans, budgets) read validation data ({held}); the test data "
                   "this report gives was read only by the final evaluation.")
    else:
        decided = ("The task holds no validation data: training-time evaluations and "
                   "sensitivity scans read the test set.")
    if seen_validation:
        decided += (" **Note:** the baseline scores far better on the validation examples "
                    "than on the test examples, as a model trained on them does: the "
                    "decisions judged how well compression keeps what it learned, and the "
                    "budget may not hold on new data.")
    return decided


INDICES_ONLY = "indices-only ratio (the Huffman bits of the nonzeros' indices alone)"


def _score_line(metric: str, higher: bool, base: float, score: float) -> str:
    """Baseline -> decoded in the metric's terms: points for accuracy, else the metric
    with its change relative to the baseline and its direction."""
    change = score - base
    if metric == "acc":
        return f"{base * 100:.2f}% -> {score * 100:.2f}% ({change * 100:+.2f} points)"
    rel = f", {change / abs(base) * 100:+.2f}% of the baseline" if base else ""
    return (f"{metric} {base:.6g} -> {score:.6g} ({change:+.4g}{rel}; "
            f"{'higher' if higher else 'lower'} is better)")


def _search_section(search: dict[str, Any] | None, metric: str) -> str:
    """How the pruning chose its sparsity within its part of ``max_loss``: the probes of
    ``prune.agp.search_from``, or the judged steps of ``prune.stop_over_budget``."""
    if not search:
        return ""
    if "top_step" in search:
        return _kept_steps_section(search, metric)
    steps = "kept_step" in search
    rows = _with_margin([{**({"step": p["step"]} if steps else {}), "sparsity": p["sparsity"],
                          f"validation {metric}": p["score"], "loss": p["loss"],
                          "margin": p.get("margin", 0.0),
                          "limit": p.get("limit", search["limit"]), "within": p["within"]}
                         for p in search["probes"]])
    margin = ("" if not search.get("margin_se") else
              f" Each limit is that share of what the model's margin ({search['margin_se']:g} "
              "standard errors of its loss, paired over the validation examples) leaves of "
              "`max_loss`: the margin is kept for the final confirmation, after the sharing.")
    if steps:
        how = ("Each step's model, pruned and retrained, was scored on validation data; the "
               "first over its limit was undone and the pruning stopped: **"
               + (f"step {search['kept_step']} kept" if search["kept_step"] else
                  "no step kept, the model stays unpruned") + f"**. {_why_stopped(search)}")
    else:
        how = (f"Probes (each prunes a copy of the model by the schedule shrunk to "
               f"{search['probe_epochs']} epochs; a short schedule recovers less than the full "
               "one, so they tend to err on the safe side), the recipe's final sparsity first; "
               f"the full stage pruned to **{search['chosen']:.4f}**.")
    return f"""
## The sparsity search

The pruning may spend {search['loss_share']:g} of `max_loss` {_budget_text(search)}: at
most {search['limit']:.4g} {search.get('units', '')} against the baseline's validation
{metric} ({search['baseline_val_score']:.4g}). {how}{margin}

{markdown_table(rows, list(rows[0]))}
"""


def _kept_steps_section(search: dict[str, Any], metric: str) -> str:
    """``prune.keep_steps``: every step's model scored, the smoothed losses, and the
    candidates the sharing stage chose among."""
    rows = [{"step": r["step"], "sparsity": r["sparsity"], f"validation {metric}": r["score"],
             "loss": r["loss"], "smoothed loss": r["fit"], "margin": r["margin"],
             "candidate": r["step"] in search["candidates"]} for r in search["steps"]]
    top = search["top_step"]
    return f"""
## The pruning steps

Every step's model, pruned and retrained, was scored on validation data against the
baseline's {metric} ({search['baseline_val_score']:.4g}) and kept; the pruning stops early
only at a step over the whole budget even less its margin. The losses are smoothed so that
they do not fall as the sparsity grows (pooled where a step scored better than the one
before it), and a step is a candidate when its smoothed loss plus its margin is within
`max_loss` {_budget_text(search)}: the margin is paid once, by the file that ships, not by
each step. {"The sharing budget's search starts on step " + str(top) + ", the sparsest "
            "candidate, and moves down a step while a step is over the budget at the cap."
            if top else "No step is a candidate: the model stays unpruned."}

{markdown_table(rows, list(rows[0]))}
"""


def _options_section(budget: dict[str, Any], metric: str) -> str:
    """``prune.keep_steps``: the files the run chose among, smallest first."""
    units = budget.get("units", "")
    rows = [{"step": o["step"], "sparsity": o["sparsity"], "target bits": o["bits"],
             "bytes": o["bytes"], "loss": o["loss"], "margin": o["margin"],
             "sharing cost from": "its probes" if o["measured"] else "the searched step",
             "within": o["loss"] + o["margin"] <= budget["max_loss"]}
            for o in budget["options"]]
    return f"""
The candidates, each at every probed budget, in {units}: what sharing cost the searched
step at each budget (its probes' losses over its own, smoothed so that fewer bits never
cost less) is added to each step's smoothed loss, with the searched step's margin; another
step's bytes are measured by clustering it. The smallest file within the budget was
chosen: **step {budget['chosen_step']} at {budget['chosen']:.4g} bits** (a full stage over
the budget adds its miss to every prediction and chooses again).

{markdown_table(rows, list(rows[0]))}
"""


def _budget_section(budget: dict[str, Any] | None, metric: str) -> str:
    """The ``max_loss`` search of a run: every probe and every full-stage confirmation."""
    if not budget:
        return ""
    probes = _with_margin([{**({"step": p["step"]} if "step" in p else {}),
                            "target bits": p["target_bits"], f"validation {metric}": p["score"],
                            "loss": p["loss"], "margin": p.get("margin", 0.0),
                            "bytes": p["file_bytes"], "within": p["within"]}
                           for p in budget["probes"]])
    full = _with_margin([{**({"step": c["step"]} if "step" in c else {}),
                          "target bits": c["target_bits"] if c["target_bits"] is not None
                          else f"no sharing ({c.get('raw_dtype')})",
                          f"validation {metric}": c["val_score"],
                          "loss": c["loss"], "margin": c.get("margin", 0.0),
                          "within": c["within"]} for c in budget["confirmed"]])
    return f"""
## The budget

`max_loss` {_budget_text(budget)}: the smallest file whose loss against the baseline's
validation {metric} ({budget['baseline_val_score']:.4g}) stays within it. Probes (each
shares a copy of the pruned model at that budget of Huffman bits per nonzero index and
trains its centroids briefly), bisecting from the cap.{_margin_line(budget)}{_moved(budget)}

{markdown_table(probes, list(probes[0]))}
{_options_section(budget, metric) if "options" in budget else ""}
The full stage at the chosen budget (over it: once more at a larger one, then at the cap,
then no sharing at all, the weights stored as float16):

{markdown_table(full, list(full[0]))}
"""


def _moved(budget: dict[str, Any]) -> str:
    """Where the budget search moved down the candidate steps: each step over the budget
    even at the cap (its first probe) hands the search to the next one."""
    over = sorted({p["step"] for p in budget["probes"] if "step" in p}
                  - {budget.get("searched_step")}, reverse=True)
    if not over:
        return ""
    steps = ", ".join(str(s) for s in over)
    return (f" Step{'s' if len(over) > 1 else ''} {steps} went over the budget even at the "
            f"cap, so the search moved down to the next candidate: **the budget was searched "
            f"on step {budget['searched_step']}**.")


def _budget_text(search: dict[str, Any]) -> str:
    """``max_loss`` as the user wrote it and in the loss's unit (older runs: the number)."""
    if "budget" not in search:
        return f"{search['max_loss']:g}"
    written, units = search["budget"], search["units"]
    if written.split()[-1] in (units, "point", "points"):  # already in the loss's unit
        return written
    return f"{written} ({search['max_loss']:.4g} {units})"


def _budget_row(budget: dict[str, Any] | None) -> str:
    """The result table's line on the budget: what it was, what the file measured."""
    if not budget or not budget.get("confirmed"):
        return ""
    last = budget["confirmed"][-1]
    units = budget.get("units", "")
    return (f"| budget (`max_loss`), on validation data | {_budget_text(budget)}: the file's "
            f"loss {last['loss']:+.4g} + margin {last.get('margin', 0.0):.4g} {units}, "
            f"{'within' if last['within'] else '**over**'} |\n")


def _why_stopped(search: dict[str, Any]) -> str:
    """Why an iterative pruning stopped where it did, in one sentence."""
    over = next((p for p in search["probes"] if not p["within"]), None)
    if over is None:
        return "Every step was within its limit: the last one is kept."
    units = search.get("units", "")
    margin = f" (after a margin of {over['margin']:.3g})" if over.get("margin") else ""
    return (f"Stopped at step {over['step']} (sparsity {over['sparsity']:.4f}): its loss "
            f"{over['loss']:.3g} {units} is over its limit {over['limit']:.3g}{margin}.")


def _margin_line(search: dict[str, Any]) -> str:
    k = search.get("margin_se")
    return (f" Each loss counts {k:g} of its standard errors more (\"margin\", paired over "
            "the validation examples) before it is held against the budget." if k else "")


def _with_margin(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A search's rows, their margin column (``margin_se`` standard errors of each loss,
    added before the comparison) and a sparsity probe's limit (which its margin lowers)
    kept only where a run used a margin."""
    if any(r["margin"] for r in rows):
        return rows
    return [{k: v for k, v in r.items() if k not in ("margin", "limit")} for r in rows]


def _blank(v: Any) -> Any:
    return "" if v is None else v
