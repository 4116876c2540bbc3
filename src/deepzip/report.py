"""The numbers deepzip reports about a model and a run: per-layer sparsity, the structure
of the zeros, a run's summary (scores, sizes, ratios, time). :mod:`deepzip.render` shows them."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .deprecated import moved
from .errors import DeepzipError
from .targets import prunable

__all__ = ["current_stages", "outputs_agree", "pareto_front", "run_score", "run_summary",
           "structure", "summary"]

# moved in 0.3: tables, plots and the report files to deepzip.render
__getattr__ = moved(__name__, {n: f"deepzip.render:{n}" for n in (
    "bytes_by_kind_line", "label_axes", "markdown_table", "plot_filter_norms", "plot_pareto",
    "plot_sensitivity", "plot_weight_sharing", "pyplot", "save_figure", "text_table",
    "write_csv", "write_run_report")})


def summary(model: nn.Module) -> dict[str, Any]:
    """Per prunable parameter ``name, shape, params, nonzero, sparsity``, and totals.

    Reads the effective (masked) weights, so it works on pruned and baked models alike.

    >>> summary(get("resnet20"))["total"]["params"]
    268336
    """
    rows = []
    for t in prunable(model):
        w = t.weight.detach()
        nz = int(torch.count_nonzero(w))
        rows.append({"name": t.name, "type": type(t.module).__name__, "shape": list(w.shape),
                     "params": w.numel(), "nonzero": nz, "sparsity": 1 - nz / w.numel()})
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    other = sum(p.numel() for p in model.parameters()) - params
    return {"layers": rows, "total": {
        "params": params, "nonzero": nonzero,
        "sparsity": 1 - nonzero / params if params else 0.0,
        "other_params": other,  # biases, BatchNorm: not pruned
    }}


def structure(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Is the sparsity structured? Per output filter and per input channel of each layer:
    the fraction of zeros and the L1 norm. A fully zero filter or channel (zero fraction
    1.0) is structure hardware could skip; unstructured pruning rarely produces one.
    """
    layers = {t.name: t for t in prunable(model)}
    if names:
        missing = [n for n in names if n not in layers]
        if missing:
            raise DeepzipError(f"no prunable layer named {', '.join(missing)}; "
                               f"layers: {', '.join(layers)}")
        layers = {n: layers[n] for n in names}
    out = {}
    for name, t in layers.items():
        w = t.weight.detach().float()
        per_out = w.flatten(1)
        per_in = w.transpose(0, 1).flatten(1)
        out[name] = {
            "filter_zero_fraction": (per_out == 0).float().mean(1).tolist(),
            "filter_l1": per_out.abs().sum(1).tolist(),
            "channel_zero_fraction": (per_in == 0).float().mean(1).tolist(),
            "channel_l1": per_in.abs().sum(1).tolist(),
            "empty_filters": int((per_out == 0).all(1).sum()),
            "empty_channels": int((per_in == 0).all(1).sum()),
        }
    return out


def _training_seconds(stage: dict[str, Any]) -> float | None:
    """Training time of a stage's epochs from its history, which survives resumes."""
    history = stage.get("history") or []
    times = [r["train_time_s"] for r in history if isinstance(r, dict) and "train_time_s" in r]
    return float(sum(times)) if times else None


# Stage keys of runs written before tasks had metrics (accuracy was the only score).
_OLD_KEYS = {"accuracy": "score", "accuracy_kmeans": "score_kmeans", "images": "examples"}


def current_stages(stages: dict[str, Any]) -> dict[str, Any]:
    """A run's stage results (``state.json``, ``report.json``) with the current keys."""
    return {name: {_OLD_KEYS.get(k, k): v for k, v in stage.items()}
            if isinstance(stage, dict) else stage for name, stage in stages.items()}


def outputs_agree(result: dict[str, Any]) -> str:
    """How a decoded model's outputs compare with the in-memory model's, in words: bit for
    bit, or the largest difference (never a bare "identical: False")."""
    if result.get("identical"):
        return "outputs identical bit for bit"
    return f"outputs differ by at most {result['max_abs_diff']:.3g}"


def run_score(summary_row: dict[str, Any], which: str) -> float:
    """``baseline``/``decoded`` score of a report's summary, also from reports written
    before tasks had metrics (``*_acc`` keys)."""
    value = summary_row.get(f"{which}_score", summary_row.get(f"{which}_acc"))
    if not isinstance(value, (int, float)):
        raise DeepzipError(f"report summary has no {which} score")
    return float(value)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher is better on both), by x."""
    best, front = float("-inf"), []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front[::-1]


def run_summary(recipe_name: str, state: dict[str, Any], task: Any = None) -> dict[str, Any]:
    """The numbers of one pipeline run, from its stage results: the summary row (scores in
    the task's metric, with its direction; sizes, ratios, bits per parameter), the stages
    (per-layer sparsity added) and the time each took. :mod:`deepzip.render` writes them."""
    st = copy.deepcopy(state["stages"])  # the run's own state is not changed
    enc, ver = st["encode"], st["verify"]
    metric = getattr(getattr(task, "metric", None), "name", "acc")
    higher = getattr(getattr(task, "metric", None), "higher_is_better", True)
    base = st["baseline"]["score"]
    layers = [t for t in enc["tensors"] if "clusters" in t]
    for t in layers:
        t["sparsity"] = 1 - t["nonzero"] / t["params"] if t["params"] else 0.0
    examples = ver.get("examples")
    change = ver["score"] - base
    summary_row = {
        "recipe": recipe_name,
        "task": getattr(task, "name", "cifar10"),
        "metric": metric,
        "higher_is_better": higher,
        "baseline_score": base,
        "pruned_score": st["prune"].get("score"),
        "quantized_score": st["quantize"].get("score"),
        "decoded_score": ver["score"],
        "loss_points": (-change if higher else change) * 100 if metric == "acc" else None,
        "eval_examples": examples,
        "sparsity": st["quantize"].get("sparsity", st["prune"].get("sparsity")),
        "huffman_avg_bits": enc["huffman_avg"],
        "formula_ratio": enc["formula_ratio"],
        "file_bytes": enc["file_bytes"],
        "state_dict_bytes": enc["state_dict_bytes"],
        "real_ratio": enc["real_ratio"],
        "bits_per_param": 8 * enc["file_bytes"] / max(1, enc.get("params", 0)) if enc.get(
            "params") else None,
        "decisions_on": ("validation" if getattr(task, "decision_split", "test") == "val"
                         else "test"),
        "validation_examples": getattr(task, "val_size", None),
        "validation_data": getattr(task, "val_description", ""),
        "identical_outputs": ver.get("identical"),
        "same_predictions": (f"{ver['same_predictions']}/{examples}"
                             if "same_predictions" in ver else None),
    }
    report = {"summary": summary_row, "stages": st,
              "seconds": {k: v.get("seconds") for k, v in st.items()},
              "training_seconds": {k: _training_seconds(v) for k, v in st.items()}}
    return report
