"""SparseGPT (deepzip.obs): the mask it chooses, the weights it repairs, and its passes."""

import copy

import pytest
import torch
from torch import nn

from deepzip import DeepzipError
from deepzip.obs import _groups, obs_prune
from deepzip.prune import PruneConfig, prune_
from deepzip.targets import masks, prunable


def _correlated(n=512, d=64, seed=0):
    """Inputs whose features are strongly correlated: where OBS's repair matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) \
        + 0.1 * torch.randn(n, d, generator=g)


def _magnitude(w, amount):
    k = round(amount * w.numel())
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[w.abs().flatten().topk(k, largest=False).indices] = False
    return w * keep.reshape(w.shape)


def test_obs_keeps_the_outputs_far_better_than_magnitude():
    x = _correlated()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    new, keep = obs_prune(w, x.T @ x, 0.5)
    err = lambda v: float(((x @ w.T - x @ v.T) ** 2).sum())  # noqa: E731
    assert 1 - keep.float().mean() == pytest.approx(0.5)
    assert (new[~keep] == 0).all() and (new[keep] != w[keep]).any()  # kept weights repaired
    assert err(new) < 0.2 * err(_magnitude(w, 0.5))


def test_with_uncorrelated_inputs_obs_is_magnitude_pruning():
    """H = c I: every weight's cost is w^2 c, and no error spreads to another column."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    new, keep = obs_prune(w, 5 * torch.eye(64), 0.5, block=64)
    assert torch.equal(new, _magnitude(w, 0.5)) and torch.equal(keep, new != 0)


def test_n_of_m_zeros_already_there_and_dead_inputs():
    x = _correlated()
    x[:, 5] = 0  # an input no example ever sets
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    w[0, :3] = 0
    new, keep = obs_prune(w, x.T @ x, 0.0, (2, 4))
    assert (keep.reshape(8, 16, 4).sum(2) <= 2).all()
    assert (keep.reshape(8, 16, 4).sum(2) == 2).float().mean() > 0.9
    assert not keep[0, :3].any() and not keep[:, 5].any()
    with pytest.raises(DeepzipError, match="Hessian of shape"):
        obs_prune(w, torch.eye(3), 0.5)


def test_prune_sparsegpt_on_a_model_in_passes():
    """Through prune_: per-layer sparsity exact, conv and linear repaired, one pass per
    group of layers whose Hessians fit the cap, the calibration data required."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    base = torch.randn(64, 3, 8, 8)
    x = base + base.roll(1, 1)  # correlated channels
    data = [(x[i:i + 16], None) for i in range(0, 64, 16)]
    magnitude, obs = copy.deepcopy(model), copy.deepcopy(model)
    prune_(magnitude, PruneConfig("percentile", 0.6), bake=True)
    sparsity = prune_(obs, PruneConfig("sparsegpt", 0.6), calibration=data,
                      calibration_batches=4)
    assert all(s == pytest.approx(0.6, abs=0.01) for s in sparsity.values())
    assert set(masks(obs)) == {"0", "2", "5"}
    with torch.no_grad():
        ref = model(x)
        assert ((obs(x) - ref) ** 2).mean() < 0.7 * ((magnitude(x) - ref) ** 2).mean()
    sizes = [len(g) for g in _groups(prunable(model), cap=4 * (27 ** 2 + 72 ** 2))]
    assert sizes == [2, 1]  # 27^2 + 72^2 columns fit; the linear's 288^2 do not
    with pytest.raises(DeepzipError, match="calibration"):
        prune_(copy.deepcopy(model), PruneConfig("sparsegpt", 0.5))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_global_allocation_prunes_each_layer_as_global_magnitude_would(method):
    """allocate: global takes each layer's sparsity from one magnitude threshold across
    layers (the wide last layer and the small first one differ), and chooses within it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        model[0].weight.mul_(4)  # the first layer's weights large: it keeps more
    data = [(torch.randn(16, 3, 8, 8), None) for _ in range(2)]
    magnitude = copy.deepcopy(model)
    want = prune_(magnitude, PruneConfig("global", 0.7), bake=True)
    got = prune_(model, PruneConfig(method, 0.7, allocate="global"), calibration=data,
                 calibration_batches=2, bake=True)
    assert want["0"] < 0.5 < want["3"]  # wanda rounds per row of 27 or 512 weights
    assert got == pytest.approx(want, abs=1 / 27 if method == "wanda" else 0.002)
    total = sum((m.weight == 0).sum() for m in (model[0], model[3]))
    assert int(total) == pytest.approx(0.7 * (8 * 27 + 10 * 512), abs=8)
    assert not torch.equal(model[3].weight != 0, magnitude[3].weight != 0)
    with pytest.raises(DeepzipError, match="allocate"):
        PruneConfig("percentile", 0.5, allocate="global")


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_an_embedding_and_a_tied_output_layer_stay_dense(method):
    """As the methods' authors leave them: nothing weighs an embedding's rows."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    model[2].weight = model[0].weight  # tied, as a language model's output layer
    ids = torch.randint(0, 10, (32, 5))
    sparsity = prune_(model, PruneConfig(method, 0.5), calibration=[(ids, None)], bake=True)
    assert sparsity == {"1": 0.5}
    assert bool((model[0].weight != 0).all()) and model[2].weight is model[0].weight
    with pytest.raises(DeepzipError, match="embeddings and tied weights dense"):
        prune_(nn.Sequential(nn.Embedding(10, 8)), PruneConfig(method, 0.5),
               calibration=[(ids, None)])


def _shared(w, bits=3):
    from deepzip.kmeans import kmeans_1d

    mask = w != 0
    r = kmeans_1d(w[mask], bits, "linear")
    idx = torch.zeros(w.shape, dtype=torch.long)
    idx[mask] = torch.from_numpy(r.labels.astype("int64"))
    return torch.from_numpy(r.centroids).float(), idx, mask


def test_gptq_rounding_and_refitted_values_keep_the_outputs():
    from deepzip.obs import obs_assign, refit_codebook

    x = _correlated(2048)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    w[w.abs() < 0.5] = 0
    book, idx, mask = _shared(w)
    h = x.T @ x
    err = lambda b, i: float(((x @ w.T - x @ (b[i] * mask).T) ** 2).sum())  # noqa: E731
    refit = refit_codebook(w, idx, mask, h, book)
    assert err(refit, idx) < err(book, idx)  # least squares beats the weights' k-means
    gptq = obs_assign(w, h, book, mask)
    assert (gptq[~mask] == 0).all()
    assert err(book, gptq) < 0.6 * err(book, idx)
    assert err(refit_codebook(w, gptq, mask, h, book), gptq) <= err(book, gptq)
    # a cost on a value (its code length, priced) moves weights off it
    pricey = torch.zeros(len(book))
    pricey[0] = 1e3
    assert (obs_assign(w, h, book, mask, cost=pricey)[mask] != 0).all()


def test_quantize_with_calibration_chooses_clusters_for_the_outputs():
    from deepzip.quantize import QuantizeConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = _correlated(512)
    data = [(x[i:i + 128], None) for i in range(0, 512, 128)]
    plain, fitted = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(plain, QuantizeConfig(bits=2))
    layers = quantize_(fitted, QuantizeConfig(bits=2), calibration=data, calibration_batches=4)
    assert set(layers) == {"0", "2"} and all(v["bits"] == 2 for v in layers.values())
    with torch.no_grad():
        ref = model(x)
        assert ((fitted(x) - ref) ** 2).mean() < 0.7 * ((plain(x) - ref) ** 2).mean()
