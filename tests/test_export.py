"""Export to ONNX and safetensors: the optional extra (pip install "deepzip[export]").
Skipped cleanly without it; one step of .ci/run installs the extra and runs these."""

import json

import pytest
import torch

from deepzip.cli import main
from deepzip.dzip import load_state, save
from deepzip.models import ModelSpec, get
from deepzip.prune import PruneConfig, prune_
from deepzip.quantize import QuantizeConfig, quantize_


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    torch.manual_seed(0)
    model = get("resnet20").eval()
    prune_(model, PruneConfig("global", 0.8))
    quantize_(model, QuantizeConfig(bits=4))
    path = tmp_path_factory.mktemp("e") / "r20.dzip"
    save(model, path, spec=ModelSpec())
    return path


def test_onnx_export_matches_pytorch(capsys, tmp_path, data_root, small_file):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    capsys.readouterr()
    rc = main(["export", str(small_file), "-o", str(tmp_path / "m.onnx"), "--subset", "500",
               "--data-dir", str(data_root)])
    out = capsys.readouterr().out
    assert rc == 0 and "onnx.checker passed" in out
    assert "predictions equal on 500/500" in out
    diff = float(out.split("max output difference ")[1].split(",")[0])
    assert diff < 1e-3
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # any batch size
    y = session.run(None, {session.get_inputs()[0].name:
                           np.zeros((3, 3, 32, 32), np.float32)})[0]
    assert y.shape == (3, 10)


def test_safetensors_dense_and_sparse(capsys, tmp_path, small_file):
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    state, _ = load_state(small_file)
    assert main(["decode", str(small_file), "-o", str(tmp_path / "m.safetensors")]) == 0
    model = get("resnet20")
    model.load_state_dict(st.load_file(tmp_path / "m.safetensors"))  # plain, no pickle
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert main(["decode", str(small_file), "-o", str(tmp_path / "s.safetensors"),
                 "--sparse"]) == 0
    sparse = st.load_file(tmp_path / "s.safetensors")
    with safe_open(tmp_path / "s.safetensors", "pt") as f:
        shapes = json.loads(f.metadata()["deepzip.sparse"])
        assert json.loads(f.metadata()["deepzip.spec"])["arch"] == "resnet20"
    assert "layer3.2.conv2.weight" in shapes
    for k, shape in shapes.items():
        rebuilt = torch.zeros(shape).flatten()
        rebuilt[sparse[f"{k}.indices"]] = sparse[f"{k}.values"]
        assert torch.equal(rebuilt.view(shape), state[k])
    assert (tmp_path / "s.safetensors").stat().st_size < (tmp_path / "m.safetensors").stat(
    ).st_size


def test_missing_extra_names_it(capsys, tmp_path, small_file, monkeypatch):
    import sys

    for name in ("onnx", "onnxscript", "onnxruntime", "safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # import now fails, as without the extra
    for argv in (["decode", str(small_file), "-o", str(tmp_path / "x.safetensors")],
                 ["export", str(small_file), "-o", str(tmp_path / "x.onnx")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert 'pip install "deepzip[export]"' in err and err.count("\n") == 1
