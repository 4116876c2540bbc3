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

import copy
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import budget, dzip_torch
from .atomic import unless_null
from .checkpoint import ModelSpec
from .errors import DeepzipError
from .prune import (
    PruneConfig,
    bake_,
    finetune_after_prune,
    prunable,
    prune_,
    sensitivity,
    sparsity_of,
    targets_from_sensitivity,
)
from .qat import qat_, train_centroids
from .quantize import (
    QuantizeConfig,
    codebooks,
    dequantize_,
    fisher_sensitivity,
    quantize_,
    shared_index_bits,
)
from .recipe import BUDGET_PROBES
from .task import IGNORE_INDEX, Task, class_scores, model_input
from .train import Evaluation, TrainConfig, barrier, evaluate, is_main_process

__all__ = ["Shared", "bake", "bisect", "decision_loader", "decision_score", "decoded",
           "encode", "eval_loader", "file_bytes", "judged", "layer_targets", "loss_points",
           "loss_se", "prune_step", "retry_budget", "score", "search_budget",
           "sensitivity_scan", "share", "shared_sizes", "shared_values", "sparsity",
           "train_loader", "training", "unshare", "verify", "weights", "with_fisher"]

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
    """(loss, metric) of ``model`` on the task's evaluation (test) data."""
    return evaluate(model, eval_loader(task, spec), task=task)


def decision_loader(task: Task, spec: ModelSpec) -> Iterable:
    """The data a run decides on: the task's validation data if it holds some out, else
    its evaluation data (a task without validation data has nothing else)."""
    val = task.val_loader(mean=spec.mean, std=spec.std)
    return val if val is not None else eval_loader(task, spec)


def decision_score(model: nn.Module, task: Task, spec: ModelSpec) -> Evaluation:
    """(loss, metric) on :func:`decision_loader`."""
    return evaluate(model, decision_loader(task, spec), task=task)


def training(task: Task, spec: ModelSpec, *, loss_fn: LossFn | None = None,
             out_dir: str | os.PathLike[str] | None = None, resume: bool = True,
             desc: str = "train") -> dict[str, Any]:
    """What every training stage passes to :func:`~deepzip.train.fit` besides the batches:
    the task (its metric and loss; label smoothing of the config applies to
    cross-entropy), the data to evaluate on while training (validation data when the task
    has it: training-time numbers never read the test set then), the optional
    replacement loss and where to keep resumable checkpoints."""
    return {"task": task, "test_loader": decision_loader(task, spec), "loss_fn": loss_fn,
            "eval_name": task.decision_split, "out_dir": out_dir,
            "resume": resume, "desc": desc}


def calibration_data(task: Task, spec: ModelSpec, batches: TrainConfig | None, examples: int
                     ) -> dict[str, Any]:
    """``calibration=`` and ``calibration_batches=`` for the operations that read inputs
    (Wanda, SparseGPT, reconstructing sharing): whole training batches, drawn as
    ``batches``' are, until about ``examples`` (the task's own loaders choose their batch
    size)."""
    loader = train_loader(task, spec, batches or TrainConfig())
    size = len(next(iter(loader))[0])
    return {"calibration": loader, "calibration_batches": max(1, math.ceil(examples / size))}


def prune_step(model: nn.Module, task: Task, spec: ModelSpec, config: PruneConfig,
               retrain: TrainConfig | None = None, *,
               after_prune: Callable[[nn.Module], None] | None = None,
               calibration: int = 1024, **fit_kwargs: Any) -> list[dict[str, Any]]:
    """Prune with ``config`` (masks stay on), then masked retraining for ``retrain``'s
    epochs if given; returns the retraining history. ``wanda`` and ``sparsegpt`` read
    about ``calibration`` training examples (whole batches, drawn as ``retrain``'s are).
    ``after_prune`` sees the model in between (to report it); ``fit_kwargs``: see
    :func:`training`."""
    prune_(model, config, **(calibration_data(task, spec, retrain, calibration)
                             if config.method in ("wanda", "sparsegpt") else {}))
    if after_prune is not None:
        after_prune(model)
    if retrain is None or not retrain.epochs:
        return []
    return finetune_after_prune(model, train_loader(task, spec, retrain), retrain,
                                **training(task, spec, **fit_kwargs))


def with_fisher(model: nn.Module, task: Task, spec: ModelSpec, config: QuantizeConfig,
                batches: TrainConfig) -> QuantizeConfig:
    """``config`` with each target's Fisher sensitivity, measured on training batches of
    ``batches``' size and seed."""
    return dataclasses.replace(config, sensitivity=fisher_sensitivity(
        model, train_loader(task, spec, batches), task.loss, include=config.include,
        exclude=config.exclude))


@dataclass
class Shared:
    """What :func:`share` did: the config it clustered with (Fisher sensitivities filled
    in), per target ``{bits, clusters}``, the training history and the metric right after
    clustering (on :func:`decision_loader`'s data)."""

    config: QuantizeConfig
    layers: dict[str, dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    score_kmeans: float | None = None


def share(model: nn.Module, task: Task, spec: ModelSpec, config: QuantizeConfig, *,
          fisher: TrainConfig | None = None, qat: TrainConfig | None = None,
          recluster_every: int = 50,
          centroids: TrainConfig | None = None, out_dir: str | os.PathLike[str] | None = None,
          resume: bool = True, loss_fn: LossFn | None = None, log: Log = lambda _: None,
          calibration: int = 0) -> Shared:
    """Weight sharing: Fisher sensitivities (on batches of ``fisher``'s size and seed, if
    given), quantization-aware training (``qat``'s epochs) or clustering (with
    ``calibration`` > 0, for each layer's outputs on that many training examples:
    :func:`~deepzip.quantize.quantize_`), then centroid training (``centroids``' epochs).
    Shared weights stay parametrized (:func:`~deepzip.quantize.dequantize_` to bake)."""
    if fisher is not None:
        config = with_fisher(model, task, spec, config, fisher)
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
        layers = quantize_(model, config, **(calibration_data(
            task, spec, centroids, calibration) if calibration else {}))
    result = Shared(config, layers, history, decision_score(model, task, spec).value)
    log(f"[quantize] shared: {task.metric.name} {result.score_kmeans:.4f} before training")
    if centroids is not None and centroids.epochs:
        log(f"[quantize] centroid training, {centroids.epochs} epochs")
        history += [{"phase": "centroids", **r} for r in train_centroids(
            model, train_loader(task, spec, centroids), centroids,
            **training(task, spec, loss_fn=loss_fn, out_dir=sub("train"), resume=resume,
                       desc="centroids"))]
    return result


def weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights a stage compresses (pruned, shared), by name."""
    return {t.name: t.weight for t in prunable(model)}


def bake(model: nn.Module) -> nn.Module:
    """The pruning masks made permanent: plain weights with zeros, no parametrization."""
    return bake_(model)


def shared_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each shared weight's codebook (its shared values), by name."""
    return {n: cb.codebook.detach() for n, cb in codebooks(model).items()}


def unshare(model: nn.Module) -> nn.Module:
    """The shared weights made plain tensors again (values as they are): what a
    checkpoint of a shared model stores."""
    return dequantize_(model)


def sensitivity_scan(model: nn.Module, task: Task, spec: ModelSpec,
                     levels: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                                                  0.9), *,
                     include: list[str] | None = None, exclude: list[str] | None = None,
                     score_fn: Callable[[nn.Module], float] | None = None
                     ) -> list[dict[str, Any]]:
    """Each layer pruned alone at each level and scored (on the decision data unless
    ``score_fn`` is given): rows ``{layer, level, params, accuracy}``."""
    return sensitivity(model, score_fn or (lambda m: decision_score(m, task, spec).value),
                       levels, include=include, exclude=exclude)


def layer_targets(rows: list[dict[str, Any]], max_drop: float, task: Task) -> dict[str, float]:
    """Per layer, the highest level of a :func:`sensitivity_scan` within ``max_drop``."""
    return targets_from_sensitivity(rows, max_drop,
                                    higher_is_better=task.metric.higher_is_better)


def sparsity(model: nn.Module, include: list[str] | None = None,
             exclude: list[str] | None = None) -> float:
    """The fraction of zeros in the prunable weights (``include``/``exclude`` as in
    :func:`deepzip.prune.prunable`)."""
    return sparsity_of(model, include, exclude)


def decoded(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """The ``.dzip`` file at ``path`` decoded into ``model`` (a fresh, plain copy of the
    architecture it was made from)."""
    return dzip_torch.load(path, model)


def encode(model: nn.Module, spec: ModelSpec, path: str | os.PathLike[str], *,
           raw_dtype: str = "float16", codebook_dtype: str = "float32",
           fold_batchnorm: bool = True, like: nn.Module | None = None
           ) -> dzip_torch.FileInfo:
    """Write ``model`` as a ``.dzip`` file (one process writes; the others wait) and return
    its sizes (:func:`~deepzip.dzip_torch.info`), read back against ``like`` (a fresh
    instance of the model) or the architecture the file records. The null device as
    ``path`` (``-o /dev/null``) gets the same work and sizes, and keeps nothing."""
    with unless_null(path) as path:
        if is_main_process():
            dzip_torch.save(model, path, spec=spec, raw_dtype=raw_dtype,
                            codebook_dtype=codebook_dtype, fold_batchnorm=fold_batchnorm)
        barrier()
        return dzip_torch.info(path, like)


def judged(model: nn.Module, task: Task, spec: ModelSpec
           ) -> tuple[float, torch.Tensor | None]:
    """The metric on :func:`decision_loader` and each of its examples' score under it
    (correct or not, for accuracy; in the data's order), from one pass over the data; the
    scores are None for a metric that is no mean of such scores."""
    scores: list[torch.Tensor] = []
    whole = task.metric.streaming

    def keep(outputs: torch.Tensor, targets: torch.Tensor) -> None:
        nonlocal whole
        e = task.metric.examples(outputs.float(), targets) if whole else None
        whole = e is not None
        if whole:
            scores.append(e.double().cpu())

    value = evaluate(model, decision_loader(task, spec), task=task, each=keep).value
    return value, torch.cat(scores) if whole and scores else None


def loss_se(task: Task, reference: torch.Tensor | None, scores: torch.Tensor | None
            ) -> float | None:
    """The standard error of a loss (in :func:`loss_points`' units) measured on the same
    examples as ``reference``: paired, so only the examples on which the two models differ
    add to it. None when either side has no per-example scores."""
    if reference is None or scores is None or len(reference) != len(scores) \
            or len(scores) < 2:
        return None
    se = float((reference - scores).std() / len(scores) ** 0.5)
    return se * 100 if task.metric.points else se


def loss_points(task: Task, baseline: float, score: float) -> float:
    """How much worse ``score`` is than ``baseline`` in the task's metric: in points
    (hundredths) for accuracy, in the metric's own units otherwise; negative is better."""
    return budget.loss(baseline, score, higher_is_better=task.metric.higher_is_better,
                       points=task.metric.points)


def search_budget(model: nn.Module, task: Task, spec: ModelSpec, config: QuantizeConfig, *,
                  baseline: float, max_loss: float, probe: TrainConfig | None = None,
                  steps: int = BUDGET_PROBES - 1, low: float = 0.5,
                  loss_fn: LossFn | None = None,
                  encoding: dict[str, Any] | None = None, log: Log = lambda _: None,
                  margin: Callable[[torch.Tensor | None], float] = lambda _: 0.0,
                  calibration: int = 0) -> tuple[float, list[dict[str, Any]]]:
    """The smallest sharing budget (``target_bits``, Huffman bits per nonzero's index)
    whose model stays within ``max_loss`` of ``baseline`` on the decision data, by
    bisection between ``low`` and ``config.bits`` on cheap proxies: each probe shares a
    copy of ``model`` at that budget, trains its centroids for ``probe``'s epochs and is
    scored (and its file's size measured); ``margin`` of its examples' scores
    (:func:`judged`) is added to its loss before the comparison; ``calibration``: see
    :func:`share`. Returns (the budget, every probe); the full stage that follows confirms
    it. ``model`` is not changed."""
    probes: list[dict[str, Any]] = []

    def run(bits: float) -> bool:
        trial = copy.deepcopy(model)
        share(trial, task, spec, dataclasses.replace(config, target_bits=bits),
              centroids=probe, loss_fn=loss_fn, calibration=calibration)
        dzip_torch.round_to_file_precision_(trial, **(encoding or {}))
        value, examples = judged(trial, task, spec)
        size = file_bytes(trial, spec, encoding)
        lost, extra = loss_points(task, baseline, value), margin(examples)
        ok = lost + extra <= max_loss
        probes.append({"target_bits": bits, "score": value, "loss": lost, "margin": extra,
                       "file_bytes": size, "index_bits": shared_index_bits(trial),
                       "within": ok})
        units = "points" if task.metric.points else task.metric.name
        log(f"[quantize] probe {len(probes)}/{steps + 1}, budget {bits:.3f} bits: "
            f"{task.metric.name} {value:.4g} "
            f"(loss {lost:.3g}" + (f" + margin {extra:.3g}" if extra else "")
            + f" {units} of {max_loss:.4g}), {size:,} bytes" + (" ok" if ok else " over"))
        return ok

    return bisect(run, safe=float(config.bits), bold=low, steps=steps), probes


def file_bytes(model: nn.Module, spec: ModelSpec, encoding: dict[str, Any] | None = None
               ) -> int:
    """The size of ``model``'s ``.dzip`` file (written to a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.dzip")
        dzip_torch.save(model, path, spec=spec, **(encoding or {}))
        return os.path.getsize(path)


def shared_sizes(model: nn.Module, spec: ModelSpec, config: QuantizeConfig,
                 budgets: Iterable[float], encoding: dict[str, Any] | None = None
                 ) -> dict[float, tuple[int, float]]:
    """The file's bytes and its indices' Huffman bits per nonzero with ``model`` shared at
    each budget (``target_bits``): clustering only (centroid training moves values, not
    the indices the bytes are made of). ``model`` is not changed."""
    sizes = {}
    for bits in budgets:
        trial = copy.deepcopy(model)
        quantize_(trial, dataclasses.replace(config, target_bits=bits))
        dzip_torch.round_to_file_precision_(trial, **(encoding or {}))
        sizes[bits] = (file_bytes(trial, spec, encoding), shared_index_bits(trial))
    return sizes


def retry_budget(probes: list[dict[str, Any]], failed: dict[str, Any], max_loss: float,
                 cap: float) -> float:
    """The sharing budget to run the full stage at once more after it went over
    ``max_loss`` at ``failed`` (a confirmation: ``target_bits``, ``loss``, ``margin``).
    The probes are calibrated against that one full stage: the smallest probed budget
    above it that stays within ``max_loss`` once the full stage's excess over its own
    probe is added; with none, halfway to the ``cap``. A near miss then costs a step up
    the probes, not a file twice the size."""
    bits = failed["target_bits"]
    own = [p["loss"] + p["margin"] for p in probes if p["target_bits"] == bits]
    excess = max(0.0, failed["loss"] + failed["margin"] - own[0]) if own else 0.0
    fits = [p["target_bits"] for p in probes
            if p["target_bits"] > bits and p["loss"] + p["margin"] + excess <= max_loss]
    return min(fits, default=(bits + cap) / 2)


def bisect(passes: Callable[[float], bool], *, safe: float, bold: float, steps: int,
           bold_first: bool = False) -> float:
    """The boldest setting between ``safe`` and ``bold`` that ``passes``, by ``steps``
    halvings. ``safe`` is tried first (if it fails, nothing bolder can pass, and it is
    returned for the full stage to judge), or with ``bold_first`` the bold end (returned
    if it passes: nothing more to find)."""
    if bold_first and passes(bold):
        return bold
    if not passes(safe):
        return safe
    ok, bad = safe, bold
    for _ in range(steps):
        mid = (ok + bad) / 2
        if passes(mid):
            ok = mid
        else:
            bad = mid
    return ok


@torch.inference_mode()
def verify(model: nn.Module, decoded: nn.Module | str | Path, loader: Iterable, *,
           task: Task | None = None) -> dict[str, Any]:
    """Does a decoded ``.dzip`` compute what ``model`` computes? On every batch of
    ``loader``: exact equality of outputs, the largest absolute difference, equal argmax
    predictions (classification) and the task's metric of the decoded model.

    ``decoded``: a model decoded from the file, or the file's path (decoded into a copy of
    ``model``, which must then be a plain, unpruned, unquantized module).

    >>> result = deepzip.verify(model, "model.dzip", test_loader)
    >>> result["identical"], result["max_abs_diff"]
    (True, 0.0)
    """
    if not isinstance(decoded, nn.Module):
        decoded = dzip_torch.load(decoded, copy.deepcopy(model))
    device = next(model.parameters()).device
    decoded = decoded.to(device).eval()
    _match_layout(decoded, model)
    was = model.training
    model.eval()
    identical, diff, same, n = True, 0.0, 0, 0
    classification = task.classification if task is not None else True
    try:
        for x, y in loader:
            x = model_input(x, device)
            a, b = model(x), decoded(x)
            identical = identical and torch.equal(a, b)
            diff = max(diff, float((a.float() - b.float()).abs().max()))
            if classification:  # per example, or per scored token
                (sa, t), (sb, _) = class_scores(a, y.to(device)), class_scores(b, y.to(device))
                live = t != IGNORE_INDEX if not t.dtype.is_floating_point else \
                    torch.ones_like(t, dtype=torch.bool)
                same += int(((sa.argmax(1) == sb.argmax(1)) & live).sum())
                n += int(live.sum())
            else:
                n += len(x)
    finally:
        model.train(was)
    if n == 0:
        raise DeepzipError("verify: the evaluation data is empty")
    metric = task.metric if task is not None else None
    loss_fn = task.loss if task is not None else None
    score = evaluate(decoded, loader, metric=metric, loss_fn=loss_fn).value
    out: dict[str, Any] = {"score": score, "identical": identical, "max_abs_diff": diff,
                           "examples": n}
    if classification:
        out["same_predictions"] = same
    return out


@torch.no_grad()
def _match_layout(decoded: nn.Module, model: nn.Module) -> None:
    """Give the decoded model's tensors the memory layout (strides) of the model's, so
    both run the same kernels: a channels_last model and a contiguous copy of it differ
    in the last bits of their outputs, which would hide whether the file is exact."""
    own = model.state_dict(keep_vars=True)
    for key, t in decoded.state_dict(keep_vars=True).items():
        ref = own.get(key)
        if ref is not None and ref.shape == t.shape and ref.stride() != t.stride():
            copy_ = torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype,
                                        device=t.device)
            t.data = copy_.copy_(t)
