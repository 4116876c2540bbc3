"""Magnitude pruning: thresholds and masks (pure functions) under thin ``nn.Module`` adapters.

Masks live in the model through ``torch.nn.utils.prune`` (``weight_orig`` * ``weight_mask``),
so a pruned model is still a standard module, gradients of pruned weights are zero, and
pruned weights stay exactly zero through training with momentum and weight decay.
:func:`bake_` turns the masked weights back into plain weights with exact zeros; a baked
model carries its masks as those zeros (:func:`restore_masks_`).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from .data import BatchLoader
from .errors import DeepzipError
from .train import TrainConfig, fit

__all__ = [
    "AGPSchedule",
    "PruneConfig",
    "agp_sparsity",
    "bake_",
    "finetune_after_prune",
    "global_masks",
    "is_pruned",
    "iterative_prune",
    "mask_smallest",
    "masks",
    "percentile_mask",
    "prunable_layers",
    "prune_",
    "restore_masks_",
    "sensitivity",
    "sparsity_of",
    "std_mask",
    "std_threshold",
    "targets_from_sensitivity",
]

METHODS = ("percentile", "std", "global")


# ---------------------------------------------------------------- functional core
def mask_smallest(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (1 keep, 0 prune) that prunes exactly the ``k`` smallest-magnitude entries.

    Ties at the threshold are broken by position, so the count is exact.
    """
    n = w.numel()
    if not 0 <= k <= n:
        raise DeepzipError(f"cannot prune {k} of {n} weights")
    mask = torch.ones(n, dtype=w.dtype, device=w.device)
    if k:
        order = torch.argsort(w.detach().abs().flatten(), stable=True)
        mask[order[:k]] = 0
    return mask.view_as(w)


def percentile_mask(w: torch.Tensor, q: float) -> torch.Tensor:
    """Prune the fraction ``q`` in [0, 1) of smallest-magnitude weights of one layer."""
    if not 0 <= q < 1:
        raise DeepzipError(f"percentile q must be in [0, 1), got {q}")
    return mask_smallest(w, round(q * w.numel()))


def std_threshold(w: torch.Tensor, s: float) -> float:
    """``s`` times the standard deviation of the layer's weights."""
    if not (s >= 0 and math.isfinite(s)):
        raise DeepzipError(f"std sensitivity s must be >= 0, got {s}")
    return float(s * w.detach().float().std()) if w.numel() > 1 else 0.0


def std_mask(w: torch.Tensor, s: float) -> torch.Tensor:
    """Prune weights with ``|w| < s * std(w)``."""
    return (w.detach().abs() >= std_threshold(w, s)).to(w.dtype)


def global_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One magnitude threshold over all ``weights`` so that exactly round(sparsity * N) go."""
    if not 0 <= sparsity < 1:
        raise DeepzipError(f"global sparsity must be in [0, 1), got {sparsity}")
    if not weights:
        raise DeepzipError("no layers selected for pruning")
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    keep = mask_smallest(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start:start + w.numel()].view_as(w).to(w.dtype)
        start += w.numel()
    return out


def agp_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's cubic ramp: ``final + (initial - final) * (1 - t)^3``, t in [0, 1]."""
    if end <= start:
        return final if step >= start else 0.0
    if step < start:
        return 0.0
    t = min(1.0, (step - start) / (end - start))
    return final + (initial - final) * (1 - t) ** 3


# ---------------------------------------------------------------- module adapters
@dataclass
class PruneConfig:
    """What to prune and how much.

    ``amount`` is q (percentile), s (std) or the model-wide sparsity (global).
    ``include``/``exclude`` are glob patterns over layer names (e.g. ``"conv1"``,
    ``"linear"``); ``per_layer`` overrides ``amount`` for named layers.

    >>> prune_(model, PruneConfig("percentile", 0.5, exclude=["linear"]))  # doctest: +SKIP
    """

    method: str = "percentile"
    amount: float = 0.5
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    per_layer: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DeepzipError(f"pruning method must be one of {METHODS}, got {self.method!r}")
        if self.method == "global" and self.per_layer:
            raise DeepzipError("per_layer amounts do not apply to global pruning")
        for v in [self.amount, *self.per_layer.values()]:
            _check_amount(self.method, v)


def _check_amount(method: str, v: float) -> None:
    if method == "std":
        std_threshold(torch.zeros(1), v)
    elif not 0 <= v < 1:
        raise DeepzipError(f"{method} pruning amount must be in [0, 1), got {v}")


def prunable_layers(model: nn.Module, include: list[str] | None = None,
                    exclude: list[str] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """Conv and Linear layers whose names match ``include`` and not ``exclude``."""
    include = include or ["*"]
    exclude = exclude or []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) \
                and any(fnmatch.fnmatchcase(name, p) for p in include) \
                and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            yield name, m


def is_pruned(module: nn.Module) -> bool:
    return tprune.is_pruned(module) and hasattr(module, "weight_mask")


def _set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Install or tighten ``module``'s mask; pruned weights are also zeroed underneath."""
    if is_pruned(module):
        module.weight_mask.mul_(mask.to(module.weight_mask))
    else:
        tprune.custom_from_mask(module, "weight", mask.to(module.weight.device))
    with torch.no_grad():
        module.weight_orig.mul_(module.weight_mask)
        module.weight = module.weight_orig * module.weight_mask  # refresh now, not next forward


def prune_(model: nn.Module, config: PruneConfig) -> dict[str, float]:
    """Prune ``model`` in place; return each pruned layer's sparsity.

    Already-pruned layers keep their zeros: the new mask is computed on the current
    (masked) weights and multiplied into the old one, so percentile q means total sparsity.
    """
    layers = dict(prunable_layers(model, config.include, config.exclude))
    if not layers:
        raise DeepzipError("no Conv/Linear layers match the include/exclude patterns")
    unknown = sorted(set(config.per_layer) - set(layers))
    if unknown:
        raise DeepzipError(f"per_layer names no prunable layer: {', '.join(unknown)}")
    weights = {n: m.weight.detach() for n, m in layers.items()}
    if config.method == "global":
        new = global_masks(weights, config.amount)
    else:
        fn = percentile_mask if config.method == "percentile" else std_mask
        new = {n: fn(w, config.per_layer.get(n, config.amount)) for n, w in weights.items()}
    for name, module in layers.items():
        _set_mask(module, new[name])
    return {n: 1 - float(m.weight_mask.mean()) for n, m in layers.items()}


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current masks of the pruned layers, by layer name."""
    return {n: m.weight_mask for n, m in model.named_modules() if is_pruned(m)}


def bake_(model: nn.Module) -> nn.Module:
    """Make masks permanent: plain ``weight`` parameters with exact zeros, no hooks."""
    for _, m in model.named_modules():
        if is_pruned(m):
            tprune.remove(m, "weight")
    return model


def restore_masks_(model: nn.Module, include: list[str] | None = None,
                   exclude: list[str] | None = None) -> dict[str, float]:
    """Re-attach masks to a baked model from its zeros, so retraining keeps them."""
    out = {}
    for name, m in prunable_layers(model, include, exclude):
        mask = (m.weight.detach() != 0).to(m.weight.dtype)
        if mask.min() < 1:
            _set_mask(m, mask)
            out[name] = 1 - float(mask.mean())
    return out


class AGPSchedule:
    """Automated gradual pruning (Zhu & Gupta 2017) as an ``after_step`` hook for ``fit``.

    Every ``frequency`` optimizer steps between ``start`` and ``end``, each layer is pruned
    to its target on the cubic ramp from ``initial`` to its final sparsity (``final``, or
    ``per_layer[name]``); with ``global_``, one threshold across all layers meets the
    model-wide target instead, so big redundant layers give up more. Masks only grow, so
    pruned weights never come back.

    >>> agp = AGPSchedule(model, final=0.8, start=0, end=2000)  # doctest: +SKIP
    >>> fit(model, loader, cfg, after_step=agp)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, final: float, start: int, end: int, *,
                 initial: float = 0.0, frequency: int = 100,
                 per_layer: Mapping[str, float] | None = None, global_: bool = False,
                 include: list[str] | None = None, exclude: list[str] | None = None) -> None:
        self.layers = dict(prunable_layers(model, include, exclude))
        self.per_layer = dict(per_layer or {})
        if global_ and self.per_layer:
            raise DeepzipError("AGP: per-layer targets do not combine with global pruning")
        self.global_ = global_
        for v in [initial, final, *self.per_layer.values()]:
            _check_amount("percentile", v)
        if frequency < 1:
            raise DeepzipError(f"AGP frequency must be >= 1, got {frequency}")
        self.initial, self.final, self.start, self.end = initial, final, start, end
        self.frequency = frequency
        self.step = 0

    def targets(self, step: int) -> dict[str, float]:
        """Each layer's sparsity target at ``step``."""
        out = {}
        for name in self.layers:
            final = self.per_layer.get(name, self.final)
            out[name] = agp_sparsity(step, min(self.initial, final), final, self.start, self.end)
        return out

    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        s = self.step
        if s < self.start or (s - self.start) % self.frequency and s != self.end:
            return
        if s > self.end:
            return
        targets = self.targets(s)
        if self.global_:  # one magnitude threshold across layers, at the model-wide target
            new = global_masks({n: m.weight.detach() for n, m in self.layers.items()},
                               agp_sparsity(s, self.initial, self.final, self.start, self.end))
        else:
            new = {n: percentile_mask(self.layers[n].weight.detach(), t)
                   for n, t in targets.items()}
        for name, mask in new.items():
            _set_mask(self.layers[name], mask)

    def metrics(self) -> dict[str, float]:
        """Logged by ``fit`` each epoch: the sparsity reached so far, to watch the ramp."""
        return {"sparsity": _zero_fraction(self.layers.values())}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])


def sparsity_of(model: nn.Module, include: list[str] | None = None,
                exclude: list[str] | None = None) -> float:
    """Fraction of zeros over the selected Conv/Linear weights."""
    return _zero_fraction(m for _, m in prunable_layers(model, include, exclude))


def _zero_fraction(modules: Iterable[nn.Module]) -> float:
    total = zeros = 0
    for m in modules:
        total += m.weight.numel()
        zeros += int((m.weight == 0).sum())
    return zeros / total if total else 0.0


def sensitivity(
    model: nn.Module,
    evaluate_fn: Callable[[nn.Module], float],
    levels: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Prune each layer alone at each percentile level and score it (as Distiller does).

    Returns rows ``{layer, level, params, accuracy}``, plus one ``layer="(none)"`` row with
    the unpruned accuracy. ``model`` itself is not changed.
    """
    from tqdm.auto import tqdm

    for v in levels:
        _check_amount("percentile", v)
    work = bake_(copy.deepcopy(model)).eval()
    layers = list(prunable_layers(work, include, exclude))
    rows: list[dict[str, Any]] = [{"layer": "(none)", "level": 0.0, "params": 0,
                                   "accuracy": evaluate_fn(work)}]
    bar = tqdm(total=len(layers) * len(levels), desc="sensitivity", disable=not progress or None)
    for name, m in layers:
        orig = m.weight.detach().clone()
        for q in levels:
            with torch.no_grad():
                m.weight.mul_(percentile_mask(orig, q))
            rows.append({"layer": name, "level": q, "params": orig.numel(),
                         "accuracy": evaluate_fn(work)})
            with torch.no_grad():
                m.weight.copy_(orig)
            bar.update()
    bar.close()
    return rows


def targets_from_sensitivity(rows: list[dict[str, Any]], max_drop: float) -> dict[str, float]:
    """Per layer, the highest level whose accuracy stays within ``max_drop`` of unpruned.

    Levels are taken in order and the scan stops at the first one over budget, so a noisy
    lucky point past a failure is not chosen.
    """
    base = next(r["accuracy"] for r in rows if r["layer"] == "(none)")
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["layer"] != "(none)":
            by_layer.setdefault(r["layer"], []).append(r)
    out = {}
    for layer, layer_rows in by_layer.items():
        best = 0.0
        for r in sorted(layer_rows, key=lambda r: r["level"]):
            if base - r["accuracy"] > max_drop:
                break
            best = r["level"]
        out[layer] = best
    return out


FINETUNE = TrainConfig(epochs=20, lr=0.01, schedule="cosine", weight_decay=5e-4)


def finetune_after_prune(
    model: nn.Module, train_loader: BatchLoader, cfg: TrainConfig = FINETUNE, **fit_kwargs: Any
) -> list[dict[str, Any]]:
    """Masked retraining: :func:`deepzip.train.fit` on a model pruned by :func:`prune_`.

    The masks ride along as ``torch.nn.utils.prune`` reparametrizations, so the gradient of
    every pruned weight is zero and its value stays exactly zero; no extra hook is needed.
    """
    if not masks(model):
        raise DeepzipError("model has no pruning masks; call prune_ or restore_masks_ first")
    return fit(model, train_loader, cfg, **fit_kwargs)


def iterative_prune(
    model: nn.Module,
    steps: list[tuple[PruneConfig, TrainConfig]],
    train_loader: BatchLoader,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Prune, retrain, prune harder, retrain... (e.g. q = 0.5 -> 0.6 -> 0.64).

    Each step checkpoints under ``out_dir/step{i}``; with ``resume`` the steps are
    replayed and each finished one is loaded from its checkpoint instead of retrained.
    """
    history: list[dict[str, Any]] = []
    for i, (pcfg, tcfg) in enumerate(steps, 1):
        sp = prune_(model, pcfg)
        step_dir = Path(out_dir) / f"step{i}" if out_dir is not None else None
        hist = finetune_after_prune(model, train_loader, tcfg, out_dir=step_dir, resume=resume,
                                    desc=f"step {i}/{len(steps)}", **fit_kwargs)
        history += [{"step": i, "method": pcfg.method, "amount": pcfg.amount,
                     "sparsity": sum(sp.values()) / len(sp), **r} for r in hist]
    return history
