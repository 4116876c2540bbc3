"""1-D k-means and entropy-constrained clustering (deepzip.kmeans)."""

import numpy as np
import pytest
from sharing_data import entropy, two_sided

from deepzip import DeepzipError
from deepzip.kmeans import entropy_constrained, envelope, init_centroids, kmeans_1d
from deepzip.quantize import (
    INITS,
    QuantizeConfig,
)


def _sse(x, c):
    return float(((x[:, None] - c[None, :]) ** 2).min(1).sum())


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_kmeans_is_a_lloyd_fixed_point(init, bits):
    x = np.random.default_rng(1).standard_normal(3000) * 0.1
    r = kmeans_1d(x, bits, init)
    assert len(r.centroids) <= 2 ** bits and np.all(np.diff(r.centroids) > 0)
    assert r.error == pytest.approx(_sse(x, r.centroids), rel=1e-9)
    assert np.array_equal(r.labels, np.abs(x[:, None] - r.centroids).argmin(1))
    for j in np.unique(r.labels):  # each centroid is the mean of its members
        assert r.centroids[j] == pytest.approx(x[r.labels == j].mean(), abs=1e-12)


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_optimal_init_error_is_lowest(bits):
    for seed in range(3):
        x = np.random.default_rng(seed).laplace(size=2000) * 0.05
        errs = {init: kmeans_1d(x, bits, init, seed=seed).error for init in INITS}
        assert all(errs["optimal"] <= e * (1 + 1e-9) for e in errs.values()), errs


def test_kmeans_deterministic_and_edge_cases():
    x = np.random.default_rng(0).standard_normal(500)
    for init in ["random", "kmeans++"]:
        a, b = kmeans_1d(x, 4, init, seed=7), kmeans_1d(x, 4, init, seed=7)
        assert np.array_equal(a.centroids, b.centroids)
    empty = kmeans_1d(np.array([]), 5)
    assert empty.centroids.size == 0 and empty.labels.size == 0
    few = kmeans_1d(np.array([0.3, -0.2, 0.3]), 5)
    assert few.centroids.tolist() == [-0.2, 0.3] and few.error == 0
    one = kmeans_1d(np.array([1.5]), 1)
    assert one.centroids.tolist() == [1.5] and one.labels.tolist() == [0]
    for bad in [0, 9, 2.5]:
        with pytest.raises(DeepzipError, match="bits"):
            kmeans_1d(x, bad)
    with pytest.raises(DeepzipError, match="init"):
        init_centroids(x, 4, "magic")
    with pytest.raises(DeepzipError, match="NaN"):
        kmeans_1d(np.array([1.0, np.nan]), 2)


def test_entropy_constrained_beats_plain_kmeans_at_a_lower_rate():
    w = two_sided()
    plain = kmeans_1d(w, 2)
    ecq = kmeans_1d(w, 4, entropy_weight=10.0)
    assert len(ecq.centroids) < 16  # some clusters vanished
    assert entropy(ecq.labels) < entropy(plain.labels)  # fewer bits per index ...
    assert ecq.error < 0.9 * plain.error  # ... and still a smaller error
    assert np.allclose([w[ecq.labels == j].mean() for j in range(len(ecq.centroids))],
                       ecq.centroids)  # every centroid is its members' mean
    assert kmeans_1d(w, 4, entropy_weight=0.0).error == kmeans_1d(w, 4).error


def test_entropy_constrained_ends_at_its_fixed_point():
    v = np.sort(two_sided(seed=1))
    start = kmeans_1d(v, 4).centroids
    lam = 5 * kmeans_1d(v, 4).error / len(v)
    c, edges, rounds = entropy_constrained(v, start, lam)
    assert rounds < 300 and np.all(np.diff(edges) > 0) and np.all(np.diff(c) > 0)
    lengths = -np.log2(np.diff(edges) / len(v))
    # each value's cluster minimizes squared error + lam x code length among all clusters
    labels = np.repeat(np.arange(len(c)), np.diff(edges))
    cost = (v[:, None] - c[None, :]) ** 2 + lam * lengths[None, :]
    assert np.array_equal(np.argmin(cost, axis=1), labels)
    with pytest.raises(DeepzipError, match="entropy_weight"):
        QuantizeConfig(bits=4, entropy_weight=-1.0)


def test_envelope_thresholds_are_the_penalized_assignment():
    c = np.array([-0.3, -0.1, 0.05, 0.2, 0.21])
    lengths = np.array([3.0, 1.0, 6.0, 1.5, 9.0])
    hull, thr = envelope(c, lengths, 0.0)
    assert hull.tolist() == list(range(5)) and np.allclose(thr, (c[1:] + c[:-1]) / 2)
    lam = 0.01
    hull, thr = envelope(c, lengths, lam)
    v = np.linspace(-0.5, 0.5, 2001)
    cost = (v[:, None] - c[None, :]) ** 2 + lam * lengths[None, :]
    assert np.array_equal(hull[np.searchsorted(thr, v, side="left")], np.argmin(cost, axis=1))
    assert 2 not in hull  # too costly to be anyone's choice
