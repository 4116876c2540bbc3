"""A budget that means what it says: points for an accuracy, a percent of the baseline
for any other metric unless absolute units are asked for, metrics that average as their
PyTorch namesakes do, and a budget the validation data's noise leaves nothing of refused
before any training."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepzip
from deepzip.budget import Budget, margin_estimate, needed_examples
from deepzip.errors import DeepzipError

sys.path.insert(0, str(Path(__file__).parent))
from regression_task import RegressionMLP, data  # noqa: E402


@pytest.mark.parametrize("value,metric,allowed", [
    (1, "acc", 1.0),                 # a number is points for an accuracy
    (1.0, "mse", 0.0002),            # and a percent of the baseline for anything else
    ("1%", "mse", 0.0002),
    ("1%", "acc", 0.92),             # relative for an accuracy too: 1% of 92 points
    ("0.5 mse", "mse", 0.5),         # absolute, in the metric's units
    ("0.01 acc", "acc", 1.0),
    ("2 points", "acc", 2.0),
    (" 3e-1 % ", "ppl", 0.00006),
])
def test_a_budget_in_the_users_terms(value, metric, allowed):
    points = metric == "acc"
    base = 0.92 if points else 0.02
    got = Budget.parse(value, metric, points=points).allowed(points=points, baseline=base)
    assert got == pytest.approx(allowed)


@pytest.mark.parametrize("value,match", [
    ("1 point", "points are for an accuracy"), ("0.1 mae", "the metric here is mse"),
    ("lots", "write a number"), (-1, ">= 0"), (True, "a number or a text"),
    (float("nan"), ">= 0 and finite")])
def test_a_budget_that_means_nothing_is_refused(value, match):
    with pytest.raises(DeepzipError, match=match):
        Budget.parse(value, "mse", points=False)


def test_mean_squared_error_averages_as_nn_mseloss_does():
    torch.manual_seed(0)
    out, target = torch.randn(50, 3), torch.randn(50, 3)
    for metric, loss in [(deepzip.MeanSquaredError(), nn.MSELoss()),
                         (deepzip.MeanAbsoluteError(), nn.L1Loss())]:
        metric.reset()
        metric.update(out[:20], target[:20])
        metric.update(out[20:], target[20:])
        assert metric.compute() == pytest.approx(loss(out, target).item(), rel=1e-6)


def test_the_margin_estimate_and_the_examples_that_halve_it():
    # the shipped ResNet-20's runs: 92.5% on 5,000 images, measured margins 0.52-0.57
    assert 0.5 < margin_estimate(0.925, 5000, 2.0) < 0.6
    assert margin_estimate(0.925, 1000, 2.0) > 1.0  # the 1,000 examples
    need = needed_examples(0.925, 2.0, 0.5)
    assert margin_estimate(0.925, need, 2.0) <= 0.5 < margin_estimate(0.925, need - 50, 2.0)


def _classifier(n_val, noise=0.35, seed=0):
    """A 3-class problem a small MLP gets about 90% right (label noise decides how much)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4000 + n_val, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    flip = torch.rand(len(y), generator=g) < noise / 3
    y[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=g)
    part = lambda a, b: DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=250)  # noqa: E731
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    deepzip.fit(model, part(0, 3000), deepzip.TrainConfig(epochs=10, lr=0.1, precision="fp32",
                                                           eval_every=0))
    return model, deepzip.Task.from_loaders(part(0, 3000), part(3000, 4000),
                                            val=part(4000, 4000 + n_val))


def test_a_budget_the_validation_noise_takes_whole_is_refused_before_training(tmp_path):
    model, task = _classifier(1000)
    said = []
    with pytest.raises(DeepzipError) as e:
        deepzip.compress(model, task, "default", out=tmp_path / "run", log=said.append)
    msg = str(e.value)
    assert "cannot be met on 1,000 validation examples" in msg and "--validation" in msg
    need = int(msg.split("about ")[-1].split(" examples")[0].replace(",", ""))
    assert 1000 < need < 100_000
    assert not any("[prune] step" in line for line in said)  # nothing was trained
    assert not (tmp_path / "run").exists()  # a failed start leaves no folder


def test_compress_takes_any_recipe_key(tmp_path):
    model, task = _classifier(1000)
    quick = {"steps": [{"method": "global", "amount": 0.5, "epochs": 1}], "loss_share": 0.6}
    result = deepzip.compress(model, task, "default", out=tmp_path / "run", log=lambda _: None,
                              margin_se=0.0, max_loss="5%", prune=quick,
                              quantize={"epochs": 1, "probe_epochs": 1})
    import yaml

    ran = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert ran["max_loss"] == "5%" and ran["margin_se"] == 0.0
    assert ran["prune"]["loss_share"] == 0.6 and len(ran["prune"]["steps"]) == 1
    assert ran["prune"]["distill"]["alpha"] == 0.7  # a section's other keys are kept
    assert ran["quantize"]["bits"] == 6
    assert "5% of the baseline's acc" in (tmp_path / "run" / "report.md").read_text()
    assert result.report["summary"]["real_ratio"] > 1
    with pytest.raises(DeepzipError, match="unknown key"):
        deepzip.compress(model, task, "default", out=tmp_path / "bad", prune={"stepz": []})
    assert isinstance(deepzip.load_recipe(None), deepzip.Recipe)


def test_a_regression_model_keeps_one_percent_of_its_mse(tmp_path):
    """The issue's case: a user's regression MLP through the default, scored by torch's own
    nn.MSELoss on the test examples no decision read."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(data(4096, 1), batch_size=64, shuffle=True, generator=g)
    test = DataLoader(data(4000, 2), batch_size=500)
    task = deepzip.Task.from_loaders(train, test, name="reg", metric=deepzip.MeanSquaredError())
    model = RegressionMLP()
    deepzip.fit(model, train, deepzip.TrainConfig(epochs=20, lr=0.05, precision="fp32",
                                                  eval_every=0), task=task)
    said = []
    result = deepzip.compress(model, task, "default", out=tmp_path / "run", log=said.append)
    held = result.report["summary"]

    def mse(m):
        return sum(nn.functional.mse_loss(m(x), y, reduction="sum").item()
                   for x, y in test) / 4000 / 1

    assert mse(result.model) <= 1.01 * mse(model)
    assert held["metric"] == "mse" and held["validation_examples"] == 2000
    report = (tmp_path / "run" / "report.md").read_text()
    measured = report.split("## Result")[1].split("## Time")[0]  # past the description
    assert "1% of the baseline's mse" in measured and "point" not in measured
    assert "mse 0.0" in measured and "% of the baseline" in measured
    assert any("[budget] max_loss 1% of the baseline's mse" in line for line in said)


def test_the_budget_terms_decide_alone():
    """The policy without a run: what a step may spend, and when noise is to blame."""
    from deepzip.budget import Terms

    t = Terms(Budget.parse(1, "acc"), baseline=0.925, points=True, metric="acc",
              margin_se=2.0)
    assert t.allowed == 1.0 and t.units == "points" and t.words() == "1 point"
    assert "leaving about 0.4" in t.before_training(5000)
    with pytest.raises(DeepzipError, match="cannot be met on 1,000"):
        t.before_training(1000)
    assert t.step(0.2, 0.5, 0.5, 5000) == (True, 0.25)
    assert t.step(0.3, 0.5, 0.5, 5000)[0] is False  # the step's own loss: undone, no error
    with pytest.raises(DeepzipError, match="measured"):
        t.step(0.4, 1.2, 0.5, 1000)  # fits without its margin, which is over the budget
    mse = Terms(Budget.parse("1%", "mse", points=False), baseline=0.02, points=False,
                metric="mse", margin_se=2.0)
    assert mse.allowed == pytest.approx(0.0002) and "(0.0002 mse)" in mse.words()
    assert "measured at the first judged model" in mse.before_training(2000)
