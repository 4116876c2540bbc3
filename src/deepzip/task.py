"""A task is what a model is compressed *for*: training data, evaluation data, a metric
and a loss. Training, evaluation and the pipeline go through this one interface, so any
model and data set can be compressed, not only CIFAR-10 classifiers.

Shipped tasks: ``cifar10`` and ``mnist`` (classification, top-1 accuracy). A user's task is
a :class:`Task` made from their own loaders, named on the command line or in a recipe as
an entry point ``package.module:function`` that returns one.

>>> task = Task.from_loaders(train_loader, test_loader, metric=MeanSquaredError())  # doctest: +SKIP
>>> report = deepzip.compress(model, task, "default", out="runs/mine")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .entrypoints import load_entry_point
from .errors import DeepzipError

__all__ = [
    "Accuracy",
    "FunctionMetric",
    "MeanAbsoluteError",
    "IGNORE_INDEX",
    "MeanSquaredError",
    "Metric",
    "Perplexity",
    "TASKS",
    "Task",
    "class_scores",
    "classification_loss",
    "image_task",
    "load_entry_point",
    "model_input",
    "resolve_task",
]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- class scores
IGNORE_INDEX = -100  # a target to skip (padding), as in ``F.cross_entropy``


def class_scores(outputs: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores as ``(M, C)`` and their targets as ``(M,)``, whatever the layout:
    ``(N, C)`` with ``(N,)``; per position, ``(..., C)`` with ``(...)`` (a language
    model's ``(batch, time, vocab)``) or PyTorch's ``(N, C, d1, ...)`` with ``(N, d1, ...)``.
    Anything else is returned as it is, for the loss or metric to say what is wrong."""
    if outputs.dim() != targets.dim() + 1 or outputs.dim() == 2:
        return outputs, targets
    if outputs.shape[:-1] == targets.shape:
        return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
    if outputs.shape[0] == targets.shape[0] and outputs.shape[2:] == targets.shape[1:]:
        return outputs.movedim(1, -1).reshape(-1, outputs.shape[1]), targets.reshape(-1)
    return outputs, targets


def classification_loss(outputs: torch.Tensor, targets: torch.Tensor, *,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over every scored position (one per example, or per token), targets
    equal to :data:`IGNORE_INDEX` (padding) left out: ``F.cross_entropy`` for ``(N, C)``."""
    o, t = class_scores(outputs, targets)
    return F.cross_entropy(o, t, label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX)


def model_input(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch's inputs on ``device``: floating ones as fp32, anything else (token ids)
    keeping its dtype."""
    x = x.to(device)
    return x.float() if x.is_floating_point() else x


# ---------------------------------------------------------------- metrics
class Metric:
    """A streaming metric: ``reset()``, ``update(outputs, targets)`` per batch, ``compute()``.

    Every metric declares its direction (``higher_is_better``) and a short ``name`` that
    logs and reports use, so nothing guesses the direction from the name. Subclasses keep
    their running sums as tensors, so ``update`` never waits for the device.
    """

    name = "metric"
    higher_is_better = True
    points = False  # a fraction people read in points (accuracy): budgets in points
    streaming = True

    def reset(self) -> None:
        self._sum: torch.Tensor | float = 0.0
        self._n = 0

    def batch(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of the per-example scores of one batch."""
        raise NotImplementedError

    def count(self, targets: torch.Tensor) -> torch.Tensor | int:
        """How many scores a batch adds (examples; scored positions for per-token ones)."""
        return len(targets)

    def examples(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Each scored example's score, where the metric is their plain mean (accuracy,
        MSE): what a loss's standard error is computed from. None for other metrics."""
        return None

    def finish(self, mean: float) -> float:
        """The metric from the mean of the per-example scores (perplexity: its exp)."""
        return mean

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self._sum = self._sum + self.batch(outputs.detach().float(), targets).double()
        self._n += int(self.count(targets))

    def compute(self) -> float:
        if not self._n:
            raise DeepzipError(f"metric {self.name}: no examples were evaluated")
        value = self.finish(float(self._sum) / self._n)
        if not math.isfinite(value):
            raise DeepzipError(f"metric {self.name} is {value} (NaN or infinite outputs?)")
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Accuracy(Metric):
    """Top-1 accuracy of class scores against integer labels: per example for ``(N, C)``,
    per position for sequences (see :func:`class_scores`), padding (:data:`IGNORE_INDEX`)
    not counted."""

    name = "acc"
    higher_is_better = True
    points = True

    def batch(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        o, t = class_scores(outputs, targets)
        return ((o.argmax(1) == t) & (t != IGNORE_INDEX)).sum()

    def count(self, targets: torch.Tensor) -> torch.Tensor | int:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            return len(targets)
        return (targets != IGNORE_INDEX).sum()

    def examples(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        o, t = class_scores(outputs, targets)
        return (o.argmax(1) == t)[t != IGNORE_INDEX].float()


class Perplexity(Accuracy):
    """exp of the mean cross-entropy per scored token (a language model's usual number;
    lower is better), padding (:data:`IGNORE_INDEX`) left out."""

    name = "ppl"
    higher_is_better = False
    points = False

    def batch(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        o, t = class_scores(outputs, targets)
        return F.cross_entropy(o.float(), t, ignore_index=IGNORE_INDEX, reduction="sum")

    def finish(self, mean: float) -> float:
        return math.exp(min(mean, 700.0))

    def examples(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        return None  # the exp of a mean: not a mean of per-example scores


class MeanSquaredError(Metric):
    """The squared error averaged over every output of every example, as ``nn.MSELoss``
    computes it (so the number does not grow with the outputs per example)."""

    name = "mse"
    higher_is_better = False

    def batch(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.examples(outputs, targets).sum()

    def examples(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        diff = outputs - targets.float().view_as(outputs)
        return diff.pow(2).flatten(1).mean(1)


class MeanAbsoluteError(Metric):
    """The absolute error averaged over every output of every example (``nn.L1Loss``)."""

    name = "mae"
    higher_is_better = False

    def batch(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.examples(outputs, targets).sum()

    def examples(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets.float().view_as(outputs)).abs().flatten(1).mean(1)


class FunctionMetric(Metric):
    """A whole-evaluation metric ``fn(model, loader) -> float`` of the user's, with its
    direction declared (there is no default: a wrong guess keeps the worst model)."""

    streaming = False

    def __init__(self, fn: Callable[[nn.Module, Iterable[Batch]], float], *, name: str,
                 higher_is_better: bool) -> None:
        if not callable(fn):
            raise DeepzipError("FunctionMetric needs a callable fn(model, loader) -> float")
        self.fn, self.name, self.higher_is_better = fn, name, bool(higher_is_better)

    def __call__(self, model: nn.Module, loader: Iterable[Batch]) -> float:
        value = self.fn(model, loader)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DeepzipError(f"metric {self.name} returned {value!r}, not a finite number")
        return float(value)

    def __repr__(self) -> str:
        return f"FunctionMetric({getattr(self.fn, '__qualname__', self.fn)!r}, " \
               f"name={self.name!r}, higher_is_better={self.higher_is_better})"


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.float(), targets.float().view_as(outputs))


# ---------------------------------------------------------------- the task
@dataclasses.dataclass
class Task:
    """Data, metric and loss that a model is trained, evaluated and compressed with.

    ``train`` and ``eval`` are iterables of ``(inputs, targets)`` batches (a ``DataLoader``,
    a :class:`~deepzip.data.BatchLoader`), or factories: ``train(batch_size=, seed=,
    mean=, std=, channels_last=)`` and ``eval(mean=, std=)`` get what the recipe and model
    say and may ignore it (the shipped image tasks use it; a plain loader already decided).
    ``loss(outputs, targets)`` is the training loss (cross-entropy by default);
    ``classification`` says whether outputs are class scores, which distillation needs
    (soft targets for classes, matched outputs otherwise). ``normalization`` is the
    (mean, std) a model without its own gets (the shipped image tasks' usual constants).
    ``val`` (a loader or a factory like ``eval``) is validation data held out from
    training: when a task has it, every decision a pipeline makes (training-time
    evaluations, sensitivity scans, budgets) uses it, and ``eval`` (the test set) is only
    read for the final report.
    """

    name: str
    train: Any
    eval: Any
    metric: Metric = dataclasses.field(default_factory=Accuracy)
    loss: LossFn = classification_loss
    classification: bool = True
    description: str = ""
    eval_size: int | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    val: Any = None
    val_size: int | None = None
    val_description: str = ""

    @classmethod
    def from_loaders(cls, train: Iterable[Batch], eval: Iterable[Batch], *,  # noqa: A002
                     name: str = "custom", metric: Metric | None = None,
                     loss: LossFn | None = None, classification: bool | None = None,
                     description: str = "", val: Iterable[Batch] | None = None) -> Task:
        """A task from two loaders (and a validation loader, ``val``, if you hold one out:
        then decisions use it, never the test data). A metric that is not accuracy means
        regression by default (MSE loss, no class soft targets); say otherwise with the
        arguments."""
        metric = metric or Accuracy()
        if classification is None:
            classification = isinstance(metric, Accuracy)  # perplexity too
        if loss is None:
            loss = classification_loss if classification else mse_loss
        size = _dataset_size(eval)
        n_val = _dataset_size(val) if val is not None else None
        return cls(name=name, train=train, eval=eval, metric=metric, loss=loss,
                   classification=classification, eval_size=size, val=val, val_size=n_val,
                   val_description="the user's validation loader" + (
                       f" ({n_val:,} examples)" if n_val else "") if val is not None else "",
                   description=description or f"{name}: the user's evaluation loader"
                   + (f" ({size:,} examples)" if size else ""))

    def holding_out(self, n: int, source: str = "test") -> Task:
        """This task with ``n`` examples of its test (``source="test"``) or training loader
        held out as validation data (at most half of that loader's: the default recipe's
        5,000 on a smaller data set), drawn by a fixed seed as the shipped tasks draw
        theirs; the loader they came from keeps the rest. For plain DataLoaders over
        sized (map-style) datasets; other loaders must pass ``val`` themselves."""
        from torch.utils.data import DataLoader, RandomSampler, Subset

        from .data import held_out_indices

        if source not in VALIDATION_FROM:
            raise DeepzipError(f"validation_from must be one of {', '.join(VALIDATION_FROM)}"
                               f", got {source!r}")
        loader = self.eval if source == "test" else self.train
        size = _dataset_size(loader) if isinstance(loader, DataLoader) else None
        if self.val is not None or not size or loader.batch_size is None \
                or not hasattr(loader.dataset, "__getitem__"):
            raise DeepzipError(
                f"task {self.name!r} cannot hold {n} validation examples out of its "
                f"{'test' if source == 'test' else 'training'} loader (it "
                + ("holds validation data already" if self.val is not None else
                   "is no batching DataLoader over a sized dataset")
                + "): pass Task.from_loaders(train, test, val=...)")
        asked, n = n, min(n, size // 2)  # a small data set: half decides, half reports
        kept, held = held_out_indices(size, n)

        def part(idx: torch.Tensor, shuffle: bool = False) -> DataLoader:
            """Validation keeps one order: margins pair each example's two scores."""
            return DataLoader(Subset(loader.dataset, idx.tolist()),
                              batch_size=loader.batch_size, shuffle=shuffle,
                              collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                              drop_last=loader.drop_last, pin_memory=loader.pin_memory)

        where = "test" if source == "test" else "training"
        rest = {"eval": part(kept), "eval_size": len(kept)} if source == "test" else {
            "train": part(kept, isinstance(loader.sampler, RandomSampler))}
        return dataclasses.replace(
            self, val=part(held), val_size=n, **rest,
            val_description=f"{n:,} of the user's {where} examples held out by a fixed seed"
            + (f" (half of them: {asked:,} were asked for)" if n < asked else ""),
            description=self.description + (
                f" less the {n:,} validation holds out" if source == "test" else ""))

    def train_loader(self, batch_size: int, seed: int, *, mean: tuple[float, ...] | None = None,
                     std: tuple[float, ...] | None = None, channels_last: bool = False
                     ) -> Iterable[Batch]:
        if callable(self.train) and not _is_loader(self.train):
            return self.train(batch_size=batch_size, seed=seed, mean=mean, std=std,
                              channels_last=channels_last)
        return self.train

    def eval_loader(self, *, mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None) -> Iterable[Batch]:
        if callable(self.eval) and not _is_loader(self.eval):
            return self.eval(mean=mean, std=std)
        return self.eval

    @property
    def decision_split(self) -> str:
        """``val`` if the task holds validation data out (decisions read it), else
        ``test``: the prefix of the scores a run records while deciding."""
        return "val" if self.val is not None else "test"

    def val_loader(self, *, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> Iterable[Batch] | None:
        """The validation batches, or None if the task holds none out."""
        if self.val is None:
            return None
        if callable(self.val) and not _is_loader(self.val):
            return self.val(mean=mean, std=std)
        return self.val

    def check(self, model: nn.Module, loader: Iterable[Batch]) -> None:
        """Push one batch through model, loss and metric before any long work starts, so a
        mismatch (shapes, dtypes, a broken callable) fails in seconds and names its part."""
        try:
            x, y = next(iter(loader))
        except StopIteration:
            raise DeepzipError(f"task {self.name}: the evaluation data is empty") from None
        except (TypeError, ValueError) as e:
            raise DeepzipError(f"task {self.name}: batches must be (inputs, targets) pairs "
                               f"({e})") from None
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = _step(f"one batch of {self.name} through the model (is {self.name} "
                            "its task? --task names another)",
                            lambda: model(model_input(x, device)))
                loss = _step(f"one batch through the loss {_name(self.loss)}",
                             lambda: self.loss(out, y.to(device)))
                if not torch.is_tensor(loss) or loss.numel() != 1:
                    raise DeepzipError(f"task {self.name}: the loss must return one number")
                if self.metric.streaming:
                    self.metric.reset()
                    _step(f"one batch through the metric {self.metric.name}",
                          lambda: self.metric.update(out, y.to(device)))
        finally:
            model.train(was)


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _step(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except DeepzipError:
        raise
    except Exception as e:  # the user's code: say which part failed, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DeepzipError(f"{what} failed: {type(e).__name__}: {first}") from None


def _is_loader(obj: Any) -> bool:
    return hasattr(obj, "__iter__")


def _dataset_size(loader: Any) -> int | None:
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else len(loader.labels)
    except (TypeError, AttributeError):
        return None


# ---------------------------------------------------------------- shipped image tasks
def image_task(name: str, data_dir: str | os.PathLike[str] | None = None, *,
               download: bool = False, subset: int | None = None,
               device: str | torch.device = "cpu", validation: int = 0,
               validation_from: str = "train") -> Task:
    """``cifar10`` or ``mnist`` from ``data_dir`` (torchvision's layouts), held in memory.

    Normalization comes from the model (its spec's mean and std), since third-party
    weights were trained with other constants; augmentation is the data set's usual one
    (CIFAR: pad-4 crop and mirror; MNIST: pad-2 crop, no mirror). ``validation`` > 0
    holds that many images out as validation data, drawn by a fixed seed (the same split
    for every run): from the training images (``validation_from="train"``, for a model
    trained without them), or from the test images (``"test"``, for a model that saw every
    training image, as most published ones did: its training images are no measure of
    what compression costs). Then the test set the task reports on is the rest, which no
    decision reads. ``subset`` then takes the first N of each part.
    """
    from .data import BatchLoader, load_cifar10, load_mnist
    from .normalization import NORMALIZATIONS

    info = {"cifar10": (load_cifar10, "CIFAR-10", 4, True),
            "mnist": (load_mnist, "MNIST", 2, False)}
    if name not in info:
        raise DeepzipError(f"unknown task {name!r}; shipped: {', '.join(TASKS)}, or "
                           "package.module:function")
    if subset is not None and subset < 1:
        raise DeepzipError(f"--subset must be >= 1, got {subset}")
    if not isinstance(validation, int) or isinstance(validation, bool) or validation < 0:
        raise DeepzipError(f"validation must be a count of images >= 0, got {validation!r}")
    if validation_from not in VALIDATION_FROM:
        raise DeepzipError(f"validation_from must be one of {', '.join(VALIDATION_FROM)}, "
                           f"got {validation_from!r}")
    load, title, pad, flip = info[name]
    held_from = validation_from if validation else None
    splits: dict[str, Any] = {}
    eval_cache: dict[tuple, BatchLoader] = {}

    def split(part: str) -> Any:
        """``train``, ``val`` (held out of the training or the test images) or ``test``."""
        if part not in splits:
            source = "train" if part == "train" else (
                "test" if part == "test" else held_from)
            full = load(data_dir, train=source == "train", download=download)
            parts = (dict(zip((source, "val"), full.split(validation), strict=True))
                     if source == held_from else {source: full})
            splits.update({k: v.subset(subset) if subset else v for k, v in parts.items()})
        return splits[part]

    default = NORMALIZATIONS["cifar" if name == "cifar10" else "mnist"]

    def norm(mean: Any, std: Any) -> dict[str, Any]:
        return {"mean": tuple(mean or default[0]), "std": tuple(std or default[1])}

    def train(*, batch_size: int, seed: int, mean: Any = None, std: Any = None,
              channels_last: bool = False) -> BatchLoader:
        return BatchLoader(split("train"), batch_size, train=True, device=device, seed=seed,
                           channels_last=channels_last, pad=pad, flip=flip, **norm(mean, std))

    def loader(part: str) -> Callable[..., BatchLoader]:
        def make(*, mean: Any = None, std: Any = None) -> BatchLoader:
            kw = norm(mean, std)
            key = (part, kw["mean"], kw["std"])  # one loader per normalization
            if key not in eval_cache:
                eval_cache[key] = BatchLoader(split(part), 500, device=device, **kw)
            return eval_cache[key]
        return make

    n = len(split("test"))
    n_val = len(split("val")) if validation else None
    rest = (f"the {n:,} of its images that validation does not hold out"
            if held_from == "test" else f"{n:,} images")
    return Task(name=name, train=train, eval=loader("test"), eval_size=n,
                normalization=default, val=loader("val") if validation else None,
                val_size=n_val,
                val_description=(f"{n_val:,} {title} {held_from.replace('train', 'training')}"
                                 " images held out by a fixed seed" if held_from else ""),
                description=f"{title} test set ({rest}"
                + (", the first N of --subset)" if subset else ")"))


TASKS = ("cifar10", "mnist")
VALIDATION_FROM = ("train", "test")


def resolve_task(name: str, data_dir: str | os.PathLike[str] | None = None, *,
                 download: bool = False, subset: int | None = None,
                 device: str | torch.device = "cpu", validation: int = 0,
                 validation_from: str = "train") -> Task:
    """A shipped task's name, or ``package.module:function`` returning a :class:`Task`.

    The function is called with those of ``data_dir``, ``download``, ``subset``,
    ``device``, ``validation`` (examples to hold out) and ``validation_from`` (``train``
    or ``test``: where from) that its signature accepts.
    """
    if ":" not in name:
        return image_task(name, data_dir, download=download, subset=subset, device=device,
                          validation=validation, validation_from=validation_from)
    fn = load_entry_point(name, "--task")
    if not callable(fn):
        raise DeepzipError(f"--task {name!r} is not callable")
    offered = {"data_dir": data_dir, "download": download, "subset": subset, "device": device,
               "validation": validation, "validation_from": validation_from}
    try:
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in offered.items() if k in params} if not any(
            p.kind is p.VAR_KEYWORD for p in params.values()) else offered
    except (TypeError, ValueError):
        kwargs = {}
    task = _step(f"--task {name}", lambda: fn(**kwargs))
    if not isinstance(task, Task):
        raise DeepzipError(f"--task {name!r} returned {type(task).__name__}, not a "
                           "deepzip.task.Task (see Task.from_loaders)")
    return task
