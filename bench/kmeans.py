"""deepzip's 1-D k-means against scikit-learn's KMeans: same init, same data, same run.

    python bench/kmeans.py [--bits 5]

Data: every Conv/Linear layer of the shipped ResNet-20 (nonzero weights), and one
synthetic 10M-weight layer. Both start from the same linear initialization (evenly spaced
over [min, max]) and run Lloyd's algorithm to convergence (sklearn: n_init=1, tol=0,
max_iter=300, the same cap as ours). Prints time ratio and within-cluster squared error.
"""

from __future__ import annotations

import argparse

import numpy as np
from common import median_time
from sklearn.cluster import KMeans

from deepzip.kmeans import init_centroids, kmeans_1d
from deepzip.loading import pretrained
from deepzip.prune import prunable


def sk_kmeans(x: np.ndarray, init: np.ndarray) -> float:
    km = KMeans(len(init), init=init.reshape(-1, 1), n_init=1, tol=0, max_iter=300,
                algorithm="lloyd").fit(x.reshape(-1, 1))
    return float(km.inertia_)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=5)
    args = ap.parse_args()
    model, _ = pretrained("resnet20")
    layers = [t.weight.detach().flatten().double().numpy() for t in prunable(model)]
    layers = [w[w != 0] for w in layers]
    big = np.random.default_rng(0).laplace(size=10_000_000) * 0.05
    k = 2 ** args.bits
    print(f"{k} clusters, linear init, Lloyd to convergence")
    for name, data in [(f"ResNet-20, {len(layers)} layers, {sum(map(len, layers)):,} weights",
                        layers), ("synthetic layer, 10,000,000 weights", [big])]:
        ours_err = sum(kmeans_1d(w, args.bits, "linear").error for w in data)
        sk_err = sum(sk_kmeans(w, init_centroids(w, k, "linear")) for w in data)
        repeat = 3 if len(data) > 1 else 1
        t_ours = median_time(lambda d=data: [kmeans_1d(w, args.bits) for w in d], repeat)
        t_sk = median_time(lambda d=data: [sk_kmeans(w, init_centroids(w, k, "linear"))
                                           for w in d], repeat, warmup=0)
        print(f"{name}:")
        print(f"  deepzip {t_ours:8.3f} s   error {ours_err:.6g}")
        print(f"  sklearn {t_sk:8.3f} s   error {sk_err:.6g}")
        print(f"  speed-up {t_sk / t_ours:.1f}x, error ratio ours/sklearn "
              f"{ours_err / sk_err:.6f}")


if __name__ == "__main__":
    main()
