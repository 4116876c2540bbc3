"""The whole Deep Compression pipeline as one resumable run.

baseline -> prune (+ masked retraining) -> quantize (+ centroid training) -> encode .dzip
-> evaluate the *decoded* file -> report. Each stage records its result in
``OUT/state.json`` and leaves its model on disk, so an interrupted run resumes at the stage
where it stopped (and inside a training stage, at its last epoch).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import decide, dzip_torch, stages
from .atomic import atomic_write, read_json, remove_stale_temps
from .budget import Budget, Terms
from .checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from .deprecated import moved
from .errors import DeepzipError
from .loading import PRETRAINED, load_model
from .models import arch_name
from .prune import (
    AGPSchedule,
    PruneConfig,
    bake_,
    finetune_after_prune,
    prune_,
    sensitivity,
    sparsity_of,
    targets_from_sensitivity,
)
from .quantize import QuantizeConfig, dequantize_
from .recipe import AGPStage, Recipe
from .report import current_stages, outputs_agree
from .runfolder import MAX_JSON, file_sha256, is_rows, is_search_record, run_state
from .task import Task
from .train import Distillation, barrier, default_device, is_main_process

__all__ = ["Pipeline"]

__getattr__ = moved(__name__, {  # moved in 0.3, and in 0.4 to modules of their own
    "open_model": "deepzip.loading:load_model", "compress": "deepzip.api:compress",
    "Compressed": "deepzip.api:Compressed", "verify": "deepzip.stages:verify",
    "run_folder": "deepzip.runfolder:run_folder",
    "write_run_files": "deepzip.runfolder:write_run_files"})

UNSHARED_DTYPE = "float16"  # the weights of a model no sharing fits the budget of
SEEN_NOTE = ("[note] {}, so the held-out examples are not unseen data for it: decisions on "
             "them judge how well compression keeps what it learned, and the budget may not "
             "hold on new data; for a model that never saw them, hold them out of its "
             "training (deepzip train --validation N) and use --validation-from train")
STAGES = ("baseline", "prune", "quantize", "encode", "verify")


class Pipeline:
    """One run of a recipe on a task into ``out_dir``; :meth:`run` executes what is left.

    ``model``: an ``nn.Module`` to compress instead of the recipe's ``model`` (any
    architecture, registered or not); ``spec`` records its name and normalization.
    """

    def __init__(self, recipe: Recipe, out_dir: str | Path, task: Task,
                 log: Callable[[str], None] = print, *, model: nn.Module | None = None,
                 spec: ModelSpec | None = None, device: torch.device | None = None) -> None:
        if recipe.validation and task.val is None:
            task = task.holding_out(recipe.validation, recipe.validation_from)
        self.recipe, self.out, self.task = recipe, Path(out_dir), task
        self.device = device or default_device()
        self.log = log if is_main_process() else (lambda _msg: None)
        self.state_path = self.out / "state.json"
        self.state: dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "stages": {}}
        self._given = (model, spec)
        self._start: tuple[nn.Module, ModelSpec] | None = None
        self._teacher: nn.Module | None = None
        self._reference_scores: list[torch.Tensor | None] = []  # filled once, by _margin
        if recipe.max_loss is not None and task.val is None:
            raise DeepzipError(f"max_loss decides on validation data, and task {task.name!r} "
                               "holds none out: set validation: N (shipped tasks) or pass "
                               "Task.from_loaders(train, test, val=...)")
        self.budget = None if recipe.max_loss is None else Budget.parse(
            recipe.max_loss, task.metric.name, points=task.metric.points)
        if task.val is not None and model is None and recipe.model in PRETRAINED \
                and recipe.validation_from == "train":
            self.log(SEEN_NOTE.format(f"the shipped {recipe.model} was trained on every "
                                      "training example"))
        if self.state_path.is_file():
            self.state = self._resume_state(self._read_state())

    # ------------------------------------------------------------------ helpers
    def _read_state(self) -> dict[str, Any]:
        old = run_state(self.out)
        if old is not None and all(k in STAGES and isinstance(v, dict)
                                   for k, v in old["stages"].items()):
            return {**old, "stages": current_stages(old["stages"])}
        raise DeepzipError(f"{self.state_path} is damaged; use --restart to start the run "
                           "again, or another --out")

    def _resume_state(self, old: dict[str, Any]) -> dict[str, Any]:
        """What of an earlier run in ``out_dir`` still holds for this recipe.

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

    def _save_state(self) -> None:
        """Rank 0 writes (under torchrun every rank computes the same state)."""
        if is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.state_path, "w") as f:
                json.dump(self.state, f, indent=2)
        barrier()

    def _drop_checkpoints(self, stage: str) -> None:
        """A finished stage keeps its model and logs; its training checkpoints (weights,
        optimizer state: bigger than the model) only served to resume it."""
        if is_main_process():
            for p in (self.out / stage).rglob("checkpoint.pt"):
                p.unlink(missing_ok=True)

    def _done(self, stage: str) -> dict[str, Any] | None:
        return self.state["stages"].get(stage)

    def _finish(self, stage: str, t0: float, **result: Any) -> None:
        self.state["stages"][stage] = {**result, "seconds": time.time() - t0}
        self._save_state()

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

    def _fresh(self) -> nn.Module:
        """An untouched copy of the starting model, to load a stage's weights into."""
        return self.start()[0]

    def _reference(self) -> tuple[nn.Module, ModelSpec]:
        if self.recipe.reference is None:
            return self.start()
        if self._given[0] is not None:  # the user's class: fill a copy of it
            return load_model(self.recipe.reference, model=self._fresh())
        model, spec = self._open(self.recipe.reference)
        return model.to(self.device), spec

    def _load(self, path: Path, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        """A stage's checkpoint, loaded into a fresh copy of the starting model."""
        model, _ = load_checkpoint(path, spec, model=self._fresh())
        return model.to(self.device), spec

    def _loss(self, d: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                        torch.Tensor] | None:
        """Distillation against the reference if the stage asks, else None (the task's)."""
        if d is None:
            return None
        if self._teacher is None:
            self._teacher, _ = self._reference()
        return Distillation(self._teacher.to(self.device), d.alpha, d.temperature,
                            base=self.task.loss, classification=self.task.classification)

    def _score(self, model: nn.Module, spec: ModelSpec) -> float:
        """The metric a decision reads: on validation data when the task holds some out
        (the test set is then read only by the final evaluation), else on the test set."""
        return stages.decision_score(model.to(self.device), self.task, spec).value

    def _scored(self, model: nn.Module, spec: ModelSpec) -> dict[str, float]:
        """A stage's result entry for the model's score, named by the data it read."""
        return {self._named("score"): self._score(model, spec)}

    def _judge(self, model: nn.Module, spec: ModelSpec) -> tuple[float, float]:
        """The metric a decision reads (:meth:`_score`) and its margin, in one pass."""
        value, examples = stages.judged(model.to(self.device), self.task, spec)
        return value, self._margin(examples)

    def _margin(self, examples: torch.Tensor | None) -> float:
        """``margin_se`` standard errors of the loss whose per-example scores on
        validation data are ``examples``, against the reference's (paired per example); 0
        without margin_se, or for a metric with no per-example scores (said once)."""
        if not self.recipe.margin_se:
            return 0.0
        if not self._reference_scores:
            ref, ref_spec = self._reference()
            self._reference_scores.append(
                stages.judged(ref.to(self.device), self.task, ref_spec)[1])
            if self._reference_scores[0] is None:
                self.log(f"[note] metric {self.task.metric.name} is no mean of per-example "
                         "scores: margin_se cannot be applied")
        se = stages.loss_se(self.task, self._reference_scores[0], examples)
        return self.recipe.margin_se * se if se is not None else 0.0

    def _terms(self) -> Terms:
        """The budget against this run's baseline (known once the baseline stage ran)."""
        assert self.budget is not None
        return Terms(self.budget, self.state["stages"]["baseline"]["val_score"],
                     self.task.metric.points, self.task.metric.name, self.recipe.margin_se)

    def _named(self, key: str) -> str:
        """A recorded score's key: ``val_`` in front when it was read on validation data."""
        return f"val_{key}" if self.task.decision_split == "val" else key

    # ------------------------------------------------------------------ stages
    def baseline(self) -> tuple[nn.Module, ModelSpec]:
        """Evaluate the reference model (the starting one unless the recipe names another),
        after one batch through model, loss and metric has shown that they fit together."""
        r = self.recipe
        model, spec = self.start()
        if not self._done("baseline"):
            t0 = time.time()
            self.task.check(model, stages.decision_loader(self.task, spec))
            ref, ref_spec = (model, spec) if r.reference is None else self._reference()
            name = r.reference or r.model
            data = (f"validation data ({self.task.val_description})"
                    if self.task.val is not None else self.task.description or self.task.name)
            self.log(f"[baseline] evaluating {name} on {data}")
            scored = self._scored(ref, ref_spec)
            self.state["stages"]["baseline"] = scored  # what the budget is read against
            if self.budget is not None:  # a budget noise takes whole: before any stage
                self.log(self._terms().before_training(self.task.val_size or 0))
            self._finish("baseline", t0, **scored, sparsity=sparsity_of(ref), model=name)
        elif self.budget is not None and not self._done("prune"):
            self.log(self._terms().before_training(self.task.val_size or 0))
        return model, spec

    def prune(self, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        p = self.recipe.prune
        path = self.out / "prune" / "model.pt"
        if self._done("prune"):
            return self._load(path, spec)
        t0 = time.time()
        history: list[dict[str, Any]] = []
        search = None
        if p.schedule == "iterative":
            model, history, search = self._iterative(model, spec)
        elif p.schedule == "agp":
            assert p.agp is not None
            a = p.agp
            if a.search_from is not None:
                a, search = self._sparsity(model, spec)
            history = self._agp(model, spec, a, self.out / "prune" / "agp")
        bake_(model)
        if is_main_process():
            save_checkpoint(model, spec, path)
        self._drop_checkpoints("prune")
        self._finish("prune", t0, **self._scored(model, spec),
                     sparsity=sparsity_of(model, p.include, p.exclude), history=history,
                     **({"search": search} if search else {}))
        return model, spec

    def _iterative(self, model: nn.Module, spec: ModelSpec
                   ) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any] | None]:
        """Prune and retrain step by step; with ``stop_over_budget``, each step's model is
        held against the pruning's part of ``max_loss`` and the first over it is undone.
        Unlike a probe, what is judged is the model the stage delivers."""
        p = self.recipe.prune
        history: list[dict[str, Any]] = []
        judged: list[dict[str, Any]] = []
        for i, step in enumerate(p.steps, 1):
            self.log(f"[prune] step {i}/{len(p.steps)}: {step.method} {step.amount}, "
                     f"{step.epochs} epochs of masked retraining")
            before = copy.deepcopy(model) if p.stop_over_budget else None
            history += stages.prune_step(
                model, self.task, spec,
                step.config(p.include, p.exclude),
                self.recipe.train_config(p.train, step.epochs),
                loss_fn=self._loss(p.distill), out_dir=self.out / "prune" / f"step{i}",
                desc=f"prune {i}")
            if p.keep_steps and not self._keep_step(model, spec, judged, i):
                break
            if before is not None and not self._within_share(
                    model, spec, judged, f"step {i}", step=i,
                    sparsity=sparsity_of(model, p.include, p.exclude)):
                self.log(f"[prune] step {i} is over the pruning's part of max_loss: "
                         "undone, " + (f"keeping step {i - 1}" if i > 1
                                       else "the model stays unpruned"))
                model = before
                break
        if p.keep_steps:
            model, search = self._top_step(judged, spec)
            return model, history, search
        if not p.stop_over_budget:
            return model, history, None
        kept = len(judged) - (not judged[-1]["within"])
        return model, history, self._share_record(judged, kept_step=kept)

    def _keep_step(self, model: nn.Module, spec: ModelSpec, rows: list[dict[str, Any]],
                   i: int) -> bool:
        """``prune.keep_steps``: score step ``i``'s model on validation data and keep it
        (``prune/step{i}/model.pt``) for the quantize stage to choose from. False once a
        step is over the whole budget even less its margin: sparser steps would be too."""
        p, terms = self.recipe.prune, self._terms()
        value, extra = self._judge(model, spec)
        lost = stages.loss_points(self.task, terms.baseline, value)
        rows.append({"step": i, "sparsity": sparsity_of(model, p.include, p.exclude),
                     "score": value, "loss": lost, "margin": extra})
        if is_main_process():
            baked = copy.deepcopy(model)
            bake_(baked)
            save_checkpoint(baked, spec, self._step_path(i))
        hopeless = lost - extra > terms.allowed
        self.log(f"[prune] step {i}: {self.task.metric.name} {value:.4g} (loss {lost:.3g} "
                 f"{terms.units}, margin {extra:.3g})"
                 + (": over the whole budget less its margin, the last step" if hopeless
                    else ""))
        return not hopeless

    def _step_path(self, i: int) -> Path:
        return self.out / "prune" / f"step{i}" / "model.pt"

    def _top_step(self, rows: list[dict[str, Any]], spec: ModelSpec
                  ) -> tuple[nn.Module, dict[str, Any]]:
        """The kept steps' losses smoothed (:func:`deepzip.decide.monotone`), the steps
        whose pruning alone leaves room for the margin, and the sparsest of them: the
        model the sharing budget is searched on. None fits: the model stays unpruned."""
        t = self._terms()
        for r, f in zip(rows, decide.monotone([r["loss"] for r in rows]), strict=True):
            r["fit"] = f
        kept = decide.candidates(rows, t.allowed)
        top = max(kept, default=0)
        self.log("[prune] steps whose smoothed loss plus margin fits the budget: "
                 + (", ".join(map(str, kept)) + f"; the sharing budget is searched on step "
                    f"{top}" if kept else "none: the model stays unpruned"))
        model = self._load(self._step_path(top), spec)[0] if top else self._fresh()
        return model, {"max_loss": t.allowed, "budget": str(t.budget), "units": t.units,
                       "margin_se": t.margin_se, "baseline_val_score": t.baseline,
                       "steps": rows, "candidates": kept, "top_step": top}

    def _within_share(self, model: nn.Module, spec: ModelSpec, rows: list[dict[str, Any]],
                      what: str, **row: Any) -> bool:
        """Is ``model``'s loss on validation data within the pruning's part of the budget:
        ``prune.loss_share`` of what its margin leaves of ``max_loss`` (the margin is kept
        for the final confirmation, after the sharing)? The measurement joins ``rows``."""
        terms = self._terms()
        value, extra = self._judge(model, spec)
        lost = stages.loss_points(self.task, terms.baseline, value)
        ok, allowed = terms.step(lost, extra, self.recipe.prune.loss_share,
                                 self.task.val_size or 0)
        rows.append({**row, "score": value, "loss": lost, "margin": extra, "limit": allowed,
                     "within": ok})
        self.log(f"[prune] {what}: {self.task.metric.name} {value:.4g} (loss {lost:.3g} "
                 f"{terms.units}" + (f", limit {allowed:.3g} after margin {extra:.3g}"
                                       if extra else f", limit {allowed:.3g}")
                 + ")" + (" ok" if ok else " over"))
        return ok

    def _share_record(self, rows: list[dict[str, Any]], **found: Any) -> dict[str, Any]:
        """What the report and a resumed run keep of a search of the pruning's part."""
        t = self._terms()
        return {"max_loss": t.allowed, "budget": str(t.budget), "units": t.units,
                "margin_se": t.margin_se, "loss_share": self.recipe.prune.loss_share,
                "limit": self.recipe.prune.loss_share * t.allowed,
                "baseline_val_score": t.baseline, "probes": rows, **found}

    def _sparsity(self, model: nn.Module, spec: ModelSpec) -> tuple[AGPStage, dict[str, Any]]:
        """``max_loss`` with ``prune.agp.search_from``: the highest final sparsity whose
        probe (a copy of the model pruned by the schedule shrunk to ``probe_epochs``) stays
        within the pruning's part of the budget on validation data. A short schedule
        recovers less than the full one, so the probes tend to err on the safe side."""
        a = self.recipe.prune.agp
        assert a is not None and a.search_from is not None
        scale = a.probe_epochs / a.epochs
        shrunk = dataclasses.replace(a, epochs=a.probe_epochs, start_epoch=a.start_epoch * scale,
                                     end_epoch=a.end_epoch * scale)
        probes: list[dict[str, Any]] = []

        def passes(sparsity: float) -> bool:
            trial = copy.deepcopy(model)
            self._agp(trial, spec, dataclasses.replace(shrunk, final=sparsity),
                      self.out / "prune" / "probes" / f"{sparsity:.4f}", quiet=True)
            bake_(trial)
            return self._within_share(trial, spec, probes, f"probe at sparsity {sparsity:.4f}",
                                      sparsity=sparsity)

        def search() -> dict[str, Any]:
            self.log(f"[prune] searching the highest sparsity in [{a.search_from}, "
                     f"{a.final}] within {self.recipe.prune.loss_share:g} of max_loss"
                     + (" (less each probe's margin)" if self.recipe.margin_se else "")
                     + f", probes of {a.probe_epochs} epochs")
            chosen = stages.bisect(passes, safe=a.search_from, bold=a.final,
                                   steps=a.search_steps, bold_first=True)
            if not any(p["within"] for p in probes):
                self.log(f"[prune] no probe within its limit: pruning to the lowest, {chosen}")
            if is_main_process():
                shutil.rmtree(self.out / "prune" / "probes", ignore_errors=True)
            return self._share_record(probes, probe_epochs=a.probe_epochs, chosen=chosen)

        found = self._kept(self.out / "prune" / "search.json", "sparsity search", search)
        return dataclasses.replace(a, final=found["chosen"]), found

    def _agp(self, model: nn.Module, spec: ModelSpec, a: AGPStage, out_dir: Path, *,
             quiet: bool = False) -> list[dict[str, Any]]:
        p = self.recipe.prune
        per_layer = dict(a.per_layer)
        if a.sensitivity_max_drop is not None:
            scan = self.out / "prune" / "sensitivity.json"
            kept = read_json(scan, MAX_JSON, "sensitivity scan") if scan.is_file() else None
            if isinstance(kept, dict) and is_rows(kept.get("rows")):
                rows = kept["rows"]
            else:
                self.log("[prune] sensitivity scan for per-layer targets")
                rows = sensitivity(model, lambda m: self._score(m, spec), include=p.include,
                                   exclude=p.exclude)
                if is_main_process():
                    scan.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_write(scan, "w") as f:
                        json.dump({"rows": rows}, f)
            derived = targets_from_sensitivity(
                rows, a.sensitivity_max_drop, higher_is_better=self.task.metric.higher_is_better)
            per_layer = {n: max(v, a.final) if n not in a.per_layer else a.per_layer[n]
                         for n, v in derived.items()}
        cfg = self.recipe.train_config(p.train, a.epochs)
        loader = stages.train_loader(self.task, spec, cfg)
        steps = len(loader)
        prune_(model, PruneConfig("percentile", 0.0, include=p.include, exclude=p.exclude))
        hook = AGPSchedule(model, a.final, int(a.start_epoch * steps), int(a.end_epoch * steps),
                           initial=a.initial, frequency=a.frequency, per_layer=per_layer,
                           global_=a.global_threshold, include=p.include, exclude=p.exclude,
                           kernel_exponent=a.kernel_exponent)
        if not quiet:
            self.log(f"[prune] gradual pruning to {a.final} over epochs {a.start_epoch}-"
                     f"{a.end_epoch} of {a.epochs}"
                     + (f", per layer {per_layer}" if per_layer else "")
                     + (f", kernel exponent {a.kernel_exponent}" if a.kernel_exponent else ""))
        return finetune_after_prune(model, loader, cfg, after_step=hook, **stages.training(
            self.task, spec, loss_fn=self._loss(p.distill), out_dir=out_dir,
            desc="agp probe" if quiet else "agp"))

    def quantize(self, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        q = self.recipe.quantize
        path = self.out / "quantize" / "model.pt"
        t0 = time.time()
        e = self.recipe.encode
        if q is None:  # nothing to share: the pruned model at file precision (idempotent)
            dzip_torch.round_to_file_precision_(model, e.raw_dtype, e.codebook_dtype,
                                          e.fold_batchnorm)
            if not self._done("quantize"):
                self._finish("quantize", t0, skipped=True, **self._scored(model, spec))
            return model, spec
        if self._done("quantize"):
            return self._load(path, spec)
        qcfg = q.config(self.recipe.seed)
        self.log(f"[quantize] k-means weight sharing ({q.init} init, {q.bits} bits"
                 + (f", conv {q.bits_conv}" if q.bits_conv else "")
                 + (f", linear {q.bits_linear}" if q.bits_linear else "")
                 + (f", entropy-constrained, weight {q.entropy_weight}"
                    if q.entropy_weight else "")
                 + (", penalties weighted by the Fisher sensitivity of each layer"
                    if q.sensitivity == "fisher" else "")
                 + (f", indices within {q.target_bits} Huffman bits per nonzero"
                    if q.target_bits else "") + ")")
        if q.sensitivity == "fisher":  # before the budget search: its probes share them
            qcfg = stages.with_fisher(model, self.task, spec, qcfg,
                                      self.recipe.train_config(q.train, 1))
        budget = None
        if self.recipe.max_loss is not None:
            pruned = copy.deepcopy(model)
            qcfg, budget = self._budget(model, spec, qcfg)
            if "options" in budget:  # prune.keep_steps: the step chosen with the budget
                pruned = self._step_model(budget["chosen_step"], spec)
                model = copy.deepcopy(pruned)
        while True:
            shared = stages.share(
                model, self.task, spec, qcfg,
                qat=self.recipe.train_config({"weight_decay": 0.0, **q.qat_train}, q.qat_epochs),
                recluster_every=q.recluster_every,
                centroids=self.recipe.train_config({"weight_decay": 0.0, **q.train}, q.epochs),
                out_dir=self.out / "quantize", loss_fn=self._loss(q.distill), log=self.log)
            dzip_torch.round_to_file_precision_(model, e.raw_dtype, e.codebook_dtype,
                                                e.fold_batchnorm)
            value, extra = self._judge(model, spec)
            score = {self._named("score"): value}
            if budget is None or self._confirmed(
                    budget, value, qcfg.target_bits, extra,
                    **({"step": budget["chosen_step"]} if "options" in budget else {})):
                break
            if "options" in budget:
                option = self._next_option(budget)
                if option is None:
                    return self._unshared(self._step_model(min(budget["candidates"],
                                                               default=0), spec),
                                          spec, budget, t0)
                qcfg = dataclasses.replace(qcfg, target_bits=option.bits)
                budget["chosen_step"] = option.step
                pruned = self._step_model(option.step, spec)
                self.log(f"[quantize] over budget: once more, step {option.step} at "
                         f"{option.bits:.3f} bits")
            elif qcfg.target_bits >= q.bits:  # over at the cap: no sharing fits the budget
                return self._unshared(pruned, spec, budget, t0)
            else:
                bits = stages.retry_budget(budget["probes"], budget["confirmed"][-1],
                                           budget["max_loss"], q.bits) \
                    if len(budget["confirmed"]) == 1 else float(q.bits)
                qcfg = dataclasses.replace(qcfg, target_bits=bits)
                self.log(f"[quantize] over budget: once more at {bits:.3f} bits")
            model = copy.deepcopy(pruned)
            if is_main_process():
                shutil.rmtree(self.out / "quantize", ignore_errors=True)
        dequantize_(model)
        if is_main_process():
            save_checkpoint(model, spec, path)
        self._drop_checkpoints("quantize")
        self._finish("quantize", t0, **score,
                     **{self._named("score_kmeans"): shared.score_kmeans},
                     layers=shared.layers, history=shared.history,
                     **({"sensitivity": qcfg.sensitivity} if qcfg.sensitivity else {}),
                     **({"budget": budget, "target_bits": qcfg.target_bits} if budget else {}))
        return model, spec

    def _budget(self, model: nn.Module, spec: ModelSpec, qcfg: QuantizeConfig
                ) -> tuple[QuantizeConfig, dict[str, Any]]:
        """The recipe's ``max_loss``: the sharing budget of the smallest file within it on
        validation data, searched on probes of the pruned model (which stays as it is)."""
        q, t = self.recipe.quantize, self._terms()

        def search() -> dict[str, Any]:
            self.log(f"[quantize] searching the smallest file within {t.words()} of the "
                     f"baseline's validation {t.metric} {t.baseline:.4g}")
            bits, probes = stages.search_budget(
                model, self.task, spec, qcfg, baseline=t.baseline, max_loss=t.allowed,
                probe=self.recipe.train_config({"weight_decay": 0.0, **q.train},
                                               q.probe_epochs),
                loss_fn=self._loss(q.distill), encoding=dataclasses.asdict(self.recipe.encode),
                log=self.log, margin=self._margin)
            found = {"max_loss": t.allowed, "budget": str(t.budget), "units": t.units,
                     "margin_se": t.margin_se, "baseline_val_score": t.baseline,
                     "probes": probes, "chosen": bits, "confirmed": []}
            return {**found, **self._options(probes, spec, qcfg)} \
                if self.recipe.prune.keep_steps else found

        budget = self._kept(self.out / "quantize" / "budget.json", "budget search", search)
        return dataclasses.replace(qcfg, target_bits=budget["chosen"]), budget

    def _step_model(self, step: int, spec: ModelSpec) -> nn.Module:
        """The model of a kept pruning step (0: the unpruned start)."""
        return self._load(self._step_path(step), spec)[0] if step else self._fresh()

    def _options(self, probes: list[dict[str, Any]], spec: ModelSpec,
                 qcfg: QuantizeConfig) -> dict[str, Any]:
        """``prune.keep_steps``: every candidate step at every probed budget
        (:func:`deepzip.decide.options`; the three candidates below the searched one are
        clustered for their bytes) and the smallest file predicted within the budget
        (none: the one predicted nearest it)."""
        search, t = self.state["stages"]["prune"]["search"], self._terms()
        top, rows = search["top_step"], list(search["steps"])
        if top == 0:
            rows.append({"step": 0, "sparsity": sparsity_of(self._fresh()), "loss": 0.0,
                         "fit": 0.0, "margin": 0.0})
        bits = sorted({p["target_bits"] for p in probes})
        sizes = {}
        for k in [c for c in search["candidates"] if c != top][-3:]:
            self.log(f"[quantize] bytes of step {k} shared at each probed budget")
            sizes[k] = stages.shared_sizes(self._step_model(k, spec), spec, qcfg, bits,
                                           self._encoding())
        table = decide.options(rows, top, probes, sizes)
        choice = decide.choose(table, t.allowed) or min(table, key=lambda o: o.loss + o.margin)
        self.log(f"[quantize] chosen: step {choice.step} (sparsity {choice.sparsity:.4f}) at "
                 f"{choice.bits:.3f} bits, {choice.bytes:,} bytes, loss "
                 f"{'measured' if choice.measured else 'predicted'} {choice.loss:.3g} + "
                 f"margin {choice.margin:.3g} {t.units}")
        return {"options": decide.as_rows(table), "chosen": choice.bits,
                "chosen_step": choice.step, "candidates": search["candidates"]}

    def _next_option(self, budget: dict[str, Any]) -> decide.Option | None:
        """After a full stage over the budget: the smallest file still predicted within
        it once every prediction carries the largest miss so far; None after three full
        stages, or when none is left."""
        tried = [(c["step"], c["target_bits"]) for c in budget["confirmed"]]
        if len(tried) >= 3:
            return None
        table = decide.from_rows(budget["options"])
        predicted = {(o.step, o.bits): o.loss + o.margin for o in table}
        excess = max(c["loss"] + c["margin"] - predicted.get((c["step"], c["target_bits"]),
                                                               c["loss"] + c["margin"])
                     for c in budget["confirmed"])
        return decide.choose(table, budget["max_loss"], excess=max(0.0, excess), tried=tried)

    def _kept(self, path: Path, what: str, search: Callable[[], dict[str, Any]]
              ) -> dict[str, Any]:
        """A search's result, kept in ``path``: an interrupted stage does not search again."""
        if path.is_file():
            try:
                kept = read_json(path, MAX_JSON, what)
            except DeepzipError:
                kept = None
            if is_search_record(kept):
                return kept
            self.log(f"[resume] {path} is damaged: searching again")
        result = search()
        if is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "w") as f:
                json.dump(result, f)
        return result

    def _confirmed(self, budget: dict[str, Any], val_score: float, bits: float | None,
                   extra: float, **row: Any) -> bool:
        """Did the full stage stay within ``max_loss`` (its loss plus ``extra``, the
        margin) on validation data? Over it, :meth:`quantize` tries a larger budget once
        (calibrated by this miss), then the cap, then no sharing at all."""
        lost = stages.loss_points(self.task, budget["baseline_val_score"], val_score)
        ok = lost + extra <= budget["max_loss"]
        budget["confirmed"].append({"target_bits": bits, "val_score": val_score,
                                    "loss": lost, "margin": extra, "within": ok, **row})
        t = self._terms()
        self.log("[quantize] full stage "
                 + (f"at {bits:.3f} bits" if bits is not None else "without sharing")
                 + f": validation loss {lost:.3g}" + (f" + margin {extra:.3g}" if extra else "")
                 + f" {t.units} (budget {t.words()})")
        return ok

    def _unshared(self, pruned: nn.Module, spec: ModelSpec, budget: dict[str, Any],
                  t0: float) -> tuple[nn.Module, ModelSpec]:
        """No sharing fits the budget, at the cap either: the pruned model ships with its
        weights unshared, stored as float16 (the recipe's ``encode`` is kept for the
        rest). Judged like a shared one; over the budget even so, the loss is the
        pruning's, and the report says so."""
        self.log("[quantize] over the budget at the cap: storing the pruned model's weights "
                 "unshared, as float16")
        e = self._encoding()
        model = copy.deepcopy(pruned)
        dzip_torch.round_to_file_precision_(model, UNSHARED_DTYPE, e["codebook_dtype"],
                                            e["fold_batchnorm"])
        value, extra = self._judge(model, spec)
        if not self._confirmed(budget, value, None, extra, raw_dtype=UNSHARED_DTYPE):
            self.log("[quantize] still over the budget without sharing: the loss is the "
                     "pruning's")
        if is_main_process():
            shutil.rmtree(self.out / "quantize", ignore_errors=True)
            save_checkpoint(model, spec, self.out / "quantize" / "model.pt")
        self._finish("quantize", t0, skipped=True, unshared=UNSHARED_DTYPE,
                     **{self._named("score"): value}, budget=budget)
        return model, spec

    def _encoding(self) -> dict[str, Any]:
        """The recipe's ``encode`` settings, with unshared weights stored as float16 where
        the quantize stage found that no sharing fits the budget."""
        e = dataclasses.asdict(self.recipe.encode)
        unshared = (self._done("quantize") or {}).get("unshared")
        return {**e, "raw_dtype": unshared} if unshared else e

    def encode(self, model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
        path = self.out / "model.dzip"
        if not self._done("encode"):
            t0 = time.time()
            info = stages.encode(model, spec, path, **self._encoding(), like=self._fresh())
            self.log(f"[encode] {path}: {info['file_bytes']:,} bytes, "
                     f"{info['real_ratio']:.1f}x smaller than the fp32 state_dict")
            self._finish("encode", t0, **{k: v for k, v in info.items() if k != "tensors"},
                         tensors=info["tensors"], sha256=file_sha256(path))
        return self.state["stages"]["encode"]

    def verify(self, model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
        """Decode the file into a fresh copy of the starting model and compare it with the
        in-memory model on the whole evaluation set: outputs, predictions and the metric.
        A run that decided on validation data reads the test set here, and only here."""
        if not self._done("verify"):
            t0 = time.time()
            if self.task.val is not None:
                self._test_scores(model, spec)
            path = self.out / "model.dzip"
            made = self.state["stages"]["encode"].get("sha256")
            if made is not None and file_sha256(path) != made:
                raise DeepzipError(f"{path} is not the file this run wrote (its SHA-256 "
                                   "differs): it was changed after the encode stage; use "
                                   "--restart, or another --out")
            decoded = dzip_torch.load(path, self._fresh())
            result = stages.verify(model, decoded, stages.eval_loader(self.task, spec),
                                   task=self.task)
            self.log(f"[verify] decoded .dzip: {self.task.metric.name} {result['score']:.4g}, "
                     + outputs_agree(result)
                     + (f", predictions equal on {result['same_predictions']}/"
                        f"{result['examples']}" if self.task.classification else ""))
            self._finish("verify", t0, **result)
        return self.state["stages"]["verify"]

    def _test_scores(self, model: nn.Module, spec: ModelSpec) -> None:
        """The test-set scores of the reference, the pruned and the shared model, for the
        report, when every decision before was taken on validation data."""
        st = self.state["stages"]
        ref, ref_spec = self._reference()
        st["baseline"]["score"] = stages.score(ref.to(self.device), self.task, ref_spec).value
        if self._seen(st["baseline"]["val_score"], st["baseline"]["score"]):
            st["baseline"]["seen_validation"] = True
            self.log(SEEN_NOTE.format(
                f"the baseline scores {st['baseline']['val_score']:.4g} on its validation "
                f"examples and {st['baseline']['score']:.4g} on the test examples, far "
                "apart: it was likely trained on the validation examples"))
        pruned = self.out / "prune" / "model.pt"
        if pruned.is_file():
            st["prune"]["score"] = stages.score(self._load(pruned, spec)[0], self.task,
                                                spec).value
        st["quantize"]["score"] = stages.score(model, self.task, spec).value

    def _seen(self, val: float, test: float) -> bool:
        """Does an accuracy-like baseline score far better on its validation examples than
        on its test examples (by a point and 3 standard errors of the difference), as a
        model trained on them does?"""
        m = self.task.metric
        if not m.points or not self.task.val_size or not self.task.eval_size:
            return False
        gap = (val - test) if m.higher_is_better else (test - val)
        se = math.sqrt(val * (1 - val) / self.task.val_size
                       + test * (1 - test) / self.task.eval_size)
        return gap > max(0.01, 3 * se)

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            remove_stale_temps(self.out)  # left by a kill between a write and its rename
        self._save_state()
        t0 = time.time()

        def stage(i: int, name: str) -> None:
            done = "done, " if self._done(name) else ""
            self.log(f"== stage {i}/{len(STAGES)}: {name} ({done}{(time.time() - t0) / 60:.1f} "
                     "min into this run)")

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
            return {"stages": self.state["stages"]}
        return write_run_report(self.out, self.recipe, self.state, self.task)
