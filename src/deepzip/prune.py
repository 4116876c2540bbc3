"""Magnitude pruning: thresholds and masks (pure functions) under thin ``nn.Module`` adapters.

What can be pruned (and shared, by :mod:`deepzip.quantize`) is any floating parameter of
two or more dimensions (a :class:`Target`); by default those of Conv, Linear, Embedding,
attention and RNN/LSTM/GRU layers, and with ``include`` patterns any other. Masks live in
the model as :class:`deepzip.targets.Mask` parametrizations (``original * mask``, a bool
mask: a quarter of the weights' bytes), so a pruned model is still a standard module,
gradients of pruned weights are zero, and pruned weights stay exactly zero through
training with momentum and weight decay. :func:`bake_`
turns the masked weights back into plain weights with exact zeros; a baked model carries
its masks as those zeros (:func:`restore_masks_`).

A tensor tied under several names (a language model's embedding and output layer) is
one target, named after its first owner: its mask and codebook go on every owner, so it
is pruned and shared once, stays tied, is stored once in a ``.dzip`` and re-tied on load.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import DeepzipError
from .obs import obs_prune, with_hessians
from .targets import (
    Target,
    bake_,
    is_pruned,
    masks,
    prunable,
    restore_masks_,
    set_mask,
    underlying,
)
from .train import TrainConfig, calibrate, fit

__all__ = [
    "AGPSchedule",
    "PruneConfig",
    "Target",
    "agp_sparsity",
    "bake_",
    "finetune_after_prune",
    "global_masks",
    "is_pruned",
    "mask_smallest",
    "masks",
    "input_norms",
    "percentile_mask",
    "prunable",
    "prune_",
    "restore_masks_",
    "row_mask",
    "sensitivity",
    "smallest_masks",
    "sparsity_of",
    "std_mask",
    "std_threshold",
    "targets_from_sensitivity",
    "wanda_scores",
]

METHODS = ("percentile", "std", "global", "wanda", "sparsegpt")


# ---------------------------------------------------------------- functional core
def mask_smallest(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (1 keep, 0 prune) that prunes exactly the ``k`` smallest-magnitude entries.

    Ties at the threshold are broken by position, so the count is exact.
    """
    n = w.numel()
    if not 0 <= k <= n:
        raise DeepzipError(f"cannot prune {k} of {n} weights")
    return next(smallest_masks([w], k)).to(w.dtype)


def _magnitude_bits(w: torch.Tensor) -> Iterator[torch.Tensor]:
    """|w| as float32 bit patterns (int32), a chunk at a time: for non-negative floats,
    integer order is magnitude order, so a threshold can be found by counting, without
    sorting, and never with more than a chunk's temporaries."""
    flat = w.detach().reshape(-1)
    for chunk in flat.split(_CHUNK):
        yield chunk.abs().float().view(torch.int32)


_CHUNK = 1 << 22


def _threshold(weights: Sequence[torch.Tensor], k: int) -> tuple[int, int]:
    """(t, ties): the k smallest magnitudes among all ``weights`` are those whose bit
    pattern is below t, and the first ``ties`` equal to t. Two passes of radix counting:
    the top 16 bits, then the low 16 within the threshold's bucket."""
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for w in weights:
        for b in _magnitude_bits(w):
            hist += torch.bincount(b >> 16, minlength=1 << 16).cpu()
    top = int(torch.searchsorted(hist.cumsum(0), k))  # the bucket holding the k-th value
    below = int(hist[:top].sum())
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for w in weights:
        for b in _magnitude_bits(w):
            low += torch.bincount(b[(b >> 16) == top] & 0xFFFF, minlength=1 << 16).cpu()
    bottom = int(torch.searchsorted(low.cumsum(0), k - below))
    return (top << 16) | bottom, k - below - int(low[:bottom].sum())


def _keep(w: torch.Tensor, threshold: int, ties: int) -> tuple[torch.Tensor, int]:
    """(w's boolean keep-mask, the ties left for the tensors after it)."""
    keep = torch.empty(w.numel(), dtype=torch.bool, device=w.device)
    at = 0
    for b in _magnitude_bits(w):
        part = keep[at:at + len(b)]
        torch.gt(b, threshold, out=part)
        equal = b == threshold
        if ties > 0:
            where = torch.nonzero(equal).flatten()
            equal[where[:ties]] = False  # these are pruned; the later equal ones kept
            ties -= min(ties, len(where))
        part |= equal
        at += len(b)
    return keep.view(w.shape), ties


def smallest_masks(weights: Sequence[torch.Tensor], k: int) -> Iterator[torch.Tensor]:
    """Boolean keep-masks, one tensor at a time, over several tensors together that prune
    exactly the ``k`` smallest magnitudes among all of them (ties by position: tensor
    order, then index).

    An exact selection in time linear in the number of weights and memory of one chunk's
    temporaries plus the mask being yielded: never a sorted or concatenated copy of the
    weights (a 1B-parameter model's would be gigabytes).
    """
    total = sum(w.numel() for w in weights)
    if not 0 <= k <= total:
        raise DeepzipError(f"cannot prune {k} of {total} weights")
    threshold, ties = _threshold(weights, k) if k else (-1, 0)
    for w in weights:
        mask, ties = _keep(w, threshold, ties)
        yield mask


def percentile_mask(w: torch.Tensor, q: float) -> torch.Tensor:
    """Prune the fraction ``q`` in [0, 1) of smallest-magnitude weights of one layer."""
    if not 0 <= q < 1:
        raise DeepzipError(f"percentile q must be in [0, 1), got {q}")
    return mask_smallest(w, round(q * w.numel()))


def kernel_scores(w: torch.Tensor, exponent: float) -> torch.Tensor:
    """Pruning scores that favour whole empty kernels: ``|w| * (r / mean r)^exponent``,
    r the L2 norm of the weight's kernel (its spatial slice ``w[o, i]`` of a convolution),
    rescaled to the mean of ``|w|``.

    Weights in weak kernels go first, so the nonzeros gather in fewer kernels and the
    mask costs fewer bits to store for the same count; 0 is plain magnitude. Tensors
    without kernels (Linear, 1x1 convolutions) score ``|w|``. The rescaling keeps one
    global threshold fair between layers: without it the strong kernels' inflated scores
    raise the threshold until a classifier scored by ``|w|`` alone is pruned away
    entirely (measured: ResNet-20's, at 88% sparsity and exponent 4, and the run
    collapsed to chance).
    """
    a = w.detach().abs()
    if not exponent or w.dim() < 3 or math.prod(w.shape[2:]) == 1:
        return a
    r = a.flatten(2).norm(dim=2).view(*w.shape[:2], *([1] * (w.dim() - 2)))
    mean = r.mean()
    if mean == 0:
        return a
    s = a * (r / mean) ** exponent
    return s * (a.mean() / s.mean())


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
    n = sum(w.numel() for w in weights.values())
    keep = smallest_masks(list(weights.values()), round(sparsity * n))
    return {name: m.to(w.dtype) for (name, w), m in zip(weights.items(), keep, strict=True)}


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

    ``amount`` is q (percentile), s (std), the model-wide sparsity (global) or, for
    ``wanda`` (Sun et al. 2023: pruning without retraining), the fraction of each output
    row pruned by |weight| x the norm of its input feature on calibration data
    (:func:`prune_`'s ``calibration``), and for ``sparsegpt`` (Frantar & Alistarh 2023) the
    fraction of each layer pruned with the remaining weights updated to keep the layer's
    outputs on that data (:mod:`deepzip.obs`).
    ``include``/``exclude`` are glob patterns over layer and parameter names (e.g.
    ``"conv1"``, ``"linear"``, ``"lstm.weight_hh_*"``; default: see :func:`prunable`);
    ``per_layer`` maps patterns to amounts that override ``amount``.

    >>> sparsity = prune_(model, PruneConfig("percentile", 0.5, exclude=["linear"]))
    """

    method: str = "percentile"
    amount: float = 0.5
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    per_layer: dict[str, float] = field(default_factory=dict)
    n_m: str | None = None  # "2:4": of every M weights along a row, keep the N best
    allocate: str = "layer"  # wanda, sparsegpt: "global" prunes each layer as much as
    # one magnitude threshold across layers would (small, sensitive layers keep more)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DeepzipError(f"pruning method must be one of {METHODS}, got {self.method!r}")
        if self.allocate not in ("layer", "global"):
            raise DeepzipError(f"allocate must be layer or global, got {self.allocate!r}")
        if self.allocate == "global" and (self.method not in ("wanda", "sparsegpt")
                                          or self.n_m is not None or self.per_layer):
            raise DeepzipError("allocate: global applies to wanda and sparsegpt amounts, "
                               "without n_m or per_layer")
        if self.n_m is not None:
            n, m = _n_m(self.n_m)
            if self.method in ("std", "global") or self.per_layer:
                raise DeepzipError("n_m applies to percentile (magnitude), wanda and "
                                   "sparsegpt pruning, without per_layer amounts")
            self.amount = 1 - n / m
        if self.method == "global" and self.per_layer:
            raise DeepzipError("per_layer amounts do not apply to global pruning")
        for v in [self.amount, *self.per_layer.values()]:
            _check_amount(self.method, v)


def _n_m(text: str) -> tuple[int, int]:
    """"2:4" -> (2, 4): N of every M kept, 0 < N < M <= 64."""
    try:
        n, m = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise DeepzipError(f"n_m {text!r}: write N:M, e.g. 2:4") from None
    if not 0 < n < m <= 64:
        raise DeepzipError(f"n_m {text!r}: needs 0 < N < M <= 64")
    return n, m


def _check_amount(method: str, v: float) -> None:
    if method == "std":
        std_threshold(torch.zeros(1), v)
    elif not (isinstance(v, (int, float)) and 0 <= v < 1):
        raise DeepzipError(f"{method} pruning amount must be in [0, 1), got {v}")


def per_target(targets: Sequence[Target], per_layer: Mapping[str, float],
               default: float) -> dict[str, float]:
    """Each target's amount: the first ``per_layer`` pattern it matches, else ``default``.
    A pattern that matches none of ``targets`` is an error."""
    for pat in per_layer:
        if not any(t.matches([pat]) for t in targets):
            raise DeepzipError(f"per_layer {pat!r} names no prunable parameter; they are: "
                               + ", ".join(t.name for t in targets))
    return {t.name: next((v for p, v in per_layer.items() if t.matches([p])), default)
            for t in targets}


def prune_(model: nn.Module, config: PruneConfig, *, bake: bool = False,
           calibration: Iterable[Any] | None = None, calibration_batches: int = 1
           ) -> dict[str, float]:
    """Prune ``model`` in place; return each pruned parameter's sparsity, by target name.

    Already-pruned targets keep their zeros: the new mask is computed on the current
    (masked) weights and multiplied into the old one, so percentile q means total sparsity.
    ``bake=True`` (no retraining follows) zeroes the pruned weights in place and keeps no
    masks: no memory beyond the model's own but one layer's temporaries and a bit per
    weight, where masks (for retraining) hold a byte per weight.

    ``wanda`` reads ``calibration_batches`` batches of ``calibration`` (``(inputs, _)``
    batches, as the model takes them) through the model once, to weigh each weight by its
    input feature's norm; ``sparsegpt`` reads them once per group of layers whose
    Hessians fit :data:`deepzip.obs.HESSIAN_BYTES`, each group pruned (and its remaining
    weights updated) before the next group's pass.

    >>> sparsity = prune_(model, PruneConfig("global", 0.9), bake=True)
    >>> round(sparsity_of(model), 2)
    0.9
    >>> sparsity = prune_(model, PruneConfig("wanda", 0.5), calibration=train_loader)
    """
    if bake:
        bake_(model)
    targets = prunable(model, config.include, config.exclude)
    if config.method in ("wanda", "sparsegpt"):
        if calibration is None:
            raise DeepzipError(f"{config.method} pruning weighs weights by their inputs: "
                               "pass calibration=a loader of the model's inputs")
        targets = [t for t in targets if not _lookup(t)]
    if not targets:
        raise DeepzipError("no prunable parameters match the include/exclude patterns"
                           + (f" ({config.method} leaves embeddings and tied weights dense)"
                              if config.method in ("wanda", "sparsegpt") else ""))
    weights = [underlying(t).detach() for t in targets]  # masked: zeros already there
    amounts = global_amounts(weights, targets, config.amount) if config.allocate == "global" \
        else per_target(targets, config.per_layer, config.amount)
    if config.method == "sparsegpt":
        keep = _obs_masks(model, targets, amounts, config.n_m, calibration,
                          calibration_batches)
    elif config.method == "wanda":
        norms = input_norms(model, targets, calibration, calibration_batches)
        keep = (row_mask(wanda_scores(w, norms.get(t.name), t.module), amounts[t.name],
                         config.n_m) for t, w in zip(targets, weights, strict=True))
    elif config.n_m is not None:  # magnitude, N of every M
        keep = (row_mask(w.abs(), config.amount, config.n_m) for w in weights)
    elif config.method == "global":
        n = sum(w.numel() for w in weights)
        keep = smallest_masks(weights, round(config.amount * n))
    else:
        keep = (_layer_mask(w, config.method, amounts[t.name])
                for t, w in zip(targets, weights, strict=True))
    out = {}
    for t, mask in zip(targets, keep, strict=True):  # one mask at a time
        if bake:
            with torch.no_grad():
                t.weight.masked_fill_(~mask, 0)
        else:
            mask = set_mask(t, mask)
        out[t.name] = 1 - int(torch.count_nonzero(mask)) / mask.numel()
    return out


def _lookup(t: Target) -> bool:
    """An embedding, or a tensor tied to one (a language model's output layer): rows read
    one at a time, with no inputs to weigh them by. Wanda and SparseGPT leave these dense
    (so do their authors): pruned by magnitude per row at 50%, the tied embedding of
    examples/stdlib_lm.py's model took its validation perplexity from 3.18 to 4.18."""
    return bool(t.also) or isinstance(t.module, (nn.Embedding, nn.EmbeddingBag))


def global_amounts(weights: Sequence[torch.Tensor], targets: Sequence[Target],
                   amount: float) -> dict[str, float]:
    """Each target's sparsity under one magnitude threshold that prunes ``amount`` of all
    their weights together: the allocation of ``global`` pruning, for methods that choose
    the weights within each layer themselves."""
    n = round(amount * sum(w.numel() for w in weights))
    return {t.name: 1 - int(torch.count_nonzero(m)) / m.numel()
            for t, m in zip(targets, smallest_masks(weights, n), strict=True)}


def _obs_masks(model: nn.Module, targets: Sequence[Target], amounts: Mapping[str, float],
               n_m: str | None, calibration: Iterable[Any], batches: int
               ) -> Iterator[torch.Tensor]:
    """SparseGPT's keep-masks in ``targets``' order, each target's weights updated in place
    as it is pruned (before the next group's pass reads the pruned model's activations);
    layers it cannot reconstruct (embeddings, tied, grouped convolutions) or that no
    calibration batch reached get magnitude per row."""
    pattern = _n_m(n_m) if n_m is not None else None
    for t, h in with_hessians(model, targets, calibration, batches):
        w = t.weight.detach()
        if h is None:
            yield row_mask(w.abs(), amounts[t.name], n_m)
            continue
        new, keep = obs_prune(w.reshape(len(w), -1), h, amounts[t.name], pattern)
        with torch.no_grad():
            underlying(t).copy_(new.reshape(w.shape))
        yield keep.reshape(w.shape)


def row_mask(scores: torch.Tensor, amount: float, n_m: str | None = None) -> torch.Tensor:
    """Keep-mask that prunes the ``amount`` lowest-scoring entries of each output row
    (``scores[o]``, flattened): Wanda compares weights within a row, not across layers.
    With ``n_m`` ("2:4"), of every M consecutive weights of a row the N best are kept
    (a row's tail shorter than M keeps the same share), the pattern sparse kernels run."""
    rows = scores.reshape(len(scores), -1) if scores.dim() > 1 else scores.reshape(1, -1)
    if n_m is not None:
        n, m = _n_m(n_m)
        whole = rows.shape[1] // m * m
        keep = torch.ones(rows.shape, dtype=torch.bool, device=scores.device)
        if whole:
            groups = rows[:, :whole].reshape(len(rows), -1, m)
            drop = groups.topk(m - n, dim=2, largest=False).indices
            kept = torch.ones(groups.shape, dtype=torch.bool, device=scores.device)
            keep[:, :whole] = kept.scatter_(2, drop, False).reshape(len(rows), whole)
        if whole < rows.shape[1]:
            keep[:, whole:] = row_mask(rows[:, whole:], 1 - n / m)
        return keep.reshape(scores.shape)
    k = round(amount * rows.shape[1])
    keep = torch.ones(rows.shape, dtype=torch.bool, device=scores.device)
    if k:
        keep.scatter_(1, rows.topk(k, dim=1, largest=False).indices, False)
    return keep.reshape(scores.shape)


def wanda_scores(w: torch.Tensor, norms: torch.Tensor | None, module: nn.Module
                 ) -> torch.Tensor:
    """|w| times the l2 norm of the input feature each weight multiplies (a Linear's input
    column; a convolution's input channel, the same for every kernel position); |w| alone
    where the layer's inputs were not seen (an embedding)."""
    score = w.detach().abs().float()
    if norms is None or w.dim() < 2:
        return score
    if isinstance(module, nn.modules.conv._ConvNd):
        per_group = w.shape[1]  # input channels each output sees
        out_per_group = w.shape[0] // module.groups
        group = torch.arange(w.shape[0], device=w.device) // out_per_group
        channel = group[:, None] * per_group + torch.arange(per_group, device=w.device)
        scale = norms.to(w.device)[channel]  # (out, in per group)
        return score * scale.reshape(*scale.shape, *([1] * (w.dim() - 2)))
    if norms.numel() != w.shape[-1]:
        return score
    return score * norms.to(w.device)


@torch.no_grad()
def input_norms(model: nn.Module, targets: Sequence[Target], calibration: Iterable[Any],
                batches: int = 1) -> dict[str, torch.Tensor]:
    """The l2 norm of each input feature of each target's layer over ``batches`` batches
    of ``calibration`` (for a convolution, per input channel over batch and positions):
    Wanda's ``||X_j||``. One forward pass per batch, a vector per layer kept."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str, conv: bool) -> Callable[..., None]:
        def record(_m: nn.Module, inputs: tuple[Any, ...], _out: Any) -> None:
            x = inputs[0].detach().float()
            sq = (x.pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1) if conv
                  else x.pow(2).reshape(-1, x.shape[-1]).sum(0))
            sums[name] = sums[name] + sq if name in sums else sq
        return record

    for t in targets:
        if isinstance(t.module, (nn.Linear, nn.modules.conv._ConvNd)) and t.attr == "weight":
            hooks.append(t.module.register_forward_hook(
                hook(t.name, isinstance(t.module, nn.modules.conv._ConvNd))))
    was = model.training
    model.eval()
    try:
        calibrate(model, calibration, batches)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {k: v.sqrt() for k, v in sums.items()}


def _layer_mask(w: torch.Tensor, method: str, amount: float) -> torch.Tensor:
    _check_amount(method, amount)
    if method == "percentile":
        return next(smallest_masks([w], round(amount * w.numel())))
    return w.abs() >= std_threshold(w, amount)


class AGPSchedule:
    """Automated gradual pruning (Zhu & Gupta 2017) as an ``after_step`` hook for ``fit``.

    Every ``frequency`` optimizer steps between ``start`` and ``end``, each target is pruned
    to its goal on the cubic ramp from ``initial`` to its final sparsity (``final``, or
    the first ``per_layer`` pattern it matches); with ``global_``, one threshold across all
    targets meets the model-wide goal instead, so big redundant layers give up more. Masks
    only grow, so pruned weights never come back.

    >>> agp = AGPSchedule(model, final=0.8, start=0, end=2)
    >>> history = fit(model, loader, cfg, after_step=agp)  # doctest: +ELLIPSIS
    train epoch 1/1 lr=0.01 ... sparsity=0.8
    """

    def __init__(self, model: nn.Module, final: float, start: int, end: int, *,
                 initial: float = 0.0, frequency: int = 100,
                 per_layer: Mapping[str, float] | None = None, global_: bool = False,
                 include: list[str] | None = None, exclude: list[str] | None = None,
                 kernel_exponent: float = 0.0) -> None:
        self.targets_ = prunable(model, include, exclude)
        if not (math.isfinite(kernel_exponent) and kernel_exponent >= 0):
            raise DeepzipError(f"AGP kernel_exponent must be >= 0, got {kernel_exponent}")
        self.kernel_exponent = kernel_exponent
        if global_ and per_layer:
            raise DeepzipError("AGP: per-layer targets do not combine with global pruning")
        self.global_ = global_
        for v in [initial, final, *(per_layer or {}).values()]:
            _check_amount("percentile", v)
        if frequency < 1:
            raise DeepzipError(f"AGP frequency must be >= 1, got {frequency}")
        self.finals = per_target(self.targets_, per_layer or {}, final)
        self.initial, self.final, self.start, self.end = initial, final, start, end
        self.frequency = frequency
        self.step = 0

    def targets(self, step: int) -> dict[str, float]:
        """Each target's sparsity goal at ``step``."""
        return {n: agp_sparsity(step, min(self.initial, f), f, self.start, self.end)
                for n, f in self.finals.items()}

    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        s = self.step
        if s < self.start or (s - self.start) % self.frequency and s != self.end:
            return
        if s > self.end:
            return
        scores = {t.name: kernel_scores(t.weight, self.kernel_exponent) for t in self.targets_}
        if self.global_:  # one magnitude threshold across targets, at the model-wide goal
            new = global_masks(scores, agp_sparsity(s, self.initial, self.final, self.start,
                                                    self.end))
        else:
            goals = self.targets(s)
            new = {t.name: percentile_mask(scores[t.name], goals[t.name])
                   for t in self.targets_}
        for t in self.targets_:
            set_mask(t, new[t.name])

    def metrics(self) -> dict[str, float]:
        """Logged by ``fit`` each epoch: the sparsity reached so far, to watch the ramp."""
        return {"sparsity": _zero_fraction(self.targets_)}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])


def sparsity_of(model: nn.Module, include: list[str] | None = None,
                exclude: list[str] | None = None) -> float:
    """Fraction of zeros over the prunable parameters (see :func:`prunable`)."""
    return _zero_fraction(prunable(model, include, exclude))


def _zero_fraction(targets: Iterable[Target]) -> float:
    total = zeros = 0
    for t in targets:
        w = t.weight
        total += w.numel()
        zeros += int((w == 0).sum())
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
    """Prune each target alone at each percentile level and score it (as Distiller does).

    Returns rows ``{layer, level, params, accuracy}`` (``accuracy``: whatever
    ``evaluate_fn`` scores), plus one ``layer="(none)"`` row unpruned. ``model`` itself is
    not changed.
    """
    from tqdm.auto import tqdm

    for v in levels:
        _check_amount("percentile", v)
    work = bake_(copy.deepcopy(model)).eval()
    targets = prunable(work, include, exclude)
    rows: list[dict[str, Any]] = [{"layer": "(none)", "level": 0.0, "params": 0,
                                   "accuracy": evaluate_fn(work)}]
    bar = tqdm(total=len(targets) * len(levels), desc="sensitivity",
               disable=not progress or None)
    for t in targets:
        w = t.weight
        orig = w.detach().clone()
        for q in levels:
            with torch.no_grad():
                w.mul_(percentile_mask(orig, q))
            rows.append({"layer": t.name, "level": q, "params": orig.numel(),
                         "accuracy": evaluate_fn(work)})
            with torch.no_grad():
                w.copy_(orig)
            bar.update()
    bar.close()
    return rows


def targets_from_sensitivity(rows: list[dict[str, Any]], max_drop: float, *,
                             higher_is_better: bool = True) -> dict[str, float]:
    """Per layer, the highest level whose score stays within ``max_drop`` of unpruned
    (below it for a higher-is-better metric, above it for an error).

    Levels are taken in order and the scan stops at the first one over budget, so a noisy
    lucky point past a failure is not chosen.
    """
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise DeepzipError(f"sensitivity budget must be a finite number >= 0, got {max_drop!r}")
    sign = 1 if higher_is_better else -1
    base = next(r["accuracy"] for r in rows if r["layer"] == "(none)")
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["layer"] != "(none)":
            by_layer.setdefault(r["layer"], []).append(r)
    out = {}
    for layer, layer_rows in by_layer.items():
        best = 0.0
        for r in sorted(layer_rows, key=lambda r: r["level"]):
            if sign * (base - r["accuracy"]) > max_drop:
                break
            best = r["level"]
        out[layer] = best
    return out


FINETUNE = TrainConfig(epochs=20, lr=0.01, schedule="cosine", weight_decay=5e-4)


def finetune_after_prune(
    model: nn.Module, train_loader: Iterable[Any], cfg: TrainConfig = FINETUNE, **fit_kwargs: Any
) -> list[dict[str, Any]]:
    """Masked retraining: :func:`deepzip.train.fit` on a model pruned by :func:`prune_`.

    The masks ride along as parametrizations, so the gradient of every pruned weight is
    zero and its value stays exactly zero; no extra hook is needed.
    """
    if not masks(model):
        raise DeepzipError("model has no pruning masks; call prune_ or restore_masks_ first")
    return fit(model, train_loader, cfg, **fit_kwargs)
