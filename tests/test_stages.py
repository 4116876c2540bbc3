"""The stage functions the Pipeline and the CLI share: they take the Task as the unit,
and what a TrainConfig says (label smoothing) reaches the training loss."""

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
    assert info["file_bytes"] == (tmp_path / "m.dzip").stat().st_size
    assert info["params"] == sum(p.numel() for p in model.parameters())
