"""1-D k-means for weight sharing, in NumPy alone (no PyTorch).

Values are sorted once, so each cluster is a contiguous run: assignment is
``searchsorted`` on centroid midpoints and cluster sums come from prefix sums, so one
Lloyd iteration costs O(k log n) after the sort. Entropy-constrained clustering
(:func:`entropy_constrained`) trades squared error against the Huffman-coded length of
the cluster indices. Benchmark: ``python bench/kmeans.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import DeepzipError
from .huffman import code_lengths

__all__ = ["INITS", "MAX_BITS", "KMeansResult", "entropy_constrained", "envelope",
           "index_bits", "init_centroids", "kmeans_1d"]

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


def kmeans_1d(values: np.ndarray, bits: int, init: str = "linear", *,
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
    x = np.asarray(values, dtype=np.float64).ravel()
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
