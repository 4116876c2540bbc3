"""Weight sharing of a model (deepzip.quantize): configs, penalties, Fisher sensitivity,
size budgets."""

import numpy as np
import pytest
import torch
from sharing_data import huffman_bits_of, toy, two_sided
from torch import nn

from deepzip import DeepzipError
from deepzip.kmeans import kmeans_1d
from deepzip.models import get
from deepzip.prune import PruneConfig, prunable, prune_
from deepzip.quantize import (
    INITS,
    QuantizeConfig,
    codebooks,
    distinct_nonzero,
    fisher_sensitivity,
    penalties,
    quantize_,
)


def test_quantize_model_keeps_zeros_and_limits_values():
    torch.manual_seed(0)
    model = get("resnet20").eval()
    prune_(model, PruneConfig("percentile", 0.6))
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    info = quantize_(model, QuantizeConfig(bits=4, bits_linear=3))
    assert info["linear"]["bits"] == 3 and info["conv1"]["bits"] == 4
    for name, n in distinct_nonzero(model).items():
        assert n <= 2 ** info[name]["bits"]
    for name, m in model.named_modules():
        if name in zeros:
            assert torch.equal(m.weight == 0, zeros[name]), name
    assert set(codebooks(model)) == set(zeros)
    with pytest.raises(DeepzipError, match="already quantized"):
        quantize_(model, QuantizeConfig())


def test_bad_config():
    for bad in [dict(bits=0), dict(bits_conv=9), dict(per_layer={"x": 3.5}), dict(init="x")]:
        with pytest.raises(DeepzipError):
            QuantizeConfig(**bad)


def test_every_code_is_used_when_values_allow():
    """Empty clusters are relocated (split the costliest cluster), 8-bit optimal included."""
    x = np.random.default_rng(0).laplace(size=5000)
    for init in INITS:
        assert len(kmeans_1d(x, 8, init).centroids) == 256, init
    spiky = np.concatenate([np.zeros(0), np.full(50, 0.01), np.linspace(-3, 3, 7)])
    r = kmeans_1d(spiky, 4, "linear")  # linear init leaves most codes empty here
    assert len(r.centroids) == len(np.unique(spiky)) and r.error == 0


def test_an_explicit_penalty_clusters_as_the_entropy_weight_it_stands_for():
    x = two_sided(3000)
    r = kmeans_1d(x, 5, entropy_weight=60)
    again = kmeans_1d(x, 5, penalty=r.penalty)
    assert np.array_equal(again.centroids, r.centroids)
    assert np.array_equal(again.labels, r.labels) and again.penalty == r.penalty
    with pytest.raises(DeepzipError, match="penalty"):
        kmeans_1d(x, 5, penalty=float("nan"))


class _Parallel(nn.Module):
    """Two equal Linear layers, one's output amplified: the loss feels its weights more."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.loud, self.quiet, self.gain = nn.Linear(16, 4), nn.Linear(16, 4), gain
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight)
            self.quiet.bias.copy_(self.loud.bias)

    def forward(self, x):
        return self.gain * self.loud(x) + self.quiet(x)


def test_fisher_sensitivity_is_the_mean_squared_gradient_of_the_live_weights():
    torch.manual_seed(0)
    model = _Parallel(gain=10.0)
    with torch.no_grad():  # the same weights pruned in both: only live ones count
        model.loud.weight[:, :8] = 0
        model.quiet.weight[:, :8] = 0
    _, batches = toy()
    s = fisher_sensitivity(model, batches, max_batches=3)
    # d out / d loud = 10 * d out / d quiet, weight for weight: 100x the squared gradient
    assert s["loud"] == pytest.approx(100 * s["quiet"], rel=1e-6)
    model.zero_grad()
    nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    g = model.quiet.weight.grad[:, 8:]
    one = fisher_sensitivity(model, batches, max_batches=1)["quiet"]
    assert one == pytest.approx(float((g.double() ** 2).mean()), rel=1e-6)
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(DeepzipError, match="no batches"):
        fisher_sensitivity(model, [])


def test_sensitivity_moves_the_bits_to_the_layer_the_loss_feels():
    torch.manual_seed(0)
    model = _Parallel(gain=1.0)  # equal weights in both layers
    names = ["loud", "quiet"]

    def clusters(sens):
        m = _Parallel(gain=1.0)
        m.load_state_dict(model.state_dict())
        layers = quantize_(m, QuantizeConfig(bits=5, entropy_weight=30, sensitivity=sens))
        return [layers[n]["clusters"] for n in names]

    plain = clusters(None)
    assert plain[0] == plain[1]
    loud, quiet = clusters({"loud": 100.0, "quiet": 1.0})
    assert loud > plain[0] > quiet
    assert clusters({"loud": 1.0, "quiet": 100.0}) == [quiet, loud]
    # equal sensitivities: one penalty for all, beta times the mean k-means error per weight
    targets_model = _Parallel(gain=1.0)
    ts = prunable(targets_model)
    pen = penalties(ts, QuantizeConfig(bits=5, entropy_weight=30,
                                       sensitivity={n: 2.0 for n in names}))
    errors = [kmeans_1d(t.weight.detach().ravel(), 5).error for t in ts]
    assert pen["loud"] == pytest.approx(30 * sum(errors) / 128)
    assert pen["loud"] == pytest.approx(pen["quiet"])
    with pytest.raises(DeepzipError, match="no value for quiet"):
        penalties(ts, QuantizeConfig(bits=5, entropy_weight=30, sensitivity={names[0]: 1.0}))


def test_target_bits_meets_the_budget_from_any_starting_beta():
    model, _ = toy()
    for beta in (1.0, 300.0):
        for target in (1.2, 2.5):
            m, _ = toy()
            m.load_state_dict(model.state_dict())
            quantize_(m, QuantizeConfig(bits=6, entropy_weight=beta, target_bits=target))
            assert target - 0.25 < huffman_bits_of(m) <= target
    with pytest.raises(DeepzipError, match="target_bits"):
        QuantizeConfig(bits=6, target_bits=2.0)  # needs entropy-constrained clustering
