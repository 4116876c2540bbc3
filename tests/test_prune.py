import copy

import pytest
import torch
from torch import nn

from deepzip import DeepzipError, TrainConfig, fit
from deepzip.data import BatchLoader, ImageSplit
from deepzip.models import get
from deepzip.prune import (
    AGPSchedule,
    PruneConfig,
    agp_sparsity,
    bake_,
    global_masks,
    kernel_scores,
    masks,
    percentile_mask,
    prunable,
    prune_,
    restore_masks_,
    sensitivity,
    sparsity_of,
    std_mask,
    std_threshold,
    targets_from_sensitivity,
)
from deepzip.report import structure, summary


@pytest.mark.parametrize("shape", [(7,), (16, 3, 3, 3), (64, 32, 3, 3), (10, 64), (1,)])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.64, 0.75, 0.99])
def test_percentile_sparsity_within_one_weight(shape, q):
    w = torch.randn(shape)
    mask = percentile_mask(w, q)
    assert abs((mask == 0).sum().item() - q * w.numel()) <= 0.5 + 1e-9
    kept, pruned = w[mask == 1].abs(), w[mask == 0].abs()
    if kept.numel() and pruned.numel():
        assert pruned.max() <= kept.min()


def test_percentile_with_ties_is_exact():
    w = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert (percentile_mask(w, 0.75) == 0).sum() == 6


def test_std_threshold_is_s_times_std():
    w = torch.randn(1000)
    for s in [0.0, 0.25, 0.5, 1.0]:
        thr = std_threshold(w, s)
        assert thr == pytest.approx(s * w.std().item(), rel=1e-6)
        assert torch.equal(std_mask(w, s), (w.abs() >= thr).float())


def test_global_meets_sparsity_exactly():
    ws = {"a": torch.randn(100, 10), "b": torch.randn(37) * 3, "c": torch.randn(5, 5, 3, 3)}
    n = sum(w.numel() for w in ws.values())
    for sp in [0.0, 0.3, 0.8, 0.95]:
        ms = global_masks(ws, sp)
        assert sum(int((m == 0).sum()) for m in ms.values()) == round(sp * n)
    ms = global_masks(ws, 0.5)
    assert (ms["b"] == 0).float().mean() < (ms["a"] == 0).float().mean()  # larger weights


@pytest.mark.parametrize("bad", [lambda: percentile_mask(torch.randn(3), 1.0),
                                 lambda: percentile_mask(torch.randn(3), -0.1),
                                 lambda: std_threshold(torch.randn(3), -1),
                                 lambda: std_threshold(torch.randn(3), float("nan")),
                                 lambda: global_masks({"a": torch.randn(3)}, 1.0),
                                 lambda: PruneConfig("magic", 0.5),
                                 lambda: PruneConfig("percentile", 1.5),
                                 lambda: PruneConfig("std", -0.5)])
def test_out_of_range_is_a_clear_error(bad):
    with pytest.raises(DeepzipError):
        bad()


def test_prune_model_include_exclude_and_bake_keeps_outputs():
    torch.manual_seed(0)
    model = get("resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    sp = prune_(model, PruneConfig("percentile", 0.5, exclude=["conv1", "linear"]))
    assert "conv1" not in sp and "linear" not in sp and len(sp) == 18
    assert all(abs(v - 0.5) < 1e-3 for v in sp.values())
    conv = model.layer1[0].conv1
    assert isinstance(conv.parametrizations.weight.original, nn.Parameter)
    assert masks(model)["layer1.0.conv1"].dtype == torch.bool  # a quarter of fp32's bytes
    assert not any(isinstance(v, torch.Tensor) for v in vars(conv).values())  # no copy kept
    out = model(x)
    bake_(model)
    assert not masks(model)
    assert isinstance(model.layer1[0].conv1.weight, nn.Parameter)
    assert torch.equal(model(x), out)
    assert set(model.state_dict()) == set(get("resnet20").state_dict())
    restored = restore_masks_(model)
    assert len(restored) == 18 and torch.equal(model(x), out)


def test_baking_a_deep_copy_leaves_the_original_masked():
    """A deep copy of a parametrized module shares its class: baking the copy (a scored
    step, a trial) must not strip the original's masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prune_(model, PruneConfig("global", 0.5))
    x = torch.randn(3, 8)
    out = model(x)
    baked = bake_(copy.deepcopy(model))
    assert not masks(baked) and type(baked[0]) is nn.Linear
    assert set(masks(model)) == {"0", "2"} and torch.equal(model(x), out)
    assert torch.equal(baked(x), out)


def test_a_torch_pruned_model_is_taken_over_with_its_zeros():
    """A user's own ``torch.nn.utils.prune`` mask: its zeros stay pruned under deepzip's."""
    from torch.nn.utils import prune as tprune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    tprune.random_unstructured(model[0], "weight", amount=0.5)
    user = model[0].weight_mask.bool().clone()
    prune_(model, PruneConfig("percentile", 0.25))
    mask = masks(model)["0"]
    assert not hasattr(model[0], "weight_mask") and not mask[~user].any()
    assert torch.equal(model[0].weight != 0, mask)


def test_repeated_pruning_tightens_and_keeps_zeros():
    torch.manual_seed(0)
    model = get("resnet20")
    prune_(model, PruneConfig("percentile", 0.5))
    first = {n: m.clone() for n, m in masks(model).items()}
    sp = prune_(model, PruneConfig("percentile", 0.64))
    for n, m in masks(model).items():
        assert torch.all(m <= first[n])
        assert abs(sp[n] - 0.64) < 2 / m.numel() + 1e-6


def _random_loader(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return BatchLoader(ImageSplit(images, torch.randint(0, 10, (n,), generator=g)), 64,
                       train=True, channels_last=True)


def test_masks_survive_training_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = get("resnet20")
    prune_(model, PruneConfig("global", 0.8))
    before = {n: m.clone() for n, m in masks(model).items()}
    fit(model, _random_loader(), TrainConfig(epochs=6, lr=0.1, momentum=0.9,
                                             weight_decay=5e-3, schedule="constant"))
    for t in prunable(model):
        assert torch.equal(masks(model)[t.name], before[t.name])
        assert torch.all(t.weight[before[t.name] == 0] == 0), t.name
    changed = model.layer2[0].conv1.weight[before["layer2.0.conv1"] == 1]
    assert changed.abs().sum() > 0
    assert sparsity_of(bake_(model)) == pytest.approx(0.8, abs=1e-5)


def test_agp_ramp_and_hook():
    assert agp_sparsity(0, 0.0, 0.8, 0, 100) == 0.0
    assert agp_sparsity(100, 0.0, 0.8, 0, 100) == pytest.approx(0.8)
    assert agp_sparsity(50, 0.0, 0.8, 0, 100) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert agp_sparsity(200, 0.0, 0.8, 0, 100) == pytest.approx(0.8)
    torch.manual_seed(0)
    model = get("resnet20")
    agp = AGPSchedule(model, final=0.7, start=0, end=16, frequency=4,
                      per_layer={"linear": 0.3})
    hist = fit(model, _random_loader(), TrainConfig(epochs=2, lr=0.01), after_step=agp)
    assert 0 < hist[0]["sparsity"] < hist[1]["sparsity"] == sparsity_of(model)  # logged ramp
    sp = {n: 1 - float(m.float().mean()) for n, m in masks(model).items()}
    assert sp["linear"] == pytest.approx(0.3, abs=1e-3)
    assert sp["layer3.2.conv2"] == pytest.approx(0.7, abs=1e-3)


def test_summary_and_structure():
    model = get("resnet20")
    with torch.no_grad():
        model.layer1[0].conv1.weight[3] = 0  # one all-zero filter
    s = summary(model)
    assert s["total"]["params"] + s["total"]["other_params"] == 269_722
    row = next(r for r in s["layers"] if r["name"] == "layer1.0.conv1")
    assert row["nonzero"] == 2304 - 144 and row["sparsity"] == pytest.approx(1 / 16)
    st = structure(model, ["layer1.0.conv1"])["layer1.0.conv1"]
    assert st["empty_filters"] == 1 and st["filter_zero_fraction"][3] == 1.0
    assert st["empty_channels"] == 0 and len(st["channel_l1"]) == 16
    with pytest.raises(DeepzipError, match="no prunable layer"):
        structure(model, ["layer9"])


def test_sensitivity_leaves_model_alone_and_targets():
    model = get("resnet20")
    ref = copy.deepcopy(model.state_dict())
    rows = sensitivity(model, lambda m: 1 - sparsity_of(m), (0.5, 0.9), progress=False)
    assert len(rows) == 1 + 20 * 2
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    r = next(r for r in rows if r["layer"] == "linear" and r["level"] == 0.9)
    assert r["accuracy"] == pytest.approx(1 - 576 / 268336, abs=1e-6)
    fake = [{"layer": "(none)", "level": 0, "accuracy": 0.9},
            {"layer": "a", "level": 0.5, "accuracy": 0.9}, {"layer": "a", "level": 0.7,
                                                           "accuracy": 0.85},
            {"layer": "a", "level": 0.9, "accuracy": 0.9},  # lucky point after a failure
            {"layer": "b", "level": 0.5, "accuracy": 0.7}]
    assert targets_from_sensitivity(fake, 0.01) == {"a": 0.5, "b": 0.0}


def test_agp_global_threshold_meets_model_target_unevenly():
    torch.manual_seed(0)
    model = get("resnet20")
    agp = AGPSchedule(model, final=0.8, start=0, end=8, frequency=4, global_=True)
    fit(model, _random_loader(), TrainConfig(epochs=1, lr=0.01), after_step=agp)  # 8 steps
    sp = [1 - float(m.float().mean()) for m in masks(model).values()]
    assert sparsity_of(model) == pytest.approx(0.8, abs=1e-4)
    assert max(sp) - min(sp) > 0.1  # layers differ, unlike per-layer pruning
    with pytest.raises(DeepzipError):
        AGPSchedule(model, final=0.8, start=0, end=8, global_=True, per_layer={"linear": 0.5})


def test_kernel_scores_prune_weak_kernels_first():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    w[0, 0] *= 0.02  # one weak kernel
    assert torch.equal(kernel_scores(w, 0.0), w.abs())
    s = kernel_scores(w, 2.0)
    r = w.flatten(2).norm(dim=2)
    raw = w.abs() * (r / r.mean()).view(4, 3, 1, 1) ** 2
    assert torch.allclose(s, raw * w.abs().mean() / raw.mean())
    assert torch.isclose(s.mean(), w.abs().mean())  # comparable across layers
    mask = percentile_mask(s, 9 / w.numel())  # nine weights go: the weak kernel, whole
    assert torch.all(mask[0, 0] == 0) and mask.sum() == w.numel() - 9
    lin = torch.randn(5, 7)
    assert torch.equal(kernel_scores(lin, 2.0), lin.abs())  # no kernels: magnitude
    assert torch.equal(kernel_scores(torch.zeros(2, 2, 3, 3), 2.0), torch.zeros(2, 2, 3, 3))


def _empty_kernels(model):
    return sum(int((m.flatten(2).sum(2) == 0).sum()) for m in masks(model).values()
               if m.dim() == 4)


def test_agp_kernel_exponent_gathers_nonzeros_in_fewer_kernels():
    counts = []
    for exponent in (0.0, 2.0):
        torch.manual_seed(0)
        model = get("resnet20")
        agp = AGPSchedule(model, final=0.8, start=0, end=8, frequency=4, global_=True,
                          kernel_exponent=exponent)
        fit(model, _random_loader(), TrainConfig(epochs=1, lr=0.01), after_step=agp)
        assert sparsity_of(model) == pytest.approx(0.8, abs=1e-4)
        counts.append(_empty_kernels(model))
    assert counts[1] > 1.2 * counts[0]
    with pytest.raises(DeepzipError, match="kernel_exponent"):
        AGPSchedule(get("resnet20"), final=0.8, start=0, end=8, kernel_exponent=-1.0)


def test_kernel_scores_keep_a_global_threshold_fair_to_the_classifier():
    """Unscaled, the inflated conv scores pruned ResNet-20's classifier away entirely."""
    torch.manual_seed(0)
    targets = prunable(get("resnet20"))

    def kept(scores):
        return float(global_masks(scores, 0.9)["linear"].mean())

    plain = kept({t.name: t.weight.abs() for t in targets})
    unscaled = {}
    for t in targets:
        w = t.weight.detach().abs()
        r = w.flatten(2).norm(dim=2)[..., None, None] if w.dim() == 4 else None
        unscaled[t.name] = w if r is None else w * (r / r.mean()) ** 4
    assert kept(unscaled) < 0.5 * plain  # the failure (on trained weights: all of it)
    assert kept({t.name: kernel_scores(t.weight, 4.0) for t in targets}) > 0.8 * plain


@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_selection_by_counting_matches_a_stable_sort(monkeypatch, chunk):
    """smallest_masks (radix counting, chunked) prunes exactly what a stable argsort of
    all magnitudes would: ties by position across tensors, fp16 too."""
    import deepzip.prune as p

    monkeypatch.setattr(p, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    for trial in range(120):
        if trial % 3 == 0:  # many ties
            ws = [torch.randint(-3, 4, (40,), generator=gen).float() for _ in range(2)]
        else:
            ws = [torch.randn(int(torch.randint(1, 50, (1,), generator=gen)), generator=gen)
                  for _ in range(3)]
        if trial % 5 == 0:
            ws = [w.half() for w in ws]
        flat = torch.cat([w.abs().float().flatten() for w in ws])
        k = int(torch.randint(0, flat.numel() + 1, (1,), generator=gen))
        ref = torch.ones(flat.numel(), dtype=torch.bool)
        ref[torch.argsort(flat, stable=True)[:k]] = False
        got = torch.cat([m.flatten() for m in p.smallest_masks(ws, k)])
        assert torch.equal(ref, got), (trial, k)


def test_in_place_pruning_keeps_no_masks_and_matches_the_masked_path():
    from deepzip.prune import bake_, is_pruned

    torch.manual_seed(0)
    a = get("resnet20")
    b = copy.deepcopy(a)
    sa = prune_(a, PruneConfig("global", 0.8), bake=True)
    sb = prune_(b, PruneConfig("global", 0.8))
    assert sa == sb
    assert not any(is_pruned(m) for m in a.modules())
    bake_(b)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert set(sd_a) == set(sd_b) and all(torch.equal(v, sd_b[k]) for k, v in sd_a.items())


# ---------------------------------------------------------------- without retraining
def test_wanda_prunes_each_row_by_weight_times_input_norm():
    """Wanda (Sun et al. 2023): a weight's score is |w| x the norm of the input feature
    it multiplies, compared within its output row."""
    from deepzip.prune import PruneConfig, prune_

    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3))
    x = torch.tensor([[10.0, 1.0, 1.0, 0.1]])  # input 0 large, input 3 nearly silent
    model = nn.Sequential(layer)
    prune_(model, PruneConfig("wanda", 0.5), bake=True, calibration=[(x, None)])
    # scores per row: 10, 2, 3, 0.4 -> inputs 1 and 3 go, though w[3] is the largest
    assert layer.weight.tolist() == [[1.0, 0.0, 3.0, 0.0]] * 3
    with pytest.raises(DeepzipError, match="calibration"):
        prune_(nn.Sequential(nn.Linear(4, 3)), PruneConfig("wanda", 0.5))


def test_wanda_scores_a_grouped_convolution_by_its_own_input_channels():
    from deepzip.prune import wanda_scores

    conv = nn.Conv2d(4, 4, 3, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0])  # per input channel
    s = wanda_scores(conv.weight, norms, conv)
    # outputs 0-1 see channels 0-1, outputs 2-3 see channels 2-3
    assert s[:, :, 0, 0].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]


def test_each_row_keeps_its_share():
    from deepzip.prune import row_mask

    scores = torch.rand(5, 3, 3, 3)
    keep = row_mask(scores, 0.7)
    assert (keep.reshape(5, -1).sum(1) == 27 - round(0.7 * 27)).all()


def test_n_of_every_m_weights_are_kept():
    from deepzip.prune import PruneConfig, prune_, row_mask

    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 9.0, 8.0, 7.0, 6.0, 5.0, 0.5]])
    assert row_mask(scores, 0.5, "2:4").int().tolist() == [[1, 0, 1, 0, 1, 1, 0, 0, 1, 0]]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    prune_(model, PruneConfig("percentile", 0.0, n_m="2:4"), bake=True)
    groups = (model[0].weight != 0).reshape(8, 4, 4).sum(2)
    assert (groups == 2).all()  # two of every four, in every group of every row
    with pytest.raises(DeepzipError, match="N:M"):
        PruneConfig("percentile", 0.5, n_m="half")
    with pytest.raises(DeepzipError, match="percentile .* wanda and sparsegpt"):
        PruneConfig("global", 0.5, n_m="2:4")
