"""Export to ONNX and safetensors: the optional extra (pip install "deepzip[export]").
Skipped cleanly without it; one step of .ci/run installs the extra and runs these."""

import json

import pytest
import torch

from deepzip.checkpoint import ModelSpec
from deepzip.cli import main
from deepzip.dzip_torch import load_state, save
from deepzip.models import get
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
    import onnx
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # any batch size
    y = session.run(None, {session.get_inputs()[0].name:
                           np.zeros((3, 3, 32, 32), np.float32)})[0]
    assert y.shape == (3, 10)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["deepzip.normalization_in_graph"] == "true" and "[0, 1]" in meta["deepzip.input"]
    assert json.loads(meta["deepzip.mean"]) == pytest.approx([0.4914, 0.4822, 0.4465])


@pytest.mark.parametrize("name,normalize", [("resnet20", "imagenet"), ("lenet5", None)])
def test_onnx_on_plain_images_scores_what_deepzip_eval_reports(capsys, tmp_path, data_root,
                                                                name, normalize):
    """A deployment feeds [0, 1] pixels: the exported graph must score deepzip eval's
    accuracy on them (ResNet-20 with ImageNet constants, LeNet-5 on MNIST)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from deepzip.data import load_cifar10, load_mnist
    from deepzip.loading import load_model

    model, spec = load_model(name)
    if normalize:
        from deepzip.data import parse_normalize

        mean, std = parse_normalize(normalize)
        spec = ModelSpec(arch=name, mean=mean, std=std, task="cifar10")
    path = tmp_path / f"{name}.dzip"
    save(model, path, spec=spec)
    capsys.readouterr()
    assert main(["eval", str(path), "--subset", "1000", "--data-dir", str(data_root),
                 "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["test_acc"]
    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx"), "--subset", "1000",
                 "--data-dir", str(data_root)]) == 0
    split = (load_mnist if name == "lenet5" else load_cifar10)(data_root, train=False)
    x = split.images[:1000].float().numpy() / 255  # plain pixels, as a user has them
    session = ort.InferenceSession(str(tmp_path / "m.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    acc = float((logits.argmax(1) == split.labels[:1000].numpy()).mean())
    assert acc == pytest.approx(reported, abs=0.002)


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
        assert sparse[f"{k}.indices"].dtype in (torch.int16, torch.int32)  # the smallest
        rebuilt[sparse[f"{k}.indices"].long()] = sparse[f"{k}.values"]
        assert torch.equal(rebuilt.view(shape), state[k])
    assert (tmp_path / "s.safetensors").stat().st_size < (tmp_path / "m.safetensors").stat(
    ).st_size


def test_deepzip_reads_the_safetensors_it_writes_with_their_normalization(
        capsys, tmp_path, data_root):
    """eval of a decoded .safetensors (or checkpoint) uses the normalization it records,
    so it scores exactly what the .dzip scores (ImageNet constants, not CIFAR's)."""
    pytest.importorskip("safetensors")
    from deepzip.data import parse_normalize
    from deepzip.loading import load_model

    model, _ = load_model("resnet20")
    mean, std = parse_normalize("imagenet")
    save(model, tmp_path / "m.dzip", spec=ModelSpec(mean=mean, std=std), raw_dtype="float32")
    scores = {}
    for name, extra in (("m.dzip", []), ("m.safetensors", []), ("s.safetensors", ["--sparse"]),
                        ("m.pt", [])):
        if name != "m.dzip":
            assert main(["decode", str(tmp_path / "m.dzip"), "-o", str(tmp_path / name),
                         *extra]) == 0
        capsys.readouterr()
        assert main(["eval", str(tmp_path / name), "--subset", "500", "--json",
                     "--data-dir", str(data_root)]) == 0
        scores[name] = json.loads(capsys.readouterr().out)
    assert scores["m.safetensors"]["mean"] == pytest.approx(list(mean))
    assert {s["test_acc"] for s in scores.values()} == {scores["m.dzip"]["test_acc"]}
    assert {s["test_loss"] for s in scores.values()} == {scores["m.dzip"]["test_loss"]}


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


def test_a_language_model_exports_with_a_dynamic_sequence_and_scores_per_token(
        capsys, tmp_path, monkeypatch):
    """A tied-embedding LM: the export's own check counts tokens (padding left out), the
    sequence axis takes any length, and the shared weights stay packed."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import re
    import sys
    from pathlib import Path

    import numpy as np

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    monkeypatch.chdir(examples)
    sys.modules.pop("tiny_lm", None)
    import tiny_lm

    model = tiny_lm.train(str(tmp_path / "lm.pt"), epochs=2)
    quantize_(model, QuantizeConfig(bits=4))
    save(model, tmp_path / "lm.dzip", spec=ModelSpec(arch="tiny_lm:TinyLM"))
    lm = ["--arch", "tiny_lm:TinyLM", "--task", "tiny_lm:make_task"]
    capsys.readouterr()
    assert main(["export", str(tmp_path / "lm.dzip"), "-o", str(tmp_path / "lm.onnx"),
                 "--dynamic-axes", "0,1", *lm]) == 0
    out = capsys.readouterr().out
    assert "dynamic batch, axis 1" in out and "shared weights packed" in out
    same = re.search(r"predictions equal on (\d+)/(\d+) tokens", out)
    assert same and same[1] == same[2] and int(same[2]) > 512  # tokens, not sequences
    onnx_acc, eval_acc = re.search(
        r"accuracy per token: onnxruntime ([\d.]+)% on token ids, deepzip eval ([\d.]+)%",
        out).groups()
    assert onnx_acc == eval_acc and 20 < float(eval_acc) < 100
    s = ort.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    y = s.run(None, {s.get_inputs()[0].name: np.zeros((3, 57), np.int64)})[0]
    assert y.shape == (3, 57, tiny_lm.VOCAB)  # another sequence length than the example's
