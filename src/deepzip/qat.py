"""Quantization-aware training and centroid training for shared weights.

:func:`qat_` trains the latent weights through a straight-through codebook and
re-clusters them as they move (a size budget steers the entropy penalty);
:func:`train_centroids` is Deep Compression's trained quantization: with indices and
masks fixed, autograd of ``codebook[indices] * mask`` gives each centroid the sum of its
weights' gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import DeepzipError
from .kmeans import entropy_constrained, envelope, index_bits, kmeans_1d
from .quantize import QuantizeConfig, fit_penalty_scale, penalties, select_targets
from .targets import SharedWeight, Target, install, shared_parameters
from .train import TrainConfig, fit

__all__ = ["CENTROID_TRAINING", "TrainedSharing", "qat_", "train_centroids"]


class TrainedSharing(nn.Module):
    """Parametrization for quantization-aware training: the forward pass sees
    ``codebook[bucket(w)] * mask``, the backward pass goes straight through to the latent
    weights ``w`` (Bengio et al.'s straight-through estimator), so weights can cross
    from one cluster to another, which centroid training alone never lets them do.
    Buffers have fixed sizes (``2^bits`` centroids, unused ones behind infinite
    thresholds) so a training checkpoint loads back whatever the clustering."""

    def __init__(self, mask: torch.Tensor, bits: int, penalty: float | None = None) -> None:
        super().__init__()
        self.bits, self.preset = bits, penalty  # penalty: see :func:`penalties`
        self.register_buffer("mask", mask)
        like = {"dtype": mask.dtype, "device": mask.device}
        self.register_buffer("codebook", torch.zeros(2 ** bits, **like))
        self.register_buffer("thresholds", torch.full((2 ** bits - 1,), float("inf"), **like))
        self.register_buffer("clusters", torch.zeros((), dtype=torch.long, device=mask.device))
        self.register_buffer("penalty", torch.full((), -1.0, dtype=torch.float64,
                                                   device=mask.device))  # < 0: not yet set

    def assign(self, w: torch.Tensor) -> torch.Tensor:
        return torch.bucketize((w * self.mask).detach().contiguous(), self.thresholds)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wm = w * self.mask
        q = self.codebook[self.assign(w)] * self.mask
        return q + (wm - wm.detach())  # exactly the shared values; gradient to w (masked)

    @torch.no_grad()
    def recluster(self, w: torch.Tensor, config: QuantizeConfig, scale: float = 1.0
                  ) -> np.ndarray:
        """Re-cluster the latent weights; returns the cluster sizes. The first call
        clusters as :func:`quantize_` would and fixes the layer's penalty per bit; later
        ones continue Lloyd's rounds from the current centroids under that same penalty
        (recomputing it from the drifting weights would keep raising it, dropping
        clusters each time), times ``scale`` (the size budget's factor, see
        :func:`qat_`)."""
        v = w[self.mask != 0].detach().double().cpu().numpy()
        if float(self.penalty) < 0:
            r = kmeans_1d(v, self.bits, config.init, seed=config.seed,
                          max_iter=config.max_iter, entropy_weight=config.entropy_weight,
                          penalty=None if self.preset is None else self.preset * scale)
            self.penalty.fill_(r.penalty / scale)
            c = r.centroids
            sizes = np.bincount(r.labels, minlength=len(c)).astype(np.float64)
        elif v.size:
            c, edges, _ = entropy_constrained(
                np.sort(v), self.codebook[:int(self.clusters)].double().cpu().numpy(),
                float(self.penalty) * scale, config.max_iter)
            sizes = np.diff(edges).astype(np.float64)
        else:
            c, sizes = np.zeros(0), np.zeros(0)
        lengths = -np.log2(np.maximum(sizes, 1) / max(sizes.sum(), 1))
        hull, thresholds = envelope(c, lengths, float(self.penalty) * scale)
        self.codebook.zero_()
        self.codebook[:len(hull)] = torch.from_numpy(c[hull]).to(self.codebook)
        self.thresholds.fill_(float("inf"))
        self.thresholds[:len(thresholds)] = torch.from_numpy(thresholds).to(self.thresholds)
        self.clusters.fill_(len(hull))
        return np.bincount(self.assign(w)[self.mask != 0].cpu().numpy(),
                           minlength=len(hull))

    def shared(self, w: torch.Tensor) -> SharedWeight:
        """The fixed sharing this training ended at: same values, same forward pass."""
        k = int(self.clusters)
        return SharedWeight(self.codebook[:k].detach().clone(),
                            self.assign(w) * (self.mask != 0), self.mask, self.bits)


class _Recluster:
    """``fit``'s after-step hook: re-clusters every layer's latent weights every
    ``every`` steps; reports clusters and the order-0 entropy of the indices per epoch.
    With ``config.target_bits`` it steers one factor on all penalties toward the budget
    after each re-clustering (the weights drift under training and the rate with them:
    1.63 -> 1.95 bits per nonzero in 4 epochs at beta 320 on ResNet-20, measured)."""

    def __init__(self, layers: list[tuple[Target, TrainedSharing]], config: QuantizeConfig,
                 every: int, scale: float = 1.0) -> None:
        self.layers, self.config, self.every, self.step = layers, config, every, 0
        self.scale = scale
        self.sizes: list[np.ndarray] = []

    def _cluster(self) -> None:
        self.sizes = [ts.recluster(t.module.parametrizations[t.attr].original, self.config,
                                   self.scale) for t, ts in self.layers]

    def recluster(self) -> None:
        self._cluster()
        target = self.config.target_bits
        if target is not None:  # rate falls about half a bit per doubling of the penalty
            self.scale *= 2.0 ** float(np.clip(2 * (index_bits(self.sizes) - target), -1, 1))

    def __call__(self, _model: nn.Module) -> None:
        self.step += 1
        if self.step % self.every == 0:
            self.recluster()

    def settle(self) -> None:
        """Re-cluster the final weights, raising the factor in small steps until the
        budget holds (the last steered re-clustering was up to ``every`` steps ago)."""
        self.recluster()
        for _ in range(200):
            if self.config.target_bits is None or index_bits(self.sizes) <= \
                    self.config.target_bits:
                return
            self.scale *= 1.03
            self._cluster()
        raise DeepzipError(f"quantization-aware training could not meet target_bits "
                           f"{self.config.target_bits}")

    def state_dict(self) -> dict[str, float]:
        return {"step": self.step, "scale": self.scale}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.step = int(state["step"])
        self.scale = float(state.get("scale", 1.0))

    def metrics(self) -> dict[str, float]:
        sizes = [n[n > 0] for n in self.sizes]
        total = sum(float(n.sum()) for n in sizes)
        bits = sum(float(-(n * np.log2(n / n.sum())).sum()) for n in sizes)
        return {"clusters": sum(len(n) for n in sizes),
                "index_entropy_bits": bits / max(total, 1.0),
                "index_huffman_bits": index_bits(self.sizes),
                **({"penalty_scale": self.scale} if self.config.target_bits else {})}


def qat_(model: nn.Module, train_loader: Iterable[Any], cfg: TrainConfig,
         config: QuantizeConfig, *, recluster_every: int = 50,
         **fit_kwargs: Any) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Quantization-aware training, then weight sharing in place.

    Like :func:`quantize_`, but the weights first train ``cfg.epochs`` epochs (with
    :func:`deepzip.train.fit`; ``fit_kwargs`` go there) while every forward pass uses
    their shared values, re-clustered every ``recluster_every`` steps: the network
    learns to live with the clustering, which matters when entropy-constrained
    clustering (``config.entropy_weight``) leaves few values per layer. Ends with the
    same ``SharedWeight`` layers as :func:`quantize_` (train their centroids further with
    :func:`train_centroids`). Returns (per target ``{bits, clusters}``, fit's history).
    With ``config.target_bits`` the clustering starts at the factor on all penalties that
    meets it, follows the budget while the weights train, and ends within it.

    >>> layers, history = qat_(model, loader, TrainConfig(epochs=4, lr=0.002),
    ...                        QuantizeConfig(bits=6, entropy_weight=300))  # doctest: +SKIP
    """
    if recluster_every < 1:
        raise DeepzipError(f"recluster_every must be >= 1, got {recluster_every}")
    layers = []
    targets = select_targets(model, config)
    pen = penalties(targets, config)
    scale = 1.0 if config.target_bits is None else fit_penalty_scale(targets, config, pen)
    for t in targets:
        w = t.weight.detach()
        ts = TrainedSharing((w != 0).to(w.dtype), config.bits_for(t), pen[t.name])
        install(t, ts)
        layers.append((t, ts))
    hook = _Recluster(layers, config, recluster_every, scale)
    hook.recluster()
    history = fit(model, train_loader, cfg, after_step=hook, **fit_kwargs)
    if config.target_bits is not None:
        hook.settle()
    out = {}
    for t, ts in layers:
        shared = ts.shared(t.module.parametrizations[t.attr].original)
        for m, a in t.owners:
            parametrize.remove_parametrizations(m, a, leave_parametrized=False)
        with torch.no_grad():
            getattr(t.module, t.attr).copy_(shared(None))
        install(t, shared)
        out[t.name] = {"bits": ts.bits, "clusters": int(ts.clusters)}
    return out, history


CENTROID_TRAINING = TrainConfig(epochs=10, lr=0.002, weight_decay=0.0, schedule="cosine")


def train_centroids(model: nn.Module, train_loader: Iterable[Any],
                    cfg: TrainConfig = CENTROID_TRAINING, *, train_other: bool = True,
                    **fit_kwargs: Any) -> list[dict[str, Any]]:
    """Fine-tune the shared values with :func:`deepzip.train.fit`, indices and masks fixed.

    Each centroid's gradient is the sum of its weights' gradients (Deep Compression);
    because that sum runs over hundreds or thousands of weights, each layer's codebook
    trains at ``cfg.lr`` divided by its average cluster size, so a centroid moves about as
    far as one of its weights would. With ``train_other``, the parameters that are not
    shared weights (biases, BatchNorm) train too, at ``cfg.lr``; never the unused original
    weights under the parametrization. Weight decay should be 0: it would pull shared
    values to zero.
    """
    books = dict(shared_parameters(model).values())
    if not books:
        raise DeepzipError("model has no quantized layers; call quantize_ first")

    def select(name: str, _p: nn.Parameter) -> bool:
        return name in books or (train_other and not (
            ".original" in name and "parametrizations." in name))

    def scale(name: str, _p: nn.Parameter) -> float:
        cb = books.get(name)
        if cb is None or cb.codebook.numel() == 0:
            return 1.0
        return cb.codebook.numel() / max(1.0, float(cb.mask.sum()))

    return fit(model, train_loader, cfg, param_filter=select, lr_scale=scale, **fit_kwargs)
