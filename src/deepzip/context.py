"""What every stage of a run shares: its recipe, task and folder, its state file, the
models it starts from, and how a decision scores a model (on validation data, with the
margin its noise asks for, against the budget).

The :class:`~deepzip.pipeline.Pipeline` makes one :class:`RunContext` and hands it to
each stage's policy (:mod:`deepzip.sparsity`, :mod:`deepzip.sharing`); a test can make
one on a tiny task and drive a policy alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import stages
from .atomic import atomic_write, read_json
from .budget import Budget, Terms
from .checkpoint import ModelSpec, load_checkpoint
from .errors import DeepzipError
from .loading import load_model
from .models import arch_name
from .recipe import Recipe
from .report import current_stages
from .runfolder import MAX_JSON, is_search_record, run_state
from .task import Task
from .train import Distillation, barrier, default_device, is_main_process

__all__ = ["STAGES", "RunContext"]

STAGES = ("baseline", "prune", "quantize", "encode", "verify")
Search = Callable[[], dict[str, Any]]


class RunContext:
    """One run of ``recipe`` on ``task`` into ``out``: its state (``state.json``, resumed
    where an earlier run of the same recipe left it), its models and its judge.

    ``model``: an ``nn.Module`` to compress instead of the recipe's ``model``; ``spec``
    records its name and normalization.
    """

    def __init__(self, recipe: Recipe, out: str | Path, task: Task,
                 log: Callable[[str], None] = print, *, model: nn.Module | None = None,
                 spec: ModelSpec | None = None, device: torch.device | None = None) -> None:
        if recipe.validation and task.val is None:
            task = task.holding_out(recipe.validation, recipe.validation_from)
        self.recipe, self.out, self.task = recipe, Path(out), task
        self.device = device or default_device()
        self.log = log if is_main_process() else (lambda _msg: None)
        self.state_path = self.out / "state.json"
        self.state: dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "stages": {}}
        self._given = (model, spec)
        self._start: tuple[nn.Module, ModelSpec] | None = None
        self._teacher: nn.Module | None = None
        self._reference_scores: list[torch.Tensor | None] = []  # filled once, by margin
        if recipe.max_loss is not None and task.val is None:
            raise DeepzipError(f"max_loss decides on validation data, and task {task.name!r} "
                               "holds none out: set validation: N (shipped tasks) or pass "
                               "Task.from_loaders(train, test, val=...)")
        self.budget = None if recipe.max_loss is None else Budget.parse(
            recipe.max_loss, task.metric.name, points=task.metric.points)
        if self.state_path.is_file():
            self.state = self.resume_state(self.read_state())

    # ------------------------------------------------------------------ state
    def read_state(self) -> dict[str, Any]:
        old = run_state(self.out)
        if old is not None and all(k in STAGES and isinstance(v, dict)
                                   for k, v in old["stages"].items()):
            return {**old, "stages": current_stages(old["stages"])}
        raise DeepzipError(f"{self.state_path} is damaged; use --restart to start the run "
                           "again, or another --out")

    def resume_state(self, old: dict[str, Any]) -> dict[str, Any]:
        """What of an earlier run in ``out`` still holds for this recipe.

        Same starting model, task, seed and pruning: the pruned model is kept, and if only
        the quantize or encode settings changed, those stages are redone (a cheap way to
        try other bit widths). A run that finished no stage (a failed start) is simply
        started again. Anything else is another run's folder: an error.
        """
        now = self.state["recipe"]
        if not old["stages"]:
            return self.state
        try:
            before = dataclasses.asdict(Recipe.from_dict(old["recipe"]))
        except (DeepzipError, KeyError, TypeError):
            before = {}
        upstream = ("model", "reference", "arch", "normalize", "task", "validation",
                    "validation_from", "seed", "prune")
        searched = self.recipe.prune.reads_budget
        budget = ("max_loss", "margin_se")
        if not before or any(before[k] != now[k] for k in upstream) or (
                searched and any(before[k] != now[k] for k in budget)):
            raise DeepzipError(f"{self.out} holds a run of a different recipe; "
                               "use another --out or --restart")
        if any(before[k] != now[k] for k in ("quantize", "encode", *budget)):
            self.log("[resume] quantize/encode settings or max_loss changed: keeping the "
                     "pruned model, redoing quantize, encode and verify")
            for stage in STAGES[STAGES.index("quantize"):]:
                old["stages"].pop(stage, None)
            if is_main_process():
                shutil.rmtree(self.out / "quantize", ignore_errors=True)
        return {**old, "recipe": now}

    def save_state(self) -> None:
        """Rank 0 writes (under torchrun every rank computes the same state)."""
        if is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.state_path, "w") as f:
                json.dump(self.state, f, indent=2)
        barrier()

    def drop_checkpoints(self, stage: str) -> None:
        """A finished stage keeps its model and logs; its training checkpoints (weights,
        optimizer state: bigger than the model) only served to resume it."""
        if is_main_process():
            for p in (self.out / stage).rglob("checkpoint.pt"):
                p.unlink(missing_ok=True)

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.state["stages"].get(stage)

    def finish(self, stage: str, t0: float, **result: Any) -> None:
        self.state["stages"][stage] = {**result, "seconds": time.time() - t0}
        self.save_state()

    def kept(self, path: Path, what: str, search: Search) -> dict[str, Any]:
        """A search's result, kept in ``path``: an interrupted stage does not search again."""
        if path.is_file():
            try:
                found = read_json(path, MAX_JSON, what)
            except DeepzipError:
                found = None
            if is_search_record(found):
                return found
            self.log(f"[resume] {path} is damaged: searching again")
        result = search()
        if is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "w") as f:
                json.dump(result, f)
        return result

    # ------------------------------------------------------------------ models
    def _open(self, name: str) -> tuple[nn.Module, ModelSpec]:
        """The recipe's model or reference: a checkpoint, a .dzip file or a shipped name,
        with the recipe's ``arch`` and ``normalize`` where given."""
        return load_model(name, arch=self.recipe.arch, normalize=self.recipe.normalize,
                          task=self.task)

    def start(self) -> tuple[nn.Module, ModelSpec]:
        """The model compression starts from, fresh (the given module is not changed).
        The file is opened once; later calls copy what it gave."""
        if self._start is None:
            model, spec = self._given
            if model is None:
                model, spec = self._open(self.recipe.model)
            elif spec is None:
                mean, std = self.task.normalization or ((), ())
                spec = ModelSpec(arch=arch_name(model), num_classes=None, mean=mean, std=std,
                                 task=self.task.name)
            self._start = (copy.deepcopy(model).cpu(), spec)
        template, spec = self._start
        return copy.deepcopy(template).to(self.device), spec

    @property
    def given_model(self) -> bool:
        """Whether the run compresses a module the caller passed (not a named model)."""
        return self._given[0] is not None

    def fresh(self) -> nn.Module:
        """An untouched copy of the starting model, to load a stage's weights into."""
        return self.start()[0]

    def reference(self) -> tuple[nn.Module, ModelSpec]:
        if self.recipe.reference is None:
            return self.start()
        if self.given_model:  # the user's class: fill a copy of it
            return load_model(self.recipe.reference, model=self.fresh())
        model, spec = self._open(self.recipe.reference)
        return model.to(self.device), spec

    def load(self, path: Path, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        """A stage's checkpoint, loaded into a fresh copy of the starting model."""
        model, _ = load_checkpoint(path, spec, model=self.fresh())
        return model.to(self.device), spec

    def loss(self, d: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                       torch.Tensor] | None:
        """Distillation against the reference if the stage asks, else None (the task's)."""
        if d is None:
            return None
        if self._teacher is None:
            self._teacher, _ = self.reference()
        return Distillation(self._teacher.to(self.device), d.alpha, d.temperature,
                            base=self.task.loss, classification=self.task.classification)

    # ------------------------------------------------------------------ judging
    def score(self, model: nn.Module, spec: ModelSpec) -> float:
        """The metric a decision reads: on validation data when the task holds some out
        (the test set is then read only by the final evaluation), else on the test set."""
        return stages.decision_score(model.to(self.device), self.task, spec).value

    def scored(self, model: nn.Module, spec: ModelSpec) -> dict[str, float]:
        """A stage's result entry for the model's score, named by the data it read."""
        return {self.named("score"): self.score(model, spec)}

    def judge(self, model: nn.Module, spec: ModelSpec) -> tuple[float, float]:
        """The metric a decision reads (:meth:`score`) and its margin, in one pass."""
        value, examples = stages.judged(model.to(self.device), self.task, spec)
        return value, self.margin(examples)

    def margin(self, examples: torch.Tensor | None) -> float:
        """``margin_se`` standard errors of the loss whose per-example scores on
        validation data are ``examples``, against the reference's (paired per example); 0
        without margin_se, or for a metric with no per-example scores (said once)."""
        if not self.recipe.margin_se:
            return 0.0
        if not self._reference_scores:
            ref, ref_spec = self.reference()
            self._reference_scores.append(
                stages.judged(ref.to(self.device), self.task, ref_spec)[1])
            if self._reference_scores[0] is None:
                self.log(f"[note] metric {self.task.metric.name} is no mean of per-example "
                         "scores: margin_se cannot be applied")
        se = stages.loss_se(self.task, self._reference_scores[0], examples)
        return self.recipe.margin_se * se if se is not None else 0.0

    def terms(self) -> Terms:
        """The budget against this run's baseline (known once the baseline stage ran)."""
        assert self.budget is not None
        return Terms(self.budget, self.state["stages"]["baseline"]["val_score"],
                     self.task.metric.points, self.task.metric.name, self.recipe.margin_se)

    def lost(self, value: float) -> float:
        """The loss of a score against the baseline's on validation data, in the budget's
        unit."""
        return stages.loss_points(self.task, self.terms().baseline, value)

    def named(self, key: str) -> str:
        """A recorded score's key: ``val_`` in front when it was read on validation data."""
        return f"val_{key}" if self.task.decision_split == "val" else key
