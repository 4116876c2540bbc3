"""The prune stage's policies driven alone, on a RunContext of a tiny task."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepzip import Task
from deepzip.checkpoint import save_checkpoint
from deepzip.context import RunContext
from deepzip.recipe import PruneStage, PruneStep, QuantizeStage, Recipe
from deepzip.sparsity import Pruning, step_path


def _context(tmp_path, max_loss=1.0, steps=None, calibration=1024):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    part = lambda a, b: DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=64)  # noqa: E731
    recipe = Recipe(name="t", max_loss=max_loss, margin_se=0.0, prune=PruneStage(
        schedule="iterative", keep_steps=True, calibration=calibration,
        steps=steps or [PruneStep("global", 0.5, 0)]),
        quantize=QuantizeStage(bits=4))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    ctx = RunContext(recipe, tmp_path, Task.from_loaders(part(0, 128), part(128, 192),
                                                         val=part(192, 256)),
                     log=lambda _: None, model=model)
    ctx.state["stages"]["baseline"] = {"val_score": 0.9}
    return ctx


def test_the_sharing_is_searched_on_the_sparsest_step_whose_smoothed_loss_fits(tmp_path):
    ctx = _context(tmp_path)
    model, spec = ctx.start()
    for i in (1, 2, 3):
        save_checkpoint(model, spec, step_path(tmp_path, i))
    # step 2 scored lucky: pooled with step 1; step 3 is over once its margin is added
    rows = [{"step": 1, "sparsity": 0.5, "score": 0.9, "loss": 0.4, "margin": 0.3},
            {"step": 2, "sparsity": 0.6, "score": 0.9, "loss": 0.0, "margin": 0.3},
            {"step": 3, "sparsity": 0.7, "score": 0.9, "loss": 0.8, "margin": 0.3}]
    _, search = Pruning(ctx).top_step(rows, spec)
    assert [r["fit"] for r in rows] == pytest.approx([0.2, 0.2, 0.8])
    assert search["candidates"] == [1, 2] and search["top_step"] == 2


def test_no_candidate_leaves_the_model_unpruned(tmp_path):
    ctx = _context(tmp_path)
    model, spec = ctx.start()
    rows = [{"step": 1, "sparsity": 0.5, "score": 0.8, "loss": 2.0, "margin": 0.3}]
    kept, search = Pruning(ctx).top_step(rows, spec)
    assert search["candidates"] == [] and search["top_step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


def test_one_shot_sparsegpt_steps_read_calibration_batches_and_are_kept(tmp_path,
                                                                        monkeypatch):
    """Steps of 0 epochs prune without retraining; sparsegpt reads the training batches
    (``prune.calibration`` examples) and every step's model is kept and scored."""
    ctx = _context(tmp_path, max_loss=100.0, calibration=100,  # two batches of 64
                   steps=[PruneStep("sparsegpt", 0.5, 0), PruneStep("sparsegpt", 0.7, 0)])
    import deepzip.stages

    read = []
    real = deepzip.stages.prune_
    monkeypatch.setattr(deepzip.stages, "prune_", lambda m, cfg, **kw: (
        read.append(kw["calibration_batches"]), real(m, cfg, **kw))[1])
    model, spec = ctx.start()
    before = model[0].weight.detach().clone()
    pruned, _ = Pruning(ctx)(model, spec)
    assert read == [2, 2]
    search = ctx.state["stages"]["prune"]["search"]
    assert [round(r["sparsity"], 2) for r in search["steps"]] == [0.5, 0.7]
    assert step_path(tmp_path, 2).is_file()
    kept = pruned[0].weight.detach()
    # the weights that stay were moved (OBS's update), not only masked
    assert not torch.equal(kept[kept != 0], before[kept != 0])


def test_a_one_shot_step_before_a_retrained_one_is_a_waypoint(tmp_path):
    """A step of 0 epochs that a retraining step follows is neither judged (its loss
    would stop the pruning, or raise the smoothed losses of the steps that recover it)
    nor kept; the last step and one-shot steps among one-shot steps are."""
    ctx = _context(tmp_path, max_loss=100.0, steps=[
        PruneStep("global", 0.5, 0), PruneStep("global", 0.6, 1), PruneStep("global", 0.7, 0),
        PruneStep("global", 0.8, 0)])
    model, spec = ctx.start()
    Pruning(ctx)(model, spec)
    search = ctx.state["stages"]["prune"]["search"]
    assert [r["step"] for r in search["steps"]] == [2, 3, 4]
    assert not step_path(tmp_path, 1).exists() and step_path(tmp_path, 3).is_file()
