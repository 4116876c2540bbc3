"""What the docstring examples (``pytest --doctest-modules``, run with the tests) find in
their namespace: a fresh ResNet-20, small synthetic CIFAR-sized batches, a training
config and a ``model.dzip`` in a temporary working folder, so each example runs as
printed, on small data."""

from __future__ import annotations

import copy

import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_objects(request, tmp_path, monkeypatch):
    if not isinstance(request.node, DoctestItem):
        return
    import deepzip
    from deepzip.data import BatchLoader, ImageSplit
    from deepzip.loading import pretrained
    from deepzip.task import Task

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    train = ImageSplit(torch.randint(0, 256, (128, 3, 32, 32), generator=g, dtype=torch.uint8),
                       torch.randint(0, 10, (128,), generator=g))
    model, spec = pretrained("resnet20")
    loader = BatchLoader(train, 32, train=True)
    test_loader = BatchLoader(train, 32)
    deepzip.save(model, "model.dzip", spec=spec, raw_dtype="float32",
                 codebook_dtype="float32", fold_batchnorm=False)  # stores it exactly
    request.node.dtest.globs.update(
        deepzip=deepzip, torch=torch, BatchLoader=BatchLoader, get=deepzip.models.get,
        model=model, spec=spec, train=train, loader=loader,
        train_loader=loader, calibration_loader=loader, test_loader=test_loader,
        baseline=copy.deepcopy(model), pruned=copy.deepcopy(model),
        task=Task.from_loaders(loader, test_loader),
        cfg=deepzip.TrainConfig(epochs=1, lr=0.01, precision="fp32", eval_every=0))
