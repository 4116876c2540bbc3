"""Weight sharing: per-layer 1-D k-means (pure functions) and trained centroids (adapters).

The functional core exploits the 1-D structure: values are sorted once, each cluster is
then a contiguous run, assignment is ``searchsorted`` on centroid midpoints, and cluster
sums come from prefix sums, so one Lloyd iteration costs O(k log n) after the sort.

A quantized layer's weight is ``codebook[indices] * mask``, installed as a PyTorch
parametrization. Autograd of that gather gives each centroid the sum of the gradients of
the weights assigned to it: the trained quantization of Deep Compression, with the
indices and the pruning mask fixed.
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

from .data import BatchLoader
from .errors import DeepzipError
from .huffman import code_lengths
from .prune import Target, bake_, prunable
from .task import classification_loss, model_input
from .train import TrainConfig, fit

__all__ = [
    "INITS",
    "KMeansResult",
    "QuantizeConfig",
    "SharedWeight",
    "TrainedSharing",
    "codebooks",
    "dequantize_",
    "distinct_nonzero",
    "entropy_constrained",
    "init_centroids",
    "envelope",
    "kmeans_1d",
    "qat_",
    "quantize_",
    "train_centroids",
]

INITS = ("linear", "kmeans++", "random", "density", "optimal")
MAX_BITS = 8


@dataclass
class KMeansResult:
    """Sorted ``centroids`` (K <= 2^bits), ``labels`` per input value, squared ``error``."""

    centroids: np.ndarray
    labels: np.ndarray
    error: float
    iterations: int
    penalty: float = 0.0  # entropy-constrained: squared error one bit of code length is worth


class _Sorted:
    """Sorted values with prefix sums of x and x^2: O(1) sum and SSE of any run."""

    def __init__(self, values: np.ndarray) -> None:
        self.v = np.sort(values.astype(np.float64))
        self.s1 = np.concatenate([[0.0], np.cumsum(self.v)])
        self.s2 = np.concatenate([[0.0], np.cumsum(self.v * self.v)])

    def bounds(self, centroids: np.ndarray) -> np.ndarray:
        """Run boundaries [0, b1, ..., n] for sorted centroids (nearest-centroid rule)."""
        mid = (centroids[1:] + centroids[:-1]) / 2
        return np.concatenate([[0], np.searchsorted(self.v, mid, side="right"), [len(self.v)]])

    def stats(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cnt = np.diff(b)
        s1 = self.s1[b[1:]] - self.s1[b[:-1]]
        s2 = self.s2[b[1:]] - self.s2[b[:-1]]
        return cnt, s1, s2


def init_centroids(values: np.ndarray, k: int, method: str = "linear",
                   seed: int = 0) -> np.ndarray:
    """``k`` starting centroids for 1-D data (sorted, possibly fewer if values repeat).

    linear: evenly spaced over [min, max] (Deep Compression's default); density: evenly
    spaced in the cumulative distribution; random: k distinct data values (Forgy);
    kmeans++: D^2 sampling (Arthur & Vassilvitskii); optimal: the exact 1-D k-means
    optimum (Wang & Song's dynamic programme, via the ``ckmeans`` package).
    """
    if method not in INITS:
        raise DeepzipError(f"k-means init must be one of {INITS}, got {method!r}")
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    uniq = np.unique(v)
    if len(uniq) <= k:
        return uniq
    rng = np.random.default_rng(seed)
    if method == "linear":
        c = np.linspace(v[0], v[-1], k)
    elif method == "density":
        c = np.quantile(v, (np.arange(k) + 0.5) / k)
    elif method == "random":
        c = rng.choice(uniq, size=k, replace=False)
    elif method == "kmeans++":
        c = _kmeanspp(v if len(v) <= 200_000 else rng.choice(v, 200_000, replace=False), k, rng)
    else:
        c = _optimal(v, k)
    return np.unique(c)


def _kmeanspp(v: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [v[rng.integers(len(v))]]
    d2 = (v - chosen[0]) ** 2
    for _ in range(k - 1):
        total = d2.sum()
        if total <= 0:
            break
        x = v[min(np.searchsorted(np.cumsum(d2), rng.random() * total), len(v) - 1)]
        chosen.append(x)
        d2 = np.minimum(d2, (v - x) ** 2)
    return np.array(chosen)


def _optimal(v: np.ndarray, k: int) -> np.ndarray:
    import ckmeans

    c = np.array([g.mean() for g in ckmeans.ckmeans(v, min(k, 255))])
    if k <= 255:
        return c
    # ckmeans stops at 255 groups: the 256th code splits the costliest group at its best
    # point, so 8-bit codebooks use all 256 entries.
    return _relocate_empty(_Sorted(v), np.append(c, np.inf))  # inf: an empty cluster


def _best_split(s: _Sorted, lo: int, hi: int) -> tuple[float, float, float]:
    """Split the sorted run v[lo:hi] (at least two values) in two where the squared error
    is least: (error after the split, left mean, right mean)."""
    i = np.arange(lo + 1, hi)
    n_left, n_right = i - lo, hi - i
    s1_left, s1_right = s.s1[i] - s.s1[lo], s.s1[hi] - s.s1[i]
    sse = (s.s2[hi] - s.s2[lo]) - s1_left ** 2 / n_left - s1_right ** 2 / n_right
    b = int(np.argmin(sse))
    return float(sse[b]), float(s1_left[b] / n_left[b]), float(s1_right[b] / n_right[b])


def _relocate_empty(s: _Sorted, c: np.ndarray) -> np.ndarray:
    """Give each empty cluster a job: split the cluster with the largest squared error at
    its best point, one centroid for each half (the greedy step that lowers the error
    most), instead of leaving a code unused."""
    c = np.sort(c)
    for _ in range(len(c)):
        b = s.bounds(c)
        cnt, s1, s2 = s.stats(b)
        empty = np.flatnonzero(cnt == 0)
        if not len(empty):
            break
        sse = np.where(cnt > 1, s2 - s1 ** 2 / np.maximum(cnt, 1), -1.0)
        j = int(np.argmax(sse))
        if sse[j] <= 0:
            break  # every cluster is a single value: nothing left to split
        _, left, right = _best_split(s, int(b[j]), int(b[j + 1]))
        c = np.where(cnt > 0, s1 / np.maximum(cnt, 1), c)
        c[j], c[empty[0]] = left, right
        c.sort()
    return c


def kmeans_1d(values: np.ndarray | torch.Tensor, bits: int, init: str = "linear", *,
              seed: int = 0, max_iter: int = 300, tol: float = 1e-10,
              entropy_weight: float = 0.0, penalty: float | None = None) -> KMeansResult:
    """Cluster 1-D ``values`` into at most ``2**bits`` centroids with Lloyd's algorithm.

    Deterministic for a given ``seed``. Fewer distinct values than clusters: each value
    is its own centroid (error 0). No values: an empty codebook. ``entropy_weight`` > 0
    continues as entropy-constrained quantization (see :func:`entropy_constrained`) with
    a bit of code length worth ``entropy_weight`` times the plain k-means mean squared
    error, or exactly ``penalty`` (squared error per bit) when given.

    >>> r = kmeans_1d(np.array([0.1, 0.11, 0.5, 0.52]), bits=1)
    >>> np.round(r.centroids, 3).tolist(), r.labels.tolist()
    ([0.105, 0.51], [0, 0, 1, 1])
    """
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise DeepzipError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if penalty is not None and not (math.isfinite(penalty) and penalty >= 0):
        raise DeepzipError(f"penalty must be a finite number >= 0, got {penalty!r}")
    x = (values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor)
         else np.asarray(values, dtype=np.float64)).ravel()
    if not np.isfinite(x).all():
        raise DeepzipError("cannot cluster NaN or infinite weights")
    if x.size == 0:
        return KMeansResult(np.zeros(0), np.zeros(0, np.int64), 0.0, 0)
    s = _Sorted(x)
    c = init_centroids(s.v, 2 ** bits, init, seed)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        cnt, s1, _ = s.stats(s.bounds(c))
        new = np.where(cnt > 0, s1 / np.maximum(cnt, 1), c)
        if (cnt == 0).any():
            new = _relocate_empty(s, new)
        new.sort()
        shift = np.abs(new - c).max()
        c = new
        if shift <= tol * max(1.0, np.abs(c).max()):
            break
    cnt, s1, s2 = s.stats(s.bounds(c))
    err = float(np.maximum(s2 - s1 ** 2 / np.maximum(cnt, 1), 0).sum())
    if (entropy_weight > 0 or penalty is not None) and len(c) > 1:
        lam = entropy_weight * err / x.size if penalty is None else penalty
        c, edges, more = _ec_lloyd(s, c, lam, max_iter)
        it += more
        cnt, s1, s2 = s.stats(edges)
        err = float(np.maximum(s2 - s1 ** 2 / np.maximum(cnt, 1), 0).sum())
        labels = np.searchsorted(s.v[edges[1:-1]], x, side="right")
        return KMeansResult(c, labels.astype(np.int64), err, it, lam)
    labels = np.searchsorted((c[1:] + c[:-1]) / 2, x, side="left")
    return KMeansResult(c, labels.astype(np.int64), err, it)


def envelope(c: np.ndarray, lengths: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """The penalized assignment as thresholds: (the centroids that are cheapest for some
    value, the values where each next one takes over). ``c`` sorted.

    A value's cost under centroid k is ``(v - c_k)^2 + lam * L_k``; without the ``v^2``
    all share, that is the line ``a_k - 2 c_k v``, so the assignment is the lower
    envelope of k lines, built in O(k) since ``c`` is sorted. With ``lam = 0`` the
    thresholds are the midpoints. A value on a threshold goes to the smaller centroid.
    """
    a = c * c + lam * lengths
    hull: list[int] = []
    breaks: list[float] = []  # breaks[i]: where hull[i + 1] becomes cheaper than hull[i]
    for k in range(len(c)):
        while hull:
            j = hull[-1]
            if c[k] == c[j]:  # the same line but for its height: keep the lower one
                if a[k] >= a[j]:
                    break
                hull.pop()
                if breaks:
                    breaks.pop()
                continue
            x = (a[k] - a[j]) / (2 * (c[k] - c[j]))
            if breaks and x <= breaks[-1]:  # hull[-1] is nowhere the cheapest
                hull.pop()
                breaks.pop()
                continue
            hull.append(k)
            breaks.append(x)
            break
        else:
            hull.append(k)
    return np.array(hull, dtype=np.int64), np.array(breaks, dtype=np.float64)


def _ec_edges(s: _Sorted, c: np.ndarray, lengths: np.ndarray, lam: float) -> np.ndarray:
    """Run boundaries [0, ..., n] of the sorted values under the penalized assignment
    (:func:`envelope`), empty runs dropped: one ``searchsorted`` per threshold, so a
    round costs O(k log n), as a plain one does, and no n x k table is ever built."""
    _, breaks = envelope(c, lengths, lam)
    return np.unique(np.concatenate([[0], np.searchsorted(s.v, breaks, side="right"),
                                     [len(s.v)]]))


def _ec_lloyd(s: _Sorted, c: np.ndarray, lam: float, max_iter: int
              ) -> tuple[np.ndarray, np.ndarray, int]:
    lengths = np.zeros(len(c))
    edges = np.array([0, len(s.v)])
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        edges = _ec_edges(s, c, lengths, lam)
        cnt, s1, _ = s.stats(edges)
        new = s1 / cnt
        lengths = -np.log2(cnt / len(s.v))
        done = it > 1 and len(new) == len(c) and np.array_equal(new, c)  # lengths now set
        c = new
        if done:
            break
    return c, edges, it


def entropy_constrained(v: np.ndarray, c: np.ndarray, lam: float, max_iter: int = 300
                        ) -> tuple[np.ndarray, np.ndarray, int]:
    """Entropy-constrained scalar quantization (Chou, Lookabaugh & Gray 1989), the
    clustering Choi et al. 2017 use for network quantization.

    Lloyd's algorithm on ``error + lam * code length``: a value goes to the centroid
    that minimizes its squared error plus ``lam`` times ``-log2`` of that cluster's
    share, so sparse clusters lose their borderline members, some vanish, and the
    Huffman code of the indices gets shorter, not only the codebook smaller. ``v`` is
    sorted; ``c`` the plain k-means centroids to start from. Returns (centroids, run
    boundaries in ``v``, rounds).
    """
    return _ec_lloyd(_Sorted(v), np.asarray(c, dtype=np.float64), lam, max_iter)


# ---------------------------------------------------------------- module adapters
class SharedWeight(nn.Module):
    """Parametrization ``weight = codebook[indices] * mask`` (indices and mask fixed).

    Indices are kept as uint8 (at most 256 centroids) and the mask as bool: a shared
    layer costs two bytes per weight beside its latent fp32 weights, not twelve."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor,
                 bits: int) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.clone())
        self.register_buffer("indices", indices.to(torch.uint8))
        self.register_buffer("mask", mask.bool())
        self.bits = bits

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        if self.codebook.numel() == 0:
            return torch.zeros(self.mask.shape, dtype=self.codebook.dtype,
                               device=self.mask.device)
        return self.codebook[self.indices.int()].mul_(self.mask)  # no third copy


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

    >>> quantize_(model, QuantizeConfig(bits=5, init="linear"))  # doctest: +SKIP
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
        if not (isinstance(self.entropy_weight, (int, float)) and self.entropy_weight >= 0):
            raise DeepzipError(f"entropy_weight must be a number >= 0, got "
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


def quantize_(model: nn.Module, config: QuantizeConfig) -> dict[str, dict[str, Any]]:
    """Share weights in place: each selected parameter's nonzero values -> a k-means
    codebook. Pruning masks are baked first; zeros stay zero and are not a cluster.
    Returns per target ``{bits, clusters, error, iterations}``.
    """
    out = {}
    targets = _targets(model, config)
    pen = penalties(targets, config)
    if config.target_bits is not None:
        scale = _fit_scale(targets, config, pen)
        pen = {k: v * scale for k, v in pen.items()}
    for t in targets:
        name = t.name
        bits = config.bits_for(t)
        w = t.weight.detach()
        mask = w != 0
        r = kmeans_1d(w[mask], bits, config.init, seed=config.seed, max_iter=config.max_iter,
                      entropy_weight=config.entropy_weight, penalty=pen[name])
        indices = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        indices[mask] = torch.from_numpy(r.labels.astype(np.uint8)).to(w.device)
        codebook = torch.from_numpy(r.centroids).to(w)
        _install(t, SharedWeight(codebook, indices, mask, bits))
        out[name] = {"bits": bits, "clusters": len(r.centroids), "error": r.error,
                     "iterations": r.iterations}
    return out


def _install(t: Target, parametrization: nn.Module) -> None:
    """One parametrization on every owner of the target's tensor (tied weights share
    one codebook, so they stay tied)."""
    for m, a in t.owners:
        parametrize.register_parametrization(m, a, parametrization, unsafe=True)


def _targets(model: nn.Module, config: QuantizeConfig) -> list[Target]:
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
    ``results/levers/sensitivity.txt``)."""
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


def index_bits(sizes: Iterable[np.ndarray]) -> float:
    """Mean Huffman code length per weight of clustered layers given each one's cluster
    sizes: what the file's index streams cost (less their small code-length tables)."""
    total = bits = 0.0
    for n in sizes:
        n = np.asarray(n, dtype=np.int64)
        n = n[n > 0]
        if len(n) > 1:
            bits += float((n * code_lengths(n)).sum())
        total += float(n.sum())
    return bits / total if total else 0.0


def _fit_scale(targets: list[Target], config: QuantizeConfig,
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

    >>> s = fisher_sensitivity(model, loader)  # doctest: +SKIP
    >>> cfg = QuantizeConfig(bits=6, entropy_weight=300, sensitivity=s)  # doctest: +SKIP
    >>> quantize_(model, cfg)  # doctest: +SKIP
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


def qat_(model: nn.Module, train_loader: BatchLoader, cfg: TrainConfig,
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
    targets = _targets(model, config)
    pen = penalties(targets, config)
    scale = 1.0 if config.target_bits is None else _fit_scale(targets, config, pen)
    for t in targets:
        w = t.weight.detach()
        ts = TrainedSharing((w != 0).to(w.dtype), config.bits_for(t), pen[t.name])
        _install(t, ts)
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
        _install(t, shared)
        out[t.name] = {"bits": ts.bits, "clusters": int(ts.clusters)}
    return out, history


def codebooks(model: nn.Module) -> dict[str, SharedWeight]:
    """The weight-sharing parametrization of each quantized parameter, by target name."""
    return {name: cb for name, (_, cb) in _shared(model).items()}


def _shared(model: nn.Module) -> dict[str, tuple[str, SharedWeight]]:
    """target name -> (the codebook's parameter name in the model, its SharedWeight)."""
    out = {}
    for layer, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr, plist in m.parametrizations.items():
            if isinstance(plist[0], SharedWeight):
                prefix = f"{layer}." if layer else ""
                out[Target(layer, m, attr).name] = (
                    f"{prefix}parametrizations.{attr}.0.codebook", plist[0])
    return out


CENTROID_TRAINING = TrainConfig(epochs=10, lr=0.002, weight_decay=0.0, schedule="cosine")


def train_centroids(model: nn.Module, train_loader: BatchLoader,
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
    books = dict(_shared(model).values())
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


def dequantize_(model: nn.Module) -> nn.Module:
    """Make shared weights plain parameters holding ``codebook[indices] * mask`` (needed
    before the model's ``state_dict`` loads into a plain, unquantized model)."""
    owners = [(m, attr) for _, m in model.named_modules() if parametrize.is_parametrized(m)
              for attr, plist in m.parametrizations.items() if isinstance(plist[0], SharedWeight)]
    for m, attr in owners:
        parametrize.remove_parametrizations(m, attr, leave_parametrized=True)
    return model


def distinct_nonzero(model: nn.Module) -> dict[str, int]:
    """Distinct nonzero values per prunable parameter (<= 2^bits after quantization)."""
    out = {}
    for t in prunable(model):
        w = t.weight.detach()
        out[t.name] = int(torch.unique(w[w != 0]).numel())
    return out
