"""Data the weight-sharing tests share: two-sided weight samples, a toy model, the
entropy of a clustering and a model's Huffman bits."""

import numpy as np
import torch
from torch import nn

from deepzip.kmeans import index_bits
from deepzip.prune import PruneConfig, prune_
from deepzip.quantize import codebooks


def two_sided(n=6000, seed=0):
    """Weights as a pruned layer has them: two lobes, nothing near zero."""
    rng = np.random.default_rng(seed)
    w = np.concatenate([rng.laplace(0.05, 0.03, n // 2), -rng.laplace(0.05, 0.03, n // 2)])
    return w[np.abs(w) > 0.03]


def entropy(labels):
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    prune_(model, PruneConfig("percentile", 0.5))
    return model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]


def huffman_bits_of(model) -> float:
    return index_bits(np.bincount(cb.indices[cb.mask != 0].numpy().ravel())
                      for cb in codebooks(model).values())
