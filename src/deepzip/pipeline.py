"""The whole Deep Compression pipeline as one resumable run.

baseline -> prune (+ masked retraining) -> quantize (+ centroid training) -> encode .dzip
-> evaluate the *decoded* file -> report. Each stage records its result in
``OUT/state.json`` and leaves its model on disk, so an interrupted run resumes at the stage
where it stopped (and inside a training stage, at its last epoch).

The pipeline composes units a test can drive alone: the run's shared state, models and
judge (:class:`~deepzip.context.RunContext`), the prune stage's policies
(:class:`~deepzip.sparsity.Pruning`), the quantize stage's (:class:`~deepzip.sharing.Sharing`)
and the stage functions under them (:mod:`deepzip.stages`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import stages
from .atomic import remove_stale_temps
from .checkpoint import ModelSpec
from .context import STAGES, RunContext
from .deprecated import moved
from .errors import DeepzipError
from .loading import PRETRAINED
from .recipe import Recipe
from .report import outputs_agree
from .runfolder import file_sha256
from .sharing import Sharing, encoding
from .sparsity import Pruning, step_path
from .task import Task
from .train import is_main_process

__all__ = ["Pipeline"]

__getattr__ = moved(__name__, {  # moved in 0.3, and in 0.4 to modules of their own
    "open_model": "deepzip.loading:load_model", "compress": "deepzip.api:compress",
    "Compressed": "deepzip.api:Compressed", "verify": "deepzip.stages:verify",
    "run_folder": "deepzip.runfolder:run_folder",
    "write_run_files": "deepzip.runfolder:write_run_files",
    "UNSHARED_DTYPE": "deepzip.sharing:UNSHARED_DTYPE"})

SEEN_NOTE = ("[note] {}, so the held-out examples are not unseen data for it: decisions on "
             "them judge how well compression keeps what it learned, and the budget may not "
             "hold on new data; for a model that never saw them, hold them out of its "
             "training (deepzip train --validation N) and use --validation-from train")


class Pipeline:
    """One run of a recipe on a task into ``out_dir``; :meth:`run` executes what is left.

    ``model``: an ``nn.Module`` to compress instead of the recipe's ``model`` (any
    architecture, registered or not); ``spec`` records its name and normalization;
    ``command``: how the run was started (the report quotes it).
    """

    def __init__(self, recipe: Recipe, out_dir: str | Path, task: Task,
                 log: Callable[[str], None] = print, *, model: nn.Module | None = None,
                 spec: ModelSpec | None = None, device: torch.device | None = None,
                 command: str = "deepzip run") -> None:
        self.command = command  # how the run was started, for its report
        self.ctx = c = RunContext(recipe, out_dir, task, log, model=model, spec=spec,
                                  device=device)
        if c.task.val is not None and model is None and recipe.model in PRETRAINED \
                and recipe.validation_from == "train":
            c.log(SEEN_NOTE.format(f"the shipped {recipe.model} was trained on every "
                                   "training example"))
        self.pruning, self.sharing = Pruning(c), Sharing(c)

    @property
    def state(self) -> dict[str, Any]:
        return self.ctx.state

    def start(self) -> tuple[nn.Module, ModelSpec]:
        """The model compression starts from, fresh (the given module is not changed)."""
        return self.ctx.start()

    def baseline(self) -> tuple[nn.Module, ModelSpec]:
        """Evaluate the reference model (the starting one unless the recipe names another),
        after one batch through model, loss and metric has shown that they fit together."""
        c = self.ctx
        model, spec = c.start()
        if not c.done("baseline"):
            t0 = time.time()
            c.task.check(model, stages.decision_loader(c.task, spec))
            ref, ref_spec = (model, spec) if c.recipe.reference is None else c.reference()
            name = c.recipe.reference or c.recipe.model
            data = (f"validation data ({c.task.val_description})"
                    if c.task.val is not None else c.task.description or c.task.name)
            c.log(f"[baseline] evaluating {name} on {data}")
            scored = c.scored(ref, ref_spec)
            c.state["stages"]["baseline"] = scored  # what the budget is read against
            if c.budget is not None:  # a budget noise takes whole: before any stage
                c.log(c.terms().before_training(c.task.val_size or 0))
            c.finish("baseline", t0, **scored, sparsity=stages.sparsity(ref), model=name)
        elif c.budget is not None and not c.done("prune"):
            c.log(c.terms().before_training(c.task.val_size or 0))
        return model, spec

    def prune(self, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        return self.pruning(model, spec)

    def quantize(self, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        return self.sharing(model, spec)

    def encode(self, model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
        c = self.ctx
        path = c.out / "model.dzip"
        if not c.done("encode"):
            t0 = time.time()
            info = stages.encode(model, spec, path, **encoding(c), like=c.fresh())
            c.log(f"[encode] {path}: {info.file_bytes:,} bytes, "
                  f"{info.real_ratio:.1f}x smaller than the fp32 state_dict")
            c.finish("encode", t0, **info.to_dict(), sha256=file_sha256(path))
        return c.state["stages"]["encode"]

    def verify(self, model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
        """Decode the file into a fresh copy of the starting model and compare it with the
        in-memory model on the whole evaluation set: outputs, predictions and the metric.
        A run that decided on validation data reads the test set here, and only here."""
        c = self.ctx
        if not c.done("verify"):
            t0 = time.time()
            if c.task.val is not None:
                self._test_scores(model, spec)
            path = c.out / "model.dzip"
            made = c.state["stages"]["encode"].get("sha256")
            if made is not None and file_sha256(path) != made:
                raise DeepzipError(f"{path} is not the file this run wrote (its SHA-256 "
                                   "differs): it was changed after the encode stage; use "
                                   "--restart, or another --out")
            result = stages.verify(model, stages.decoded(path, c.fresh()),
                                   stages.eval_loader(c.task, spec), task=c.task)
            c.log(f"[verify] decoded .dzip: {c.task.metric.name} {result['score']:.4g}, "
                  + outputs_agree(result)
                  + (f", predictions equal on {result['same_predictions']}/"
                     f"{result['examples']}" if c.task.classification else ""))
            c.finish("verify", t0, **result)
        return c.state["stages"]["verify"]

    def _test_scores(self, model: nn.Module, spec: ModelSpec) -> None:
        """The test-set scores of the reference, the pruned and the shared model, for the
        report, when every decision before was taken on validation data."""
        c = self.ctx
        st = c.state["stages"]
        ref, ref_spec = c.reference()
        st["baseline"]["score"] = stages.score(ref.to(c.device), c.task, ref_spec).value
        if self._seen(st["baseline"]["val_score"], st["baseline"]["score"]):
            st["baseline"]["seen_validation"] = True
            c.log(SEEN_NOTE.format(
                f"the baseline scores {st['baseline']['val_score']:.4g} on its validation "
                f"examples and {st['baseline']['score']:.4g} on the test examples, far "
                "apart: it was likely trained on the validation examples"))
        step = st["quantize"].get("step")  # prune.keep_steps: the step the file ships
        pruned = step_path(c.out, step) if step else c.out / "prune" / "model.pt"
        if pruned.is_file():
            st["prune"]["score"] = stages.score(c.load(pruned, spec)[0], c.task, spec).value
        st["quantize"]["score"] = stages.score(model, c.task, spec).value

    def _seen(self, val: float, test: float) -> bool:
        """Does an accuracy-like baseline score far better on its validation examples than
        on its test examples (by a point and 3 standard errors of the difference), as a
        model trained on them does?"""
        task = self.ctx.task
        if not task.metric.points or not task.val_size or not task.eval_size:
            return False
        gap = (val - test) if task.metric.higher_is_better else (test - val)
        se = math.sqrt(val * (1 - val) / task.val_size + test * (1 - test) / task.eval_size)
        return gap > max(0.01, 3 * se)

    def run(self) -> dict[str, Any]:
        c = self.ctx
        c.out.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            remove_stale_temps(c.out)  # left by a kill between a write and its rename
        c.save_state()
        t0, before, planned = time.time(), set(c.state["stages"]), c.recipe.planned_epochs()

        def stage(i: int, name: str) -> None:
            """The stage header: where the run is in the whole, and, once a stage that
            trains has finished in this process, about how long the rest will take."""
            done = "done, " if c.done(name) else ""
            ran = sum(planned.get(s, 0) for s in c.state["stages"] if s not in before)
            left = sum(planned.get(s, 0) for s in STAGES[i - 1:] if not c.done(s))
            eta = (f", about {(time.time() - t0) / ran * left / 60:.0f} min left"
                   if ran and left else "")
            c.log(f"== stage {i}/{len(STAGES)}: {name} ({done}{(time.time() - t0) / 60:.1f} "
                  f"min into this run{eta})")

        stage(1, "baseline")
        model, spec = self.baseline()
        stage(2, "prune")
        model, spec = self.prune(model, spec)
        stage(3, "quantize")
        model, spec = self.quantize(model, spec)
        stage(4, "encode")
        self.encode(model, spec)
        stage(5, "verify")
        self.verify(model, spec)
        from .render import write_run_report

        if not is_main_process():
            return {"stages": c.state["stages"]}
        return write_run_report(c.out, c.recipe, c.state, c.task, self.command)
