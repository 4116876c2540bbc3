"""The compression stages as functions of (model, task, spec): one code path for the
:class:`~deepzip.pipeline.Pipeline` and the CLI's single-stage commands.

A stage takes the model, the :class:`~deepzip.task.Task` (data, metric, loss) and the
model's :class:`~deepzip.checkpoint.ModelSpec` (its input normalization), plus the
library's own config dataclasses (:class:`~deepzip.prune.PruneConfig`,
:class:`~deepzip.quantize.QuantizeConfig`, :class:`~deepzip.train.TrainConfig`).
``loss_fn`` is a training loss of ``(outputs, targets, inputs)`` that replaces the task's
(distillation); ``out_dir`` holds a stage's resumable training checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import dzip_torch
from .checkpoint import ModelSpec
from .prune import PruneConfig, finetune_after_prune, prune_
from .qat import qat_, train_centroids
from .quantize import QuantizeConfig, fisher_sensitivity, quantize_
from .task import Task
from .train import Evaluation, TrainConfig, barrier, evaluate, is_main_process

__all__ = ["Shared", "encode", "eval_loader", "prune_step", "score", "share", "train_loader",
           "training"]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Log = Callable[[str], None]


def train_loader(task: Task, spec: ModelSpec, cfg: TrainConfig) -> Iterable:
    """The task's training batches for ``cfg``, normalized as the model expects."""
    return task.train_loader(cfg.batch_size, cfg.seed, mean=spec.mean, std=spec.std,
                             channels_last=cfg.channels_last)


def eval_loader(task: Task, spec: ModelSpec) -> Iterable:
    """The task's evaluation batches, normalized as the model expects."""
    return task.eval_loader(mean=spec.mean, std=spec.std)


def score(model: nn.Module, task: Task, spec: ModelSpec) -> Evaluation:
    """(loss, metric) of ``model`` on the task's evaluation data."""
    return evaluate(model, eval_loader(task, spec), task=task)


def training(task: Task, spec: ModelSpec, *, loss_fn: LossFn | None = None,
             out_dir: str | os.PathLike[str] | None = None, resume: bool = True,
             desc: str = "train") -> dict[str, Any]:
    """What every training stage passes to :func:`~deepzip.train.fit` besides the batches:
    the task (its metric and loss; label smoothing of the config applies to
    cross-entropy), its evaluation data, the optional replacement loss and where to keep
    resumable checkpoints."""
    return {"task": task, "test_loader": eval_loader(task, spec), "loss_fn": loss_fn,
            "out_dir": out_dir, "resume": resume, "desc": desc}


def prune_step(model: nn.Module, task: Task, spec: ModelSpec, config: PruneConfig,
               retrain: TrainConfig | None = None, *,
               after_prune: Callable[[nn.Module], None] | None = None,
               **fit_kwargs: Any) -> list[dict[str, Any]]:
    """Prune with ``config`` (masks stay on), then masked retraining for ``retrain``'s
    epochs if given; returns the retraining history. ``after_prune`` sees the model in
    between (to report it); ``fit_kwargs``: see :func:`training`."""
    prune_(model, config)
    if after_prune is not None:
        after_prune(model)
    if retrain is None or not retrain.epochs:
        return []
    return finetune_after_prune(model, train_loader(task, spec, retrain), retrain,
                                **training(task, spec, **fit_kwargs))


@dataclass
class Shared:
    """What :func:`share` did: the config it clustered with (Fisher sensitivities filled
    in), per target ``{bits, clusters}``, the training history, the metric right after
    clustering and the sensitivities (if any)."""

    config: QuantizeConfig
    layers: dict[str, dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    score_kmeans: float | None = None
    sensitivity: dict[str, Any] | None = None


def share(model: nn.Module, task: Task, spec: ModelSpec, config: QuantizeConfig, *,
          fisher: TrainConfig | None = None, qat: TrainConfig | None = None,
          recluster_every: int = 50,
          centroids: TrainConfig | None = None, out_dir: str | os.PathLike[str] | None = None,
          resume: bool = True, loss_fn: LossFn | None = None, log: Log = lambda _: None
          ) -> Shared:
    """Weight sharing: Fisher sensitivities (on batches of ``fisher``'s size and seed, if
    given), quantization-aware training (``qat``'s epochs) or plain clustering, then
    centroid training (``centroids``' epochs).
    Shared weights stay parametrized (:func:`~deepzip.quantize.dequantize_` to bake)."""
    sensitivity = None
    if fisher is not None:
        sensitivity = fisher_sensitivity(model, train_loader(task, spec, fisher), task.loss,
                                         include=config.include, exclude=config.exclude)
        config = dataclasses.replace(config, sensitivity=sensitivity)
    history: list[dict[str, Any]] = []

    def sub(name: str) -> str | None:
        return None if out_dir is None else os.path.join(out_dir, name)

    if qat is not None and qat.epochs:
        log(f"[quantize] quantization-aware training, {qat.epochs} epochs, re-clustering "
            f"every {recluster_every} steps")
        layers, qat_history = qat_(model, train_loader(task, spec, qat), qat, config,
                                   recluster_every=recluster_every,
                                   **training(task, spec, loss_fn=loss_fn, out_dir=sub("qat"),
                                              resume=resume, desc="qat"))
        history += [{"phase": "qat", **r} for r in qat_history]
    else:
        layers = quantize_(model, config)
    result = Shared(config, layers, history, score(model, task, spec).value, sensitivity)
    log(f"[quantize] shared: {task.metric.name} {result.score_kmeans:.4f} before training")
    if centroids is not None and centroids.epochs:
        log(f"[quantize] centroid training, {centroids.epochs} epochs")
        history += [{"phase": "centroids", **r} for r in train_centroids(
            model, train_loader(task, spec, centroids), centroids,
            **training(task, spec, loss_fn=loss_fn, out_dir=sub("train"), resume=resume,
                       desc="centroids"))]
    return result


def encode(model: nn.Module, spec: ModelSpec, path: str | os.PathLike[str], *,
           raw_dtype: str = "float16", codebook_dtype: str = "float32",
           fold_batchnorm: bool = True, like: nn.Module | None = None) -> dict[str, Any]:
    """Write ``model`` as a ``.dzip`` file (one process writes; the others wait) and return
    its sizes (:func:`~deepzip.dzip_torch.info`), read back against ``like`` (a fresh
    instance of the model) or the architecture the file records."""
    if is_main_process():
        dzip_torch.save(model, path, spec=spec, raw_dtype=raw_dtype,
                        codebook_dtype=codebook_dtype, fold_batchnorm=fold_batchnorm)
    barrier()
    return dzip_torch.info(path, like)
