import pickle

import pytest
import torch

from deepzip import DeepzipError
from deepzip.checkpoint import ModelSpec, extract_state_dict, load_checkpoint, save_checkpoint
from deepzip.models import CifarResNet, available, get


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
    with pytest.raises(DeepzipError, match="no such checkpoint file"):
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


@pytest.mark.slow
def test_shipped_baseline_reaches_its_accuracy(cifar_test):
    from deepzip import evaluate, pretrained
    from deepzip.data import BatchLoader

    model, spec = pretrained("resnet20")
    assert spec.arch == "resnet20" and sum(p.numel() for p in model.parameters()) == 269_722
    _, acc = evaluate(model, BatchLoader(cifar_test, 1000, mean=spec.mean, std=spec.std))
    assert acc >= 0.915


def _old_style(state, prefix=""):
    """A state_dict as older PyTorch saved it: BatchNorm without num_batches_tracked."""
    return {prefix + k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "net", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "model.", "_orig_mod.", "module._orig_mod."])
def test_checkpoints_as_people_have_them(tmp_path, wrapper, prefix):
    """DataParallel, Lightning and torch.compile prefixes, the common wrappers, and
    BatchNorm state from before PyTorch 0.4.1, in every combination."""
    torch.manual_seed(0)
    model = get("resnet20")
    state = _old_style(model.state_dict(), prefix)
    path = tmp_path / "ckpt.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 200}, path)
    loaded, _ = load_checkpoint(path)
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[k], v), k


def test_wrong_architecture_names_the_one_that_fits(tmp_path):
    path = tmp_path / "r32.th"
    torch.save({"state_dict": _old_style(get("resnet32").state_dict(), "module.")}, path)
    with pytest.raises(DeepzipError, match="it fits --arch resnet32"):
        load_checkpoint(path)
    model, spec = load_checkpoint(path, ModelSpec(arch="resnet32"))
    assert spec.arch == "resnet32" and len(model.layer1) == 5
    torch.save(get("lenet5").state_dict(), path)
    with pytest.raises(DeepzipError, match="--arch lenet5"):
        load_checkpoint(path)


def test_register_model_and_entry_points():
    from deepzip.models import register_model, resolve_arch

    class Tiny(torch.nn.Module):
        def __init__(self, width=4):  # no num_classes argument: still registers
            super().__init__()
            self.fc = torch.nn.Linear(width, 2)

    register_model("tiny-test", Tiny)
    assert isinstance(get("tiny-test"), Tiny)
    with pytest.raises(DeepzipError, match="taken"):
        register_model("tiny-test", lambda: Tiny(8))
    assert resolve_arch("regression_task:RegressionMLP") == "regression_task:RegressionMLP"
    assert get("regression_task:RegressionMLP")(torch.zeros(2, 16)).shape == (2, 1)
    with pytest.raises(DeepzipError, match="unknown model"):
        resolve_arch("resnet21")


def test_lenets_are_deep_compressions():
    assert sum(p.numel() for p in get("lenet5").parameters()) == 431_080
    assert sum(p.numel() for p in get("lenet300").parameters()) == 266_610
    x = torch.zeros(2, 1, 28, 28)
    assert get("lenet5")(x).shape == get("lenet300")(x).shape == (2, 10)


def test_model_spec_rejects_degenerate_normalization():
    for bad in [dict(std=(0.0, 1.0, 1.0)), dict(std=(float("nan"),) * 3), dict(mean=(0.5,)),
                dict(num_classes=0), dict(num_classes=10 ** 9)]:
        with pytest.raises(DeepzipError):
            ModelSpec(**bad)
    for bad in [{"arch": "resnet20", "num_classes": 1e30, "mean": [0], "std": [1]},
                {"arch": "resnet20", "num_classes": 10, "mean": [0] * 9, "std": [1] * 9},
                {"arch": ["x"], "num_classes": 10, "mean": [0], "std": [1]}]:
        with pytest.raises(DeepzipError, match="invalid model spec"):
            ModelSpec.from_dict(bad)


def test_meta_build_gives_the_real_shapes_without_memory():
    """What a file's architecture is checked against: the shapes of a real build, with
    the initializers' fills skipped (on meta they took 3-4x a real build) and no memory."""
    from torch import nn

    from deepzip.checkpoint import meta_build

    def others() -> nn.Module:  # initializers the shipped models do not use
        return nn.Sequential(nn.Embedding(50, 8, padding_idx=0), nn.LSTM(8, 8),
                             nn.TransformerEncoderLayer(8, 2, 16), nn.LayerNorm(8))

    for make in [*(lambda n=n: get(n) for n in available()), others]:
        torch.manual_seed(0)
        real = make().state_dict()
        with meta_build():
            meta = make().state_dict()
        assert {k: v.shape for k, v in meta.items()} == {k: v.shape for k, v in real.items()}
        assert all(v.is_meta for v in meta.values())
    assert not torch.empty(2).is_meta  # the mode ends with the block
