import pickle

import pytest
import torch

from deepzip import DeepzipError
from deepzip.models import (
    CifarResNet,
    ModelSpec,
    available,
    extract_state_dict,
    get,
    load_checkpoint,
    save_checkpoint,
)


@pytest.mark.parametrize("name,depth", [("resnet20", 20), ("resnet32", 32), ("resnet44", 44),
                                        ("resnet56", 56), ("resnet110", 110)])
def test_registry_builds_depth(name, depth):
    model = get(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == depth  # conv layers + the linear classifier
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_parameter_count_and_names():
    model = get("resnet20")
    assert sum(p.numel() for p in model.parameters()) == 269_722
    keys = set(model.state_dict())
    for k in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
              "layer2.2.bn2.weight", "layer3.0.conv2.weight", "linear.weight", "linear.bias"]:
        assert k in keys
    assert not any("shortcut" in k for k in keys)  # option A has no parameters


def test_option_a_shortcut_pads_channels_and_subsamples():
    block = get("resnet20").layer2[0]
    x = torch.randn(1, 16, 32, 32)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 16, 16)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0


def test_unknown_model_and_bad_depth():
    with pytest.raises(DeepzipError, match="available"):
        get("resnet21")
    with pytest.raises(DeepzipError):
        CifarResNet(depth=21)
    assert available()[0] == "resnet20"


def test_public_layout_checkpoint_loads(tmp_path):
    model = get("resnet20")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
               "best_prec1": 91.7}
    path = tmp_path / "public.th"
    torch.save(wrapped, path)
    loaded, spec = load_checkpoint(path)
    assert spec == ModelSpec()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    torch.save({"model": model.state_dict()}, path)  # the other common wrapper
    load_checkpoint(path)


def test_mismatched_checkpoint_names_keys(tmp_path):
    state = get("resnet20").state_dict()
    state.pop("linear.weight")
    state["fc.weight"] = torch.zeros(10, 64)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(DeepzipError, match=r"missing keys: linear\.weight.*unexpected keys: "
                                           r"fc\.weight"):
        load_checkpoint(path)
    with pytest.raises(DeepzipError, match="shape mismatch"):
        torch.save(get("resnet20", num_classes=100).state_dict(), path)
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f, protocol=2)
    with pytest.raises(DeepzipError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(DeepzipError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(DeepzipError, match="no state_dict"):
        extract_state_dict([1, 2])


def test_save_checkpoint_roundtrips_spec(tmp_path):
    spec = ModelSpec(arch="resnet32", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = spec.build().to(memory_format=torch.channels_last)
    save_checkpoint(model, spec, tmp_path / "m.pt")
    loaded, got = load_checkpoint(tmp_path / "m.pt")
    assert got == spec
    assert not loaded.training
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt"]  # no temp file left behind


def test_shipped_baseline_reaches_its_accuracy(cifar_test):
    from deepzip import evaluate, pretrained
    from deepzip.data import BatchLoader

    model, spec = pretrained("resnet20")
    assert spec.arch == "resnet20" and sum(p.numel() for p in model.parameters()) == 269_722
    _, acc = evaluate(model, BatchLoader(cifar_test, 1000, mean=spec.mean, std=spec.std))
    assert acc >= 0.915
