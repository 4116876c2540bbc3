"""Weight sharing of a whole model: each target's weights clustered to a small codebook.

A shared weight is ``codebook[indices] * mask``, installed as a
:class:`~deepzip.targets.SharedWeight` parametrization, so the model stays a standard
module. The clustering is :mod:`deepzip.kmeans` (NumPy); training the shared values
afterwards (Deep Compression's trained quantization, or quantization-aware training) is
:mod:`deepzip.qat`. ``entropy_weight`` and ``target_bits`` trade accuracy for the
Huffman-coded size of the indices; ``sensitivity`` weighs each weight's error by its
Fisher information.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .deprecated import moved
from .errors import DeepzipError
from .kmeans import INITS, MAX_BITS, index_bits, kmeans_1d
from .obs import obs_assign, refit_codebook, with_hessians
from .targets import SharedWeight, Target, bake_, codebooks, dequantize_, install, prunable
from .task import classification_loss, model_input

__all__ = ["INITS", "QuantizeConfig", "SharedWeight", "codebooks", "dequantize_",
           "distinct_nonzero", "fisher_sensitivity", "quantize_", "shared_index_bits"]

# moved in 0.3: the NumPy k-means to deepzip.kmeans, training to deepzip.qat
__getattr__ = moved(__name__, {
    **{n: f"deepzip.kmeans:{n}" for n in ("KMeansResult", "init_centroids", "envelope",
                                          "entropy_constrained")},
    **{n: f"deepzip.qat:{n}" for n in ("CENTROID_TRAINING", "TrainedSharing", "qat_",
                                       "train_centroids")}})


@dataclass
class QuantizeConfig:
    """Bits and k-means settings. ``bits_conv``/``bits_linear`` override ``bits`` for
    convolutions and Linear layers (the paper used more bits for conv than for fully
    connected layers); ``per_layer`` overrides by name pattern. ``include``/``exclude``
    select parameters as in :func:`deepzip.prune.prunable`. ``entropy_weight`` (beta)
    makes the clustering entropy-constrained: a bit of code length is worth beta times
    the layer's plain k-means mean squared error, so ``bits`` becomes a cap and the
    Huffman-coded indices get shorter (see :func:`entropy_constrained`). ``sensitivity``
    (per target name, e.g. from :func:`fisher_sensitivity`) weighs that error by how much
    the loss feels it, so a bit costs the same loss in every layer (see :func:`penalties`).
    ``target_bits`` scales every layer's penalty by one factor until the indices' Huffman
    codes average at most that many bits per nonzero weight: a size budget instead of a
    beta to guess (beta's value then cancels out).

    >>> layers = quantize_(model, QuantizeConfig(bits=5, init="linear"))
    """

    bits: int = 5
    bits_conv: int | None = None
    bits_linear: int | None = None
    per_layer: dict[str, int] = field(default_factory=dict)
    init: str = "linear"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    max_iter: int = 300
    entropy_weight: float = 0.0  # > 0: entropy-constrained clustering (shorter Huffman codes)
    sensitivity: Mapping[str, float] | None = None  # per target: loss per squared weight error
    target_bits: float | None = None  # Huffman bits per nonzero the indices may cost at most

    def __post_init__(self) -> None:
        for b in [self.bits, self.bits_conv, self.bits_linear, *self.per_layer.values()]:
            if b is not None and (not isinstance(b, int) or not 1 <= b <= MAX_BITS):
                raise DeepzipError(f"bits must be integers in 1..{MAX_BITS}, got {b!r}")
        if self.init not in INITS:
            raise DeepzipError(f"k-means init must be one of {INITS}, got {self.init!r}")
        if not (isinstance(self.entropy_weight, (int, float))
                and math.isfinite(self.entropy_weight) and self.entropy_weight >= 0):
            raise DeepzipError(f"entropy_weight must be a finite number >= 0, got "
                               f"{self.entropy_weight!r}")
        if self.sensitivity is not None and not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                for v in self.sensitivity.values()):
            raise DeepzipError("sensitivity values must be finite numbers >= 0")
        if self.target_bits is not None and not (
                isinstance(self.target_bits, (int, float)) and 0 < self.target_bits <= 16
                and self.entropy_weight > 0):
            raise DeepzipError("target_bits must be in (0, 16] and needs entropy_weight > 0")

    def bits_for(self, target: Target) -> int:
        for pattern, b in self.per_layer.items():
            if target.matches([pattern]):
                return b
        if isinstance(target.module, nn.Linear) and self.bits_linear is not None:
            return self.bits_linear
        if isinstance(target.module, nn.modules.conv._ConvNd) and self.bits_conv is not None:
            return self.bits_conv
        return self.bits


def quantize_(model: nn.Module, config: QuantizeConfig, *,
              calibration: Iterable[Any] | None = None, calibration_batches: int = 1
              ) -> dict[str, dict[str, Any]]:
    """Share weights in place: each selected parameter's nonzero values -> a k-means
    codebook. Pruning masks are baked first; zeros stay zero and are not a cluster.
    Returns per target ``{bits, clusters, error, iterations}``.

    With ``calibration`` (``calibration_batches`` batches of the model's inputs), the
    clusters are chosen for the layer's outputs, not its weights, where a layer allows it
    (a Linear or an ungrouped Conv2d; :mod:`deepzip.obs`): k-means gives the shared
    values, then each weight's cluster is chosen as GPTQ rounds (its error spread over
    the weights not yet rounded; an entropy-constrained clustering's code lengths still
    priced in) and the shared values refitted by least squares on the layer's outputs. A
    group of layers per calibration pass, each pass seeing the layers shared before it:
    post-training sharing, for models that cannot be retrained.

    >>> layers = quantize_(model, QuantizeConfig(bits=4), calibration=train_loader,
    ...                    calibration_batches=8)
    """
    out = {}
    targets = select_targets(model, config)
    pen = penalties(targets, config)
    if config.target_bits is not None:
        scale = fit_penalty_scale(targets, config, pen)
        pen = {k: v * scale for k, v in pen.items()}
    pairs = (with_hessians(model, targets, calibration, calibration_batches)
             if calibration is not None else ((t, None) for t in targets))
    for t, h in pairs:
        name = t.name
        bits = config.bits_for(t)
        w = t.weight.detach()
        mask = w != 0
        r = kmeans_1d(w[mask], bits, config.init, seed=config.seed, max_iter=config.max_iter,
                      entropy_weight=config.entropy_weight, penalty=pen[name])
        indices = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        indices[mask] = torch.from_numpy(r.labels.astype(np.uint8)).to(w.device)
        codebook = torch.from_numpy(r.centroids).to(w)
        if h is not None and len(codebook):
            indices, codebook = _reconstruct(w, mask, h, codebook, indices, pen[name])
        install(t, SharedWeight(codebook, indices, mask, bits))
        out[name] = {"bits": bits, "clusters": len(r.centroids), "error": r.error,
                     "iterations": r.iterations}
    return out


def _reconstruct(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, codebook: torch.Tensor,
                 indices: torch.Tensor, penalty: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's assignment (code lengths priced at ``penalty`` per bit, as the clustering
    priced them), then the least-squares shared values: (indices, codebook)."""
    flat = w.reshape(len(w), -1)
    cost = None
    if penalty:
        counts = torch.bincount(indices[mask].long(), minlength=len(codebook)).double()
        cost = (penalty * -torch.log2((counts / counts.sum()).clamp_min(1e-12))).to(w)
    idx = obs_assign(flat, h, codebook, mask.reshape(len(w), -1), cost=cost)
    codebook = refit_codebook(flat, idx, mask, h, codebook)
    return idx.reshape(w.shape).to(torch.uint8), codebook


def shared_index_bits(model: nn.Module) -> float:
    """The Huffman bits per nonzero weight's index that a shared model's indices cost
    (what ``target_bits`` bounds), over all its shared layers."""
    return index_bits(np.bincount(cb.indices[cb.mask].cpu().numpy().astype(np.int64))
                      for cb in codebooks(model).values())


def select_targets(model: nn.Module, config: QuantizeConfig) -> list[Target]:
    """The parameters ``config`` selects, masks baked; none may be quantized already."""
    bake_(model)
    targets = prunable(model, config.include, config.exclude)
    if not targets:
        raise DeepzipError("no prunable parameters match the include/exclude patterns")
    for pat in config.per_layer:
        if not any(t.matches([pat]) for t in targets):
            raise DeepzipError(f"per_layer {pat!r} names no quantizable parameter")
    for t in targets:
        if parametrize.is_parametrized(t.module, t.attr):
            raise DeepzipError(f"{t.name} is already quantized; dequantize_ it first")
    return targets


def penalties(targets: list[Target], config: QuantizeConfig) -> dict[str, float | None]:
    """Per target, the squared error one bit of code length is worth in entropy-constrained
    clustering (None without ``entropy_weight``). Without ``config.sensitivity``:
    ``entropy_weight`` times the layer's own plain k-means mean squared error (equal
    relative error everywhere, as :func:`kmeans_1d` would take). With it:
    ``entropy_weight`` times the model's sensitivity-weighted mean k-means error, divided
    by the layer's sensitivity, so the bits go where the loss feels the error (Choi et
    al. 2017 weigh each weight by the Hessian; this is that per layer). On the default's
    pruned ResNet-20, right after clustering: 89.6% with 8.9 KB of indices and codebooks
    against plain's 88.0% with 8.8 KB (``experiments/levers.py --tables 3``,
    ``results/ablations/sensitivity.txt``)."""
    if not config.entropy_weight:
        return {t.name: None for t in targets}
    errors, sizes = {}, {}
    for t in targets:
        w = t.weight.detach()
        v = w[w != 0]
        errors[t.name] = kmeans_1d(v, config.bits_for(t), config.init, seed=config.seed,
                                   max_iter=config.max_iter).error
        sizes[t.name] = max(v.numel(), 1)
    beta = config.entropy_weight
    top = max([float(v) for v in (config.sensitivity or {}).values()] + [0.0])
    if config.sensitivity is None or top <= 0:
        return {k: beta * e / sizes[k] for k, e in errors.items()}
    missing = [t.name for t in targets if t.name not in config.sensitivity]
    if missing:
        raise DeepzipError(f"sensitivity has no value for {', '.join(missing[:5])}")
    sens = {k: max(float(config.sensitivity[k]), top * 1e-6) for k in errors}
    mean = sum(sens[k] * e for k, e in errors.items()) / sum(sizes.values())
    return {k: beta * mean / sens[k] for k in errors}


def fit_penalty_scale(targets: list[Target], config: QuantizeConfig,
               pen: Mapping[str, float | None], rounds: int = 30) -> float:
    """The smallest factor on every penalty (found by bisection in log scale) whose
    clustering of the current weights costs at most ``config.target_bits``."""
    values = [(t.weight.detach(), config.bits_for(t), pen[t.name]) for t in targets]

    def cost(scale: float) -> float:
        return index_bits(np.bincount(kmeans_1d(
            w[w != 0], b, config.init, seed=config.seed, max_iter=config.max_iter,
            penalty=p * scale).labels) for w, b, p in values if p is not None)

    lo, hi = 2.0 ** -12, 2.0 ** 12  # at the top every layer is one cluster: 0 bits
    if cost(lo) <= config.target_bits:
        return lo
    for _ in range(rounds):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cost(mid) > config.target_bits else (lo, mid)
    return hi


def fisher_sensitivity(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                       = classification_loss, *, max_batches: int = 40,
                       include: list[str] | None = None, exclude: list[str] | None = None
                       ) -> dict[str, float]:
    """Per prunable parameter, the mean squared gradient of the loss over its nonzero
    weights, averaged over up to ``max_batches`` batches (the diagonal of the empirical
    Fisher information, per layer): about how much the loss grows per unit of squared
    error in that layer's weights. Evaluation mode, fp32; pruning masks are baked. Each
    layer's gradient is consumed as soon as it is complete, so memory holds one layer's
    gradient at a time (a big model's would double it).

    >>> s = fisher_sensitivity(model, loader)
    >>> cfg = QuantizeConfig(bits=6, entropy_weight=300, sensitivity=s)
    >>> layers = quantize_(model, cfg)
    """
    bake_(model)
    targets = prunable(model, include, exclude)
    device = next(model.parameters()).device
    sums = dict.fromkeys((t.name for t in targets), 0.0)

    def accumulate(name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:  # as soon as the layer's gradient is complete
            live = p.detach() != 0
            if p.grad is not None and bool(live.any()):
                sums[name] += float((p.grad[live].double() ** 2).mean())
            p.grad = None  # one layer's gradient at a time, never the whole model's
        return hook

    measured = {id(t.weight) for t in targets}
    frozen = [p for p in model.parameters() if id(p) not in measured and p.requires_grad]
    hooks = [t.weight.register_post_accumulate_grad_hook(accumulate(t.name))
             for t in targets if t.weight.requires_grad]
    was, n = model.training, 0
    model.eval()
    try:
        for p in frozen:  # biases, norms: no gradient needed
            p.requires_grad_(False)
        for x, y in itertools.islice(batches, max_batches):
            model.zero_grad(set_to_none=True)
            loss_fn(model(model_input(x, device)), y.to(device)).backward()
            n += 1
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model.train(was)
    if not n:
        raise DeepzipError("no batches to measure the sensitivity on")
    return {k: v / n for k, v in sums.items()}


def distinct_nonzero(model: nn.Module) -> dict[str, int]:
    """Distinct nonzero values per prunable parameter (<= 2^bits after quantization)."""
    out = {}
    for t in prunable(model):
        w = t.weight.detach()
        out[t.name] = int(torch.unique(w[w != 0]).numel())
    return out
