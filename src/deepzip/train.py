"""One training loop for everything: baseline training, masked retraining, centroid training.

Later stages reuse :func:`fit` through two hooks instead of copying it: ``param_filter``
picks which parameters the optimizer updates, and ``after_step`` runs after every
optimizer step (e.g. to re-apply masks); if it has a ``metrics()`` method, what that
returns joins each epoch's log (the pruning schedule logs its sparsity so far).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_torch_save, atomic_write
from .checks import field_problems
from .errors import DeepzipError
from .task import Accuracy, Metric, Task, class_scores, classification_loss, model_input

__all__ = [
    "Distillation",
    "Evaluation",
    "TrainConfig",
    "calibrate",
    "default_device",
    "evaluate",
    "fit",
    "init_distributed_from_env",
    "is_main_process",
    "lr_factor",
    "recalibrate_batchnorm_",
]

SCHEDULES = ("cosine", "multistep", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    """Settings for :func:`fit`. Defaults are the recipe of the shipped ResNet-20 baseline."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    optimizer: str = "sgd"  # sgd (momentum, nesterov) or adamw (transformers train with it)
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: fractions of the run
    gamma: float = 0.1  # multistep: lr factor at each milestone
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    precision: str = "auto"  # training autocast; evaluation is always fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile the training step (worth it on GPUs)
    eval_every: int = 1  # epochs between test-set evaluations (and after the last); 0: none
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the log, not used

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if problems:  # wrong types first: the range checks below assume numbers
            raise DeepzipError("bad training config: " + "; ".join(problems))
        if self.epochs > 100_000 or self.batch_size > 1 << 20 or not 0 <= self.seed < 2 ** 63:
            problems.append("epochs <= 100000, batch_size <= 1048576 and 0 <= seed < 2^63")
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if any(not 0 < m < 1 for m in self.milestones):
            problems.append(f"milestones are fractions in (0, 1), got {self.milestones}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.eval_every < 0:
            problems.append(f"eval_every must be >= 0, got {self.eval_every}")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if problems:
            raise DeepzipError("bad training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DeepzipError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**d)


def lr_factor(step: int, total: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` of ``total`` (a pure function)."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)  # progress after warmup, in [0, 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    if cfg.schedule == "onecycle":  # 30% linear ramp from lr/25, then cosine to ~0
        peak = 0.3
        if t < peak:
            return 0.04 + 0.96 * t / peak
        return 0.5 * (1 + math.cos(math.pi * (t - peak) / (1 - peak)))
    return 1.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_precision(device: torch.device) -> str:
    """What ``precision: auto`` trains in: bf16 where the hardware computes it (CUDA with
    bf16, else fp16; CPUs with AVX-512, where oneDNN's bf16 kernels run), fp32 elsewhere:
    on a CPU without them bf16 is emulated, about 10x slower than fp32
    (``bench/train_throughput.py``)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") \
            else "fp32"
    return "bf16"


def _autocast(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager,
                                                             bool]:
    """(context, needs_grad_scaler) for the training forward pass."""
    if precision == "auto":
        precision = auto_precision(device)
    if precision == "fp32":
        return contextlib.nullcontext(), False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision == "fp16"


class Evaluation(NamedTuple):
    """Mean loss and the metric's value (top-1 accuracy unless another metric was given)."""

    loss: float
    value: float


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             task: Task | None = None, metric: Metric | None = None,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             each: Callable[[torch.Tensor, torch.Tensor], None] | None = None
             ) -> Evaluation:
    """Mean loss and the metric, in fp32: the ``task``'s metric and loss, else top-1
    accuracy and cross-entropy (``metric`` and ``loss_fn`` replace either). ``each`` sees
    every batch's (outputs, targets), so a caller that needs more of them than the mean
    does not pass over the data again.

    >>> loss, acc = evaluate(model, test_loader, task=task)
    """
    metric = metric or (task.metric if task is not None else Accuracy())
    loss_fn = loss_fn or (task.loss if task is not None else classification_loss)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, n = 0.0, 0
    if metric.streaming:
        metric.reset()
    try:
        for x, y in loader:
            x, y = model_input(x, device), y.to(device)
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(y)
            if metric.streaming:
                metric.update(out, y)
            if each is not None:
                each(out, y)
            n += len(y)
        if n == 0:
            raise DeepzipError("evaluation set is empty")
        if not math.isfinite(loss_sum):
            raise DeepzipError("evaluation loss is not finite: the model's outputs are NaN "
                               "or infinite (diverged weights, or a bad normalization?)")
        value = metric.compute() if metric.streaming else metric(model, loader)
    finally:
        model.train(was_training)
    return Evaluation(loss_sum / n, value)


class Distillation:
    """Knowledge distillation loss (Hinton et al. 2015) for ``fit(loss_fn=...)``:
    ``(1 - alpha) * base(student, targets) + alpha * T^2 * KL(teacher_T || student_T)``.

    Compressed models recover accuracy faster when they imitate the uncompressed one.
    ``base`` is the task's loss (cross-entropy by default). For outputs that are not class
    scores (``classification=False``), the imitation term is the mean squared difference
    from the teacher's outputs instead of the KL divergence of softened classes.

    >>> history = fit(pruned, loader, cfg, loss_fn=Distillation(baseline, alpha=0.7))
    ... # doctest: +ELLIPSIS
    train epoch 1/1 lr=0.01 train_loss=...
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 4.0, *,
                 base: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 classification: bool = True) -> None:
        if not 0 <= alpha <= 1 or not temperature > 0 or not math.isfinite(temperature):
            raise DeepzipError("distillation needs 0 <= alpha <= 1 and 0 < temperature < inf")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.t = alpha, temperature
        self.base = base or classification_loss
        self.classification = classification

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor
                 ) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(inputs).float()
        if self.classification:  # per example, or per token: (M, C) scores either way
            scores, _ = class_scores(logits.float(), labels)
            target = F.log_softmax(class_scores(teacher, labels)[0] / self.t, 1)
            soft = F.kl_div(F.log_softmax(scores / self.t, 1), target,
                            log_target=True, reduction="batchmean") * self.t ** 2
        else:
            soft = F.mse_loss(logits.float(), teacher)
        return (1 - self.alpha) * self.base(logits, labels) + self.alpha * soft


@torch.no_grad()
def calibrate(model: nn.Module, loader: Iterable[Any], batches: int) -> None:
    """``batches`` batches of ``loader`` (``(inputs, ...)``) through ``model`` as it is,
    for what hooks and BatchNorm statistics see: calibration data, never gradients."""
    from .task import model_input

    device = next(model.parameters()).device
    seen = 0
    for x, *_ in loader:
        model(model_input(x, device))
        seen += 1
        if seen >= batches:
            break
    if not seen:
        raise DeepzipError("the calibration data is empty")


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, loader: Iterable[Any], batches: int = 8) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` batches of
    ``loader`` (the model's inputs; no gradients, no weight changes): after pruning or
    sharing without retraining, the statistics the layers were trained with no longer
    describe their inputs. Returns how many layers were re-estimated.

    >>> recalibrate_batchnorm_(model, calibration_loader)  # ResNet-20's BatchNorms
    19
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    was = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    model.eval()
    for m in norms:
        m.train()
    try:
        calibrate(model, loader, batches)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was)
    return len(norms)


def is_main_process() -> bool:
    """False on ranks other than 0 under torch.distributed: only rank 0 writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for all ranks (no-op without torch.distributed), e.g. after rank 0 wrote a file."""
    if _world() > 1:
        dist.barrier()


def init_distributed_from_env() -> torch.device | None:
    """Join the process group that ``torchrun`` describes in the environment.

    NCCL on GPUs (one per local rank), gloo on CPUs. Returns this rank's device, or
    ``None`` when not launched by torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def fit(
    model: nn.Module,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    *,
    test_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    param_filter: Callable[[str, nn.Parameter], bool] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    lr_scale: Callable[[str, nn.Parameter], float] | None = None,
    task: Task | None = None,
    metric: Metric | None = None,
    eval_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    eval_name: str = "test",
    desc: str = "train",
) -> list[dict[str, Any]]:
    """Train ``model`` in place with SGD (or AdamW: ``cfg.optimizer``); return per-epoch
    metrics.

    ``loss_fn(logits, labels, inputs)`` replaces cross-entropy, e.g. :class:`Distillation`.
    ``lr_scale(name, param)`` multiplies the learning rate of single parameters (shared
    weights, whose gradient sums over many weights, need a smaller one). ``task`` gives
    the metric (logged as ``train_<name>``/``test_<name>``) and the loss (its
    cross-entropy with ``cfg.label_smoothing``); without it top-1 accuracy and
    cross-entropy. ``metric`` and ``eval_loss`` (the test loss) replace the task's.
    ``test_loader`` is evaluated every ``cfg.eval_every`` epochs and logged as
    ``<eval_name>_loss``/``<eval_name>_<metric>`` (``val`` for validation data).

    ``train_loader`` is a :class:`~deepzip.data.BatchLoader` or any sized iterable of
    ``(inputs, labels)`` batches (a ``DataLoader``). With ``out_dir``, each epoch
    atomically rewrites ``checkpoint.pt`` and ``metrics.jsonl``; ``resume=True`` continues
    from that checkpoint. Parameters that ``param_filter`` rejects are frozen meanwhile.
    Under ``torchrun`` (an initialized process group) the model trains as
    DistributedDataParallel, BatchLoaders shard the data, and only rank 0 writes files.

    >>> loader = BatchLoader(train, 128, train=True)
    >>> history = fit(model, loader, TrainConfig(epochs=1))  # doctest: +ELLIPSIS
    train epoch 1/1 lr=0.1 train_loss=...
    """
    if task is not None:
        metric, eval_loss = metric or task.metric, eval_loss or task.loss
        if loss_fn is None and task.loss is not classification_loss:
            task_loss = task.loss
            loss_fn = lambda logits, y, _x: task_loss(logits, y)  # noqa: E731
    device = getattr(train_loader, "device", None) or next(model.parameters()).device
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    chosen = [(n, p) for n, p in named if param_filter is None or param_filter(n, p)]
    if not chosen:
        raise DeepzipError("no parameters to train (param_filter selected none)")
    frozen = [p for n, p in named if param_filter is not None and not param_filter(n, p)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        groups: dict[float, list[nn.Parameter]] = {}
        for n, p in chosen:
            groups.setdefault(lr_scale(n, p) if lr_scale else 1.0, []).append(p)
        param_groups = [{"params": ps, "lr": cfg.lr * k} for k, ps in groups.items()]
        return _fit(model, train_loader, cfg, device, param_groups, test_loader, out_dir,
                    resume, after_step, loss_fn, metric or Accuracy(), eval_loss, desc,
                    eval_name)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _fit(model, train_loader, cfg, device, param_groups, test_loader, out_dir, resume,
         after_step, loss_fn, metric, eval_loss, desc, eval_name) -> list[dict[str, Any]]:
    main = is_main_process()
    net: nn.Module = model
    if _world() > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    opt = (torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
           if cfg.optimizer == "adamw" else
           torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay))
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise DeepzipError("training set is smaller than one batch")
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, cfg, steps_per_epoch))
    autocast, use_scaler = _autocast(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if out and resume and ckpt_path.is_file():
        history, start_epoch = _resume(ckpt_path, device, model, (opt, sched, scaler),
                                       train_loader, after_step, cfg, desc)

    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        epoch_lr = opt.param_groups[0]["lr"]  # the rate this epoch starts with, for the log
        bar = tqdm(train_loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if main else True, dynamic_ncols=True)
        totals, train_time = _epoch(net, model, bar, (opt, sched, scaler), autocast,
                                    after_step, loss_fn, metric, cfg, device)
        loss_sum, score_sum, seen, scored = totals
        if not math.isfinite(loss_sum):
            raise DeepzipError(f"{desc}: training diverged in epoch {epoch + 1} (loss "
                               f"{loss_sum / seen}); lower the learning rate or add warmup")
        rec: dict[str, Any] = {
            "epoch": epoch + 1, "lr": epoch_lr,
            "train_loss": loss_sum / seen,
            **({f"train_{metric.name}": metric.finish(score_sum / max(scored, 1))}
               if metric.streaming else {}),
            "images_per_s": seen / train_time, "train_time_s": train_time,
        }
        if test_loader is not None and cfg.eval_every and (
                (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            rec[f"{eval_name}_loss"], rec[f"{eval_name}_{metric.name}"] = evaluate(
                model, test_loader, metric=metric, loss_fn=eval_loss)
        if hasattr(after_step, "metrics"):
            rec.update(after_step.metrics())
        history.append(rec)
        if not main:
            continue
        per_epoch = (time.perf_counter() - run_start) / (epoch + 1 - start_epoch)
        left = per_epoch * (cfg.epochs - epoch - 1) / 60  # training and evaluation
        print(f"{desc} epoch {epoch + 1}/{cfg.epochs} " + " ".join(
            f"{k}={v:.4g}" for k, v in rec.items() if k != "epoch")
            + (f" (about {left:.1f} min left in {desc})" if left else ""), flush=True)
        if out:
            _checkpoint(out, model, (opt, sched, scaler), train_loader, after_step, history,
                        epoch + 1, cfg)
    if out and main:
        with atomic_write(out / "train_config.json", "w") as f:
            json.dump(_plain(asdict(cfg)), f, indent=2)
    return history


def _resume(path: Path, device: torch.device, model: nn.Module, state: tuple[Any, Any, Any],
            train_loader: Any, after_step: Any, cfg: TrainConfig, desc: str
            ) -> tuple[list[dict[str, Any]], int]:
    """(history, epochs done) from a stage's ``checkpoint.pt``, with the model, optimizer,
    scheduler, scaler, loader and hook put back where they were; one line if the file is
    damaged or another run's."""
    opt, sched, scaler = state
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if "loader" in saved and hasattr(train_loader, "load_state_dict"):
            train_loader.load_state_dict(saved["loader"])
        torch.set_rng_state(saved["torch_rng"])
        history = list(saved["history"])
        start_epoch = int(saved["epoch"])
        if "hook" in saved and hasattr(after_step, "load_state_dict"):
            after_step.load_state_dict(saved["hook"])
        if not 0 <= start_epoch <= cfg.epochs or len(history) != start_epoch:
            raise ValueError(f"epoch {start_epoch} of {cfg.epochs}")
    except Exception as e:  # noqa: BLE001 - damaged, truncated, or another run's file
        raise DeepzipError(
            f"cannot resume {desc} from {path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:80] if str(e) else ''}): a damaged file or "
            "another run's; delete it to start this stage again, or use --restart"
        ) from None
    if is_main_process():
        print(f"resuming {desc} from {path} at epoch {start_epoch}/{cfg.epochs}")
    return history, start_epoch


def _epoch(net: nn.Module, model: nn.Module, bar: Any, state: tuple[Any, Any, Any],
           autocast: Any, after_step: Any, loss_fn: Any, metric: Any, cfg: TrainConfig,
           device: torch.device) -> tuple[list[float], float]:
    """One pass over the training batches: the sums of loss, score, examples and scored
    examples (per token for sequences, all ranks together), and its seconds."""
    opt, sched, scaler = state
    t0 = time.perf_counter()
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    for i, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = net(x)
            loss = (loss_fn(logits, y, x) if loss_fn is not None else
                    classification_loss(logits, y, label_smoothing=cfg.label_smoothing))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        if after_step is not None:
            after_step(model)
        score = (metric.batch(logits.detach().float(), y).double() if metric.streaming
                 else torch.zeros((), device=device, dtype=torch.float64))
        totals += torch.stack([
            loss.detach().double() * len(y), score,
            torch.tensor(len(y), device=device, dtype=torch.float64),
            torch.as_tensor(metric.count(y), device=device, dtype=torch.float64)])
        if i % 20 == 0:
            loss_sum, score_sum, seen, scored = totals.tolist()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}",
                            **{metric.name: f"{metric.finish(score_sum / scored):.3f}"},
                            ex_s=f"{seen * _world() / (time.perf_counter() - t0):.0f}")
    if _world() > 1:
        dist.all_reduce(totals)
    return totals.tolist(), time.perf_counter() - t0


def _checkpoint(out: Path, model: nn.Module, state: tuple[Any, Any, Any], train_loader: Any,
                after_step: Any, history: list[dict[str, Any]], epoch: int,
                cfg: TrainConfig) -> None:
    """Everything a resumed stage needs after ``epoch`` epochs (``checkpoint.pt``), and
    the history so far (``metrics.jsonl``)."""
    opt, sched, scaler = state
    atomic_torch_save({
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
        **({"loader": train_loader.state_dict()} if hasattr(train_loader, "state_dict")
           else {}),
        "torch_rng": torch.get_rng_state(),
        "history": history, "epoch": epoch, "config": _plain(asdict(cfg)),
        **({"hook": after_step.state_dict()} if hasattr(after_step, "state_dict") else {}),
    }, out / "checkpoint.pt")
    with atomic_write(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
