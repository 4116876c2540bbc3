"""Quantization-aware training and centroid training (deepzip.qat)."""

import pytest
import torch
from sharing_data import huffman_bits_of, toy, two_sided
from torch import nn

from deepzip import DeepzipError, TrainConfig
from deepzip.data import BatchLoader, ImageSplit
from deepzip.models import get
from deepzip.prune import PruneConfig, prune_
from deepzip.qat import TrainedSharing, qat_, train_centroids
from deepzip.quantize import (
    QuantizeConfig,
    SharedWeight,
    codebooks,
    dequantize_,
    distinct_nonzero,
    quantize_,
)


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
    w = torch.tensor(two_sided(4000), dtype=torch.float32)
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


def test_qat_ends_in_shared_layers_with_pruned_zeros_kept(tmp_path):
    model, batches = toy()
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
    again, _ = toy()
    qat_(again, batches, cfg, config, recluster_every=3, out_dir=tmp_path / "qat",
         resume=True)
    assert torch.equal(torch.cat([again(x) for x, _ in batches]), out)
    with pytest.raises(DeepzipError, match="recluster_every"):
        qat_(toy()[0], batches, cfg, config, recluster_every=0)


def test_qat_follows_the_budget_and_ends_within_it(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05, weight_decay=0, precision="fp32")
    config = QuantizeConfig(bits=6, entropy_weight=10, target_bits=1.5)
    model, batches = toy()
    _, history = qat_(model, batches, cfg, config, recluster_every=2, out_dir=tmp_path / "q",
                      resume=True)
    bits = huffman_bits_of(model)
    assert 1.2 < bits <= 1.5
    assert all(abs(r["index_huffman_bits"] - 1.5) < 0.3 and r["penalty_scale"] > 0
               for r in history)
    out = torch.cat([model(x) for x, _ in batches])
    again, _ = toy()  # resumed from the finished checkpoint: the same sharing
    qat_(again, batches, cfg, config, recluster_every=2, out_dir=tmp_path / "q", resume=True)
    assert torch.equal(torch.cat([again(x) for x, _ in batches]), out)
