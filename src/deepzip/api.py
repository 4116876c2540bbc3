"""``deepzip.compress``: the whole pipeline on any model and data, from Python.

The stages, their resumption and the run folder are :class:`~deepzip.pipeline.Pipeline`'s
and :func:`~deepzip.runfolder.run_folder`'s; this is the thin layer a user calls, as the
CLI's ``deepzip run`` is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dzip_torch
from .checkpoint import ModelSpec
from .errors import DeepzipError
from .models import arch_name
from .pipeline import Pipeline
from .recipe import Recipe, load_recipe, recipe_path
from .runfolder import run_folder, write_run_files
from .task import Task, resolve_task
from .train import default_device, is_main_process

__all__ = ["Compressed", "compress"]


@dataclasses.dataclass
class Compressed:
    """What :func:`compress` made: ``model``, decoded from the file (exactly what was
    verified), ``path`` of the ``.dzip``, and the run's ``report``; ``result[key]`` reads
    the report, as the report itself did."""

    model: nn.Module
    path: Path
    report: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.report[key]


def compress(model: nn.Module | str, task: Task | tuple[Iterable, Iterable] | str,
             recipe: Recipe | str = "default", *, out: str | Path,
             spec: ModelSpec | None = None, reference: str | None = None,
             device: torch.device | str | None = None, allow_code: bool = False,
             log: Callable[[str], None] = print, **overrides: Any) -> Compressed:
    """Run (or resume) the whole pipeline on any model and task; return what it made.

    ``model``: an ``nn.Module`` (any architecture; it is not changed), or what the CLI takes
    (a checkpoint, a ``.dzip``, a shipped name). ``task``: a :class:`~deepzip.task.Task`,
    a ``(train_loader, eval_loader)`` pair (classification, top-1 accuracy), or a task
    name. ``recipe``: a :class:`~deepzip.recipe.Recipe`, a shipped recipe's name or a YAML
    file (one whose ``task:`` or ``arch:`` names Python code runs only with
    ``allow_code=True``). The stages are the ones ``deepzip run`` runs, and resume the
    same way; a second run on the same ``out`` stops at once. Returns a
    :class:`Compressed`: the model decoded from the file, the file's path, the report.
    The default recipe keeps the loss within one point of accuracy (1% of any other
    metric's baseline) on 5,000 of the evaluation loader's examples, held out by a fixed
    seed, and reports on the rest. ``overrides`` set any recipe key, a section's keys
    merged (:meth:`~deepzip.recipe.Recipe.with_overrides`): ``validation=1000``,
    ``max_loss="0.5%"``, ``margin_se=1``, ``prune={"loss_share": 0.6}``.

    >>> result = deepzip.compress(MyNet(), (train_loader, test_loader), "default",
    ...                           out="runs/mynet", validation=2000)  # doctest: +SKIP
    >>> result.model, result.path, result.report["summary"]["real_ratio"]  # doctest: +SKIP
    """
    if not isinstance(recipe, Recipe):
        path = recipe_path(recipe)
        recipe = load_recipe(path).with_overrides(**overrides)
        recipe.check_code(allow_code, where=path, given=set(overrides))  # yours: allowed
    else:
        recipe = recipe.with_overrides(**overrides) if overrides else dataclasses.replace(recipe)
    dev = torch.device(device) if device is not None else default_device()
    if isinstance(task, tuple):
        task = Task.from_loaders(*task)
    elif isinstance(task, str):
        task = resolve_task(task, device=dev, validation=recipe.validation,
                            validation_from=recipe.validation_from)
    if not isinstance(task, Task):
        raise DeepzipError("task must be a deepzip Task, a (train, eval) pair of loaders or "
                           "a task name")
    if reference is not None:
        recipe.reference = reference
    given = model if isinstance(model, nn.Module) else None
    recipe.model = f"python:{arch_name(model)}" if given is not None else str(model)
    with run_folder(out) as folder:
        made_by = (f"deepzip.compress({recipe.model.removeprefix('python:')}, task "
                   f"{task.name!r}, recipe {recipe.name!r}, out={str(out)!r})")
        pipe = Pipeline(recipe, folder, task, log, model=given, spec=spec, device=dev,
                        command=made_by)
        write_run_files(folder, recipe, made_by, " (as deepzip.compress ran it)")
        report = pipe.run()
        path = folder / "model.dzip"
        decoded = dzip_torch.load(path, pipe.ctx.fresh().cpu()) if is_main_process() else None
    return Compressed(decoded, path, report)
