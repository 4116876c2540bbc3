import numpy as np
import pytest
import torch
from torch import nn

from deepzip import DeepzipError, TrainConfig
from deepzip.data import BatchLoader, ImageSplit
from deepzip.kmeans import entropy_constrained, envelope, index_bits, init_centroids, kmeans_1d
from deepzip.models import get
from deepzip.prune import PruneConfig, prunable, prune_
from deepzip.qat import TrainedSharing, qat_, train_centroids
from deepzip.quantize import (
    INITS,
    QuantizeConfig,
    SharedWeight,
    codebooks,
    dequantize_,
    distinct_nonzero,
    fisher_sensitivity,
    penalties,
    quantize_,
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


def test_centroid_gradient_is_sum_of_member_gradients():
    """Hand check on a 2x3 linear layer with 1-bit sharing."""
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.0, 0.9], [0.12, 1.0, 0.08]]))
    model = nn.Sequential(layer)
    quantize_(model, QuantizeConfig(bits=1))
    cb = codebooks(model)["0"]
    assert cb.codebook.tolist() == pytest.approx([0.1, 0.95])
    assert cb.indices.tolist() == [[0, 0, 1], [0, 1, 0]]
    x = torch.tensor([[1.0, 2.0, 3.0]])
    g_out = torch.tensor([[1.0, -2.0]])
    (layer(x) * g_out).sum().backward()
    # dL/dW[i,j] = g_out[i] * x[j]; cluster 0 = (0,0),(1,0),(1,2); cluster 1 = (0,2),(1,1)
    dw = g_out.T @ x
    expected = [dw[0, 0] + dw[1, 0] + dw[1, 2], dw[0, 2] + dw[1, 1]]
    assert cb.codebook.grad.tolist() == pytest.approx([float(e) for e in expected])
    # the pruned zero at (0,1) gets no share of any centroid's gradient
    assert layer.weight[0, 1] == 0


def test_trained_centroids_keep_structure():
    torch.manual_seed(0)
    model = get("resnet20")
    prune_(model, PruneConfig("percentile", 0.5))
    quantize_(model, QuantizeConfig(bits=3))
    zeros = {n: (cb.mask == 0).clone() for n, cb in codebooks(model).items()}
    before = {n: cb.codebook.detach().clone() for n, cb in codebooks(model).items()}
    idx = {n: cb.indices.clone() for n, cb in codebooks(model).items()}
    g = torch.Generator().manual_seed(0)
    data = ImageSplit(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (256,), generator=g))
    train_centroids(model, BatchLoader(data, 64, train=True),
                    TrainConfig(epochs=2, lr=0.05, weight_decay=0))
    moved = 0
    for n, cb in codebooks(model).items():
        assert torch.equal(cb.indices, idx[n])
        moved += not torch.equal(cb.codebook, before[n])
    assert moved > 0
    dequantize_(model)
    assert not codebooks(model)
    for n, m in model.named_modules():
        if n in zeros:
            assert torch.all(m.weight[zeros[n]] == 0)
    assert all(v <= 8 for v in distinct_nonzero(model).values())
    assert isinstance(model.conv1.weight, nn.Parameter)


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


def test_centroid_lr_is_divided_by_cluster_size(monkeypatch):
    import deepzip.qat as q

    model = nn.Sequential(nn.Linear(100, 10))
    quantize_(model, QuantizeConfig(bits=2))
    seen = {}

    def fake_fit(model, loader, cfg, *, param_filter, lr_scale, **kw):
        for n, p in model.named_parameters():
            if param_filter(n, p):
                seen[n] = lr_scale(n, p)

    monkeypatch.setattr(q, "fit", fake_fit)
    train_centroids(model, None, TrainConfig(epochs=1))
    assert seen["0.parametrizations.weight.0.codebook"] == pytest.approx(4 / 1000)
    assert seen["0.bias"] == 1.0
    assert "0.parametrizations.weight.original" not in seen


def _two_sided(n=6000, seed=0):
    """Weights as a pruned layer has them: two lobes, nothing near zero."""
    rng = np.random.default_rng(seed)
    w = np.concatenate([rng.laplace(0.05, 0.03, n // 2), -rng.laplace(0.05, 0.03, n // 2)])
    return w[np.abs(w) > 0.03]


def _entropy(labels):
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_entropy_constrained_beats_plain_kmeans_at_a_lower_rate():
    w = _two_sided()
    plain = kmeans_1d(w, 2)
    ecq = kmeans_1d(w, 4, entropy_weight=10.0)
    assert len(ecq.centroids) < 16  # some clusters vanished
    assert _entropy(ecq.labels) < _entropy(plain.labels)  # fewer bits per index ...
    assert ecq.error < 0.9 * plain.error  # ... and still a smaller error
    assert np.allclose([w[ecq.labels == j].mean() for j in range(len(ecq.centroids))],
                       ecq.centroids)  # every centroid is its members' mean
    assert kmeans_1d(w, 4, entropy_weight=0.0).error == kmeans_1d(w, 4).error


def test_entropy_constrained_ends_at_its_fixed_point():
    v = np.sort(_two_sided(seed=1))
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


def test_trained_sharing_forward_is_shared_and_backward_straight_through():
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    mask = (torch.rand(6, 5) > 0.3).float()
    ts = TrainedSharing(mask, bits=2)
    sizes = ts.recluster(w, QuantizeConfig(bits=2))
    out = ts(w)
    assert sizes.sum() == mask.sum() and int(ts.clusters) == 4
    assert torch.all(out[mask == 0] == 0)
    assert len(torch.unique(out[mask != 0])) <= 4
    assert set(torch.unique(out[mask != 0]).tolist()) <= set(ts.codebook[:4].tolist())
    g = torch.randn(6, 5)
    out.backward(g)
    assert torch.equal(w.grad, g * mask)  # identity but for the pruned positions
    shared = ts.shared(w)
    assert isinstance(shared, SharedWeight) and torch.equal(shared(None), out.detach())


def test_reclustering_keeps_the_first_penalty():
    """Drifting latent weights must not raise the penalty per bit (which would drop a
    cluster at every re-clustering); Lloyd's rounds continue from the current centroids."""
    torch.manual_seed(0)
    w = torch.tensor(_two_sided(4000), dtype=torch.float32)
    ts = TrainedSharing(torch.ones_like(w), bits=4)
    config = QuantizeConfig(bits=4, entropy_weight=20)
    ts.recluster(w, config)
    lam, k = float(ts.penalty), int(ts.clusters)
    assert lam > 0 and k < 16
    for _ in range(5):  # the spread doubles: a fresh clustering's penalty would quadruple
        w = w * 1.15
        ts.recluster(w, config)
        assert float(ts.penalty) == lam
    assert int(ts.clusters) >= k


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    prune_(model, PruneConfig("percentile", 0.5))
    return model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]


def test_qat_ends_in_shared_layers_with_pruned_zeros_kept(tmp_path):
    model, batches = _toy()
    zeros = (model[0].weight == 0).clone()
    cfg = TrainConfig(epochs=3, lr=0.05, weight_decay=0, precision="fp32")
    config = QuantizeConfig(bits=4, entropy_weight=50)
    layers, history = qat_(model, batches, cfg, config, recluster_every=3,
                           out_dir=tmp_path / "qat", resume=True)
    assert len(history) == 3 and history[-1]["clusters"] == sum(
        v["clusters"] for v in layers.values())
    assert 0 < history[-1]["index_entropy_bits"] < 4
    books = codebooks(model)
    assert set(books) == set(layers) and len(books) == 2
    assert any(v["clusters"] < 16 for v in layers.values())  # the penalty dropped some
    assert torch.all(model[0].weight[zeros] == 0)
    for name, cb in books.items():
        assert int(cb.indices.max()) < len(cb.codebook) == layers[name]["clusters"]
    out = torch.cat([model(x) for x, _ in batches])
    # the same call again resumes from the finished checkpoint: the same sharing
    again, _ = _toy()
    qat_(again, batches, cfg, config, recluster_every=3, out_dir=tmp_path / "qat",
         resume=True)
    assert torch.equal(torch.cat([again(x) for x, _ in batches]), out)
    with pytest.raises(DeepzipError, match="recluster_every"):
        qat_(_toy()[0], batches, cfg, config, recluster_every=0)


def test_an_explicit_penalty_clusters_as_the_entropy_weight_it_stands_for():
    x = _two_sided(3000)
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
    _, batches = _toy()
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


def _huffman_bits_of(model) -> float:
    return index_bits(np.bincount(cb.indices[cb.mask != 0].numpy().ravel())
                      for cb in codebooks(model).values())


def test_target_bits_meets_the_budget_from_any_starting_beta():
    model, _ = _toy()
    for beta in (1.0, 300.0):
        for target in (1.2, 2.5):
            m, _ = _toy()
            m.load_state_dict(model.state_dict())
            quantize_(m, QuantizeConfig(bits=6, entropy_weight=beta, target_bits=target))
            assert target - 0.25 < _huffman_bits_of(m) <= target
    with pytest.raises(DeepzipError, match="target_bits"):
        QuantizeConfig(bits=6, target_bits=2.0)  # needs entropy-constrained clustering


def test_qat_follows_the_budget_and_ends_within_it(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05, weight_decay=0, precision="fp32")
    config = QuantizeConfig(bits=6, entropy_weight=10, target_bits=1.5)
    model, batches = _toy()
    _, history = qat_(model, batches, cfg, config, recluster_every=2, out_dir=tmp_path / "q",
                      resume=True)
    bits = _huffman_bits_of(model)
    assert 1.2 < bits <= 1.5
    assert all(abs(r["index_huffman_bits"] - 1.5) < 0.3 and r["penalty_scale"] > 0
               for r in history)
    out = torch.cat([model(x) for x, _ in batches])
    again, _ = _toy()  # resumed from the finished checkpoint: the same sharing
    qat_(again, batches, cfg, config, recluster_every=2, out_dir=tmp_path / "q", resume=True)
    assert torch.equal(torch.cat([again(x) for x, _ in batches]), out)
