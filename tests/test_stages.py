"""The stage functions the Pipeline and the CLI share: they take the Task as the unit,
and what a TrainConfig says (label smoothing) reaches the training loss."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepzip import PruneConfig, QuantizeConfig, Task, TrainConfig, stages
from deepzip.checkpoint import ModelSpec
from deepzip.quantize import codebooks


def _classification(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=32)
    return Task.from_loaders(train, DataLoader(TensorDataset(x, y), batch_size=128))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


SPEC = ModelSpec(arch="mlp", num_classes=None, mean=(), std=())


def test_label_smoothing_of_the_config_reaches_the_training_loss():
    task = _classification()
    trained = {}
    for smoothing in (0.0, 0.3):
        model = _model()
        cfg = TrainConfig(epochs=1, lr=0.1, label_smoothing=smoothing, precision="fp32",
                          eval_every=0)
        stages.prune_step(model, task, SPEC, PruneConfig("percentile", 0.5), cfg)
        trained[smoothing] = model[0].weight.detach().clone()
    assert not torch.equal(trained[0.0], trained[0.3])


def test_prune_step_reports_between_pruning_and_retraining_and_keeps_the_masks():
    task, model, seen = _classification(), _model(), []
    history = stages.prune_step(
        model, task, SPEC, PruneConfig("percentile", 0.5),
        TrainConfig(epochs=1, lr=0.05, precision="fp32", eval_every=0),
        after_prune=lambda m: seen.append(float((m[0].weight == 0).float().mean())))
    assert seen == [0.5] and len(history) == 1
    assert float((model[0].weight == 0).float().mean()) == 0.5  # retraining kept them


def test_share_measures_fisher_and_returns_the_config_it_used():
    task, model = _classification(), _model()
    shared = stages.share(model, task, SPEC, QuantizeConfig(bits=3, entropy_weight=10),
                          fisher=TrainConfig(batch_size=32))
    assert set(shared.config.sensitivity) == set(shared.layers) == {"0", "2"}
    assert shared.score_kmeans == stages.score(model, task, SPEC).value
    assert all(cb.codebook.numel() <= 8 for cb in codebooks(model).values())


def test_encode_writes_the_file_and_reads_its_sizes_back(tmp_path):
    model = _model()
    info = stages.encode(model, SPEC, tmp_path / "m.dzip", like=_model())
    assert info.file_bytes == (tmp_path / "m.dzip").stat().st_size
    assert info.params == sum(p.numel() for p in model.parameters())


def test_loss_points_follow_the_metrics_direction():
    from deepzip import MeanSquaredError

    acc = _classification()
    mse = Task.from_loaders([], [], metric=MeanSquaredError())
    assert stages.loss_points(acc, 0.92, 0.91) == pytest.approx(1.0)  # points of accuracy
    assert stages.loss_points(acc, 0.92, 0.93) == pytest.approx(-1.0)
    assert stages.loss_points(mse, 0.10, 0.15) == pytest.approx(0.05)  # lower is better
    assert stages.loss_points(mse, 0.10, 0.05) == pytest.approx(-0.05)


def test_budget_search_on_a_lower_is_better_metric():
    """A regression model scored by MSE: the search keeps the budgets whose MSE rose by at
    most max_loss, returns the smallest of them and leaves the model as it was."""
    from regression_task import RegressionMLP, make_task

    task = make_task(512)
    task = Task.from_loaders(task.train, task.eval, metric=task.metric, val=task.eval)
    torch.manual_seed(0)
    model = RegressionMLP()
    from deepzip import fit

    fit(model, task.train, TrainConfig(epochs=5, lr=0.05, precision="fp32", eval_every=0),
        task=task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = stages.decision_score(model, task, SPEC).value
    bits, probes = stages.search_budget(
        model, task, SPEC, QuantizeConfig(bits=6, entropy_weight=20), baseline=base,
        max_loss=0.01, probe=TrainConfig(epochs=1, lr=0.001, precision="fp32", eval_every=0),
        steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for p in probes:
        assert p["loss"] == pytest.approx(p["score"] - base)
        assert p["within"] == (p["loss"] <= 0.01)
    if probes[0]["within"]:
        assert bits == min(p["target_bits"] for p in probes if p["within"])


@pytest.mark.parametrize("bold_first", [False, True])
def test_bisect_finds_the_boldest_setting_that_passes_from_either_end(bold_first):
    """A sparsity (bold is high) and a bit budget (bold is low) are the same search."""
    from deepzip.stages import bisect

    tried: list[float] = []

    def passes(x: float) -> bool:
        tried.append(x)
        return x <= 0.7

    found = bisect(passes, safe=0.5, bold=0.9, steps=4, bold_first=bold_first)
    assert 0.7 - 0.4 / 2 ** 4 <= found <= 0.7 and passes(found)
    assert tried[0] == (0.9 if bold_first else 0.5)
    bits = bisect(lambda b: b >= 2.2, safe=6.0, bold=0.5, steps=6)
    assert 2.2 <= bits <= 2.2 + 5.5 / 2 ** 6
    assert bisect(lambda _: False, safe=0.5, bold=0.9, steps=3, bold_first=True) == 0.5
    assert bisect(lambda _: True, safe=0.5, bold=0.9, steps=3, bold_first=True) == 0.9


def test_a_retry_after_a_near_miss_steps_up_the_probes_calibrated_by_the_full_stage():
    """The probes and the confirmation of a ResNet-20 budget run: the full stage at 2.305
    bits lost 0.172 more than its probe, so 2.391 (0.881 + 0.172 > 1) would miss too and
    2.562 fits; with no probe that fits, halfway to the cap."""
    probes = [{"target_bits": b, "loss": loss, "margin": m} for b, loss, m in [
        (6.0, -0.12, 0.483), (3.25, -0.10, 0.465), (1.875, 0.54, 0.556),
        (2.562, 0.0, 0.506), (2.219, 0.60, 0.551), (2.391, 0.36, 0.521),
        (2.305, 0.30, 0.529)]]
    failed = {"target_bits": 2.305, "loss": 0.46, "margin": 0.541}
    assert stages.retry_budget(probes, failed, 1.0, 6.0) == 2.562
    assert stages.retry_budget(probes, {**failed, "loss": 0.40}, 1.0, 6.0) == 2.391
    assert stages.retry_budget(probes, {**failed, "loss": 1.5}, 1.0, 6.0) == (2.305 + 6) / 2
    assert stages.retry_budget([], failed, 1.0, 6.0) == (2.305 + 6) / 2


def test_per_example_scores_and_the_paired_standard_error_of_a_loss():
    """The decision data's per-example scores average to the metric; the standard error
    of a loss counts only the examples on which the two models differ."""
    from deepzip import MeanSquaredError, Perplexity

    task, model = _classification(), _model()
    batches = []
    model.register_forward_hook(lambda m, i, o: batches.append(len(o)))
    value, scores = stages.judged(model, task, SPEC)
    assert batches == [128, 128]  # one pass over the decision data gives both
    assert len(scores) == 256
    assert value == stages.decision_score(model, task, SPEC).value
    assert float(scores.mean()) == pytest.approx(value)
    ref = torch.tensor([1.0, 1, 0, 0])
    assert stages.loss_se(task, ref, torch.tensor([1.0, 0, 0, 1])) == pytest.approx(
        100 * (2 / 3) ** 0.5 / 2)  # differences 0, 1, 0, -1: points of accuracy
    assert stages.loss_se(task, ref, ref.clone()) == 0.0
    assert stages.loss_se(task, None, ref) is None
    mse = Task.from_loaders([], [], metric=MeanSquaredError())
    assert stages.loss_se(mse, torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2])) == \
        pytest.approx(float(torch.tensor([-0.1, 0.1]).std()) / 2 ** 0.5)  # its own units
    ppl = Task.from_loaders(task.train, task.eval, metric=Perplexity())
    value, scores = stages.judged(model, ppl, SPEC)
    assert scores is None  # exp of a mean: no per-example scores
    assert value == pytest.approx(stages.decision_score(model, ppl, SPEC).value)
