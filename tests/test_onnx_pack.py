"""Shared weights that stay compressed inside an ONNX graph: the packing core in NumPy
(always), and the graph it builds against the fp32 export under onnxruntime (with the
export extra)."""

import numpy as np
import pytest
import torch

from deepzip.onnx_pack import _with_fillers, pack_weight, row_scales


def test_fillers_bridge_gaps_too_long_for_the_width():
    where = np.array([0, 3, 40, 41, 300])
    for bits in (1, 2, 4, 8):
        full = _with_fillers(where, bits)
        assert set(where) <= set(full.tolist())
        assert np.diff(full, prepend=-1).max() <= 1 << bits  # every gap now fits
        assert len(full) == len(set(full.tolist()))


def test_a_shared_weight_packs_to_exactly_itself():
    rng = np.random.default_rng(0)
    book = rng.normal(size=12).astype(np.float32)
    w = book[rng.integers(0, 12, (32, 16, 3, 3))]
    w[rng.random(w.shape) < 0.85] = 0  # mostly pruned
    p = pack_weight(w)
    assert p is not None and p.nbytes < w.nbytes / 6
    assert np.array_equal(p.decode(), w)
    assert pack_weight(rng.normal(size=(64, 64)).astype(np.float32)) is None  # not shared


def test_a_weight_scaled_per_channel_keeps_one_codebook():
    """The exporter folds a BatchNorm into the convolution: each output channel is the
    shared weight times the channel's scale, which is found exactly."""
    rng = np.random.default_rng(1)
    book = rng.normal(size=16).astype(np.float32)
    w = book[rng.integers(0, 16, (32, 8, 3, 3))]
    s = rng.uniform(0.1, 3, 32).astype(np.float32)
    folded = w * s.reshape(-1, 1, 1, 1)  # as the exporter computes it, in fp32
    assert pack_weight(folded) is None  # too many values without the model's weight
    found = row_scales(folded, w)  # s itself, or an fp32 neighbour giving the same products
    assert np.array_equal(w * found.reshape(-1, 1, 1, 1), folded)
    p = pack_weight(folded, w)
    assert p is not None and p.scales is not None
    assert np.array_equal(p.decode(), folded)
    folded[3, 0, 0, 0] += 1e-3  # no longer a scaled codebook: left as it is
    assert pack_weight(folded, w) is None


def test_the_packed_export_computes_what_the_fp32_export_computes(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from deepzip.export import to_onnx
    from deepzip.models import get
    from deepzip.prune import PruneConfig, prune_
    from deepzip.quantize import QuantizeConfig, dequantize_, quantize_

    torch.manual_seed(0)
    model = get("resnet20").eval()
    for m in model.modules():  # BatchNorm that is not the identity: scales to find
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2)
            m.running_var.uniform_(0.5, 2)
    prune_(model, PruneConfig("global", 0.85), bake=True)
    quantize_(model, QuantizeConfig(bits=4))
    dequantize_(model)
    x = torch.rand(2, 3, 32, 32)
    report = to_onnx(model, x, tmp_path / "p.onnx")
    to_onnx(model, x, tmp_path / "f.onnx", packed=False)
    assert len(report.packed) >= 19 and not report.kept  # every conv and the linear layer
    assert (tmp_path / "p.onnx").stat().st_size * 5 < (tmp_path / "f.onnx").stat().st_size
    batch = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    outs = []
    for name in ("f.onnx", "p.onnx"):
        s = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {s.get_inputs()[0].name: batch})[0])
    assert np.array_equal(outs[0], outs[1])  # the same weights, bit for bit
    import onnx

    packed, plain = (onnx.load(tmp_path / n).graph for n in ("p.onnx", "f.onnx"))
    # what a session folds when it starts: about a dozen nodes, and two per weight at most
    assert len(packed.node) - len(plain.node) <= 14 + 2 * len(report.packed)
    assert not any(n.metadata_props for n in packed.node)  # no exporter provenance
