import pytest
import torch

from deepzip import DeepzipError, TrainConfig, evaluate, fit
from deepzip.data import BatchLoader
from deepzip.models import get
from deepzip.train import lr_factor


def test_lr_schedules():
    cfg = TrainConfig(schedule="cosine")
    assert lr_factor(0, 100, cfg, 10) == 1.0
    assert lr_factor(50, 100, cfg, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, cfg, 10) < 0.01
    ms = TrainConfig(schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(s, 100, ms, 10) for s in (0, 49, 50, 74, 75)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01])
    oc = TrainConfig(schedule="onecycle")
    assert lr_factor(0, 100, oc, 10) == pytest.approx(0.04)
    assert lr_factor(30, 100, oc, 10) == pytest.approx(1.0)
    warm = TrainConfig(schedule="constant", warmup_epochs=1)
    assert lr_factor(4, 100, warm, 10) == pytest.approx(0.5)
    assert lr_factor(10, 100, warm, 10) == 1.0


@pytest.mark.parametrize("bad", [dict(epochs=-1), dict(lr=0), dict(schedule="step"),
                                 dict(milestones=(1.5,)), dict(label_smoothing=1.0),
                                 dict(precision="int8"), dict(momentum=1.0)])
def test_bad_config(bad):
    with pytest.raises(DeepzipError):
        TrainConfig(**bad)
    with pytest.raises(DeepzipError, match="unknown"):
        TrainConfig.from_dict({"epoch": 3})


@pytest.fixture(scope="module")
def small(cifar_train, cifar_test):
    return cifar_train.subset(2560), cifar_test.subset(1000)


def _loaders(small, seed=0):
    train, test = small
    return (BatchLoader(train, 128, train=True, seed=seed, channels_last=True),
            BatchLoader(test, 500))


def test_fit_learns_and_logs(small, tmp_path):
    torch.manual_seed(0)
    model = get("resnet20")
    tr, te = _loaders(small)
    _, acc0 = evaluate(model, te)
    hist = fit(model, tr, TrainConfig(epochs=2, lr=0.05), test_loader=te, out_dir=tmp_path)
    assert len(hist) == 2 and hist[-1]["test_acc"] > max(0.2, acc0 + 0.05)
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"test_acc"' in lines[0]


def test_eval_every_skips_test_passes_without_changing_training(small):
    """Evaluation has no side effects: evaluating every epoch or only after the last one
    trains the same weights."""
    runs = {}
    for every in (1, 2, 0):
        torch.manual_seed(0)
        model = get("resnet20")
        tr = BatchLoader(small[0].subset(512), 128, train=True, channels_last=True)
        te = BatchLoader(small[1].subset(200), 100)
        hist = fit(model, tr, TrainConfig(epochs=3, lr=0.05, eval_every=every), test_loader=te)
        runs[every] = (model, ["test_acc" in h for h in hist])
    assert runs[1][1] == [True] * 3 and runs[2][1] == [False, True, True]  # and the last
    assert runs[0][1] == [False] * 3
    for every in (2, 0):
        for a, b in zip(runs[1][0].state_dict().values(), runs[every][0].state_dict().values(),
                        strict=True):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(small, tmp_path):
    cfg = TrainConfig(epochs=2, lr=0.05)
    torch.manual_seed(0)
    straight = get("resnet20")
    fit(straight, _loaders(small)[0], cfg, out_dir=tmp_path / "a")

    torch.manual_seed(0)
    part = get("resnet20")
    with pytest.raises(_Interrupt):  # dies in epoch 2 (20 steps/epoch)
        fit(part, _loaders(small)[0], cfg, out_dir=tmp_path / "b", after_step=_stop_after(25))
    torch.manual_seed(123)  # a fresh process: different RNG, fresh model
    resumed = get("resnet20")
    fit(resumed, _loaders(small)[0], cfg, out_dir=tmp_path / "b", resume=True)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


class _Interrupt(Exception):
    """Stands in for Ctrl-C or a killed process in the middle of an epoch."""


def _stop_after(steps):
    count = {"n": 0}

    def hook(model):
        count["n"] += 1
        if count["n"] > steps:
            raise _Interrupt
    return hook


def test_interrupted_run_leaves_last_epoch_checkpoint(small, tmp_path):
    torch.manual_seed(0)
    model = get("resnet20")
    with pytest.raises(_Interrupt):
        fit(model, _loaders(small)[0], TrainConfig(epochs=3), out_dir=tmp_path,
            after_step=_stop_after(25))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_hooks_filter_and_after_step(small):
    torch.manual_seed(0)
    model = get("resnet20")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    fit(model, _loaders(small)[0], TrainConfig(epochs=1, weight_decay=0),
        param_filter=lambda n, p: n.startswith("linear"),
        after_step=lambda m: calls.append(1))
    assert len(calls) == 20
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("linear"), n
    with pytest.raises(DeepzipError, match="no parameters"):
        fit(model, _loaders(small)[0], TrainConfig(epochs=1), param_filter=lambda n, p: False)


def test_distillation_loss():
    from torch import nn

    from deepzip.train import Distillation

    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logits = torch.randn(8, 3)
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(Distillation(teacher, alpha=0)(logits, y, x), ce)
    same = teacher(x).detach()
    assert Distillation(teacher, alpha=1)(same, y, x).abs() < 1e-6  # imitates perfectly
    assert Distillation(teacher, alpha=1)(logits, y, x) > 0.01
    with pytest.raises(DeepzipError):
        Distillation(teacher, alpha=2)


def test_lr_scale_per_parameter(small):
    torch.manual_seed(0)
    model = get("resnet20")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, _loaders(small)[0], TrainConfig(epochs=1),
        lr_scale=lambda n, p: 0.0 if n.startswith("linear") else 1.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("linear"), n


@pytest.mark.parametrize(("capability", "expected"), [("AVX512", "bf16"), ("AVX2", "fp32"),
                                                      ("DEFAULT", "fp32")])
def test_auto_precision_trains_in_bf16_only_on_cpus_that_compute_it(monkeypatch, capability,
                                                                    expected):
    """bf16 autocast on a CPU without AVX-512 is emulated, ~10x slower than fp32."""
    from deepzip.train import auto_precision

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert auto_precision(torch.device("cpu")) == expected


def test_batchnorm_statistics_are_re_estimated_without_changing_weights():
    from torch import nn

    from deepzip.train import recalibrate_batchnorm_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    weights = [p.clone() for p in model.parameters()]
    x = 3 + 2 * torch.randn(64, 3, 8, 8)
    batches = [(x[i:i + 16], None) for i in range(0, 64, 16)]
    assert recalibrate_batchnorm_(model, batches, batches=4) == 1
    with torch.no_grad():
        y = model[0](x)
    bn = model[1]
    assert torch.allclose(bn.running_mean, y.mean((0, 2, 3)), atol=1e-4)
    assert not model.training and bn.momentum == 0.1  # as it was
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
