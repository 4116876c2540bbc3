"""The prune stage of a run and its policies: iterative steps (each kept for the sharing
to choose from, or the first over its share of the budget undone), gradual pruning
(AGP), and a search of AGP's final sparsity on short probes.

:class:`Pruning` works on a :class:`~deepzip.context.RunContext`; the pipeline runs it as
its second stage, and a test can run it alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from torch import nn

from . import decide, stages
from .atomic import atomic_write, read_json
from .checkpoint import ModelSpec, save_checkpoint
from .context import RunContext
from .prune import (
    AGPSchedule,
    PruneConfig,
    bake_,
    finetune_after_prune,
    prune_,
    sparsity_of,
)
from .recipe import AGPStage
from .runfolder import MAX_JSON, is_rows
from .train import is_main_process

__all__ = ["Pruning", "step_path"]

Rows = list[dict[str, Any]]


def step_path(out: Path, i: int) -> Path:
    """Where ``prune.keep_steps`` keeps step ``i``'s model."""
    return out / "prune" / f"step{i}" / "model.pt"


class Pruning:
    """The recipe's ``prune`` section, run on ``ctx``'s starting model."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def __call__(self, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        c, p = self.ctx, self.ctx.recipe.prune
        path = c.out / "prune" / "model.pt"
        if c.done("prune"):
            return c.load(path, spec)
        t0 = time.time()
        history: Rows = []
        search = None
        if p.schedule == "iterative":
            model, history, search = self.iterative(model, spec)
        elif p.schedule == "agp":
            assert p.agp is not None
            a = p.agp
            if a.search_from is not None:
                a, search = self.search_agp(model, spec)
            history = self.agp(model, spec, a, c.out / "prune" / "agp")
        bake_(model)
        if is_main_process():
            save_checkpoint(model, spec, path)
        c.drop_checkpoints("prune")
        c.finish("prune", t0, **c.scored(model, spec),
                 sparsity=sparsity_of(model, p.include, p.exclude), history=history,
                 **({"search": search} if search else {}))
        return model, spec

    def iterative(self, model: nn.Module, spec: ModelSpec
                  ) -> tuple[nn.Module, Rows, dict[str, Any] | None]:
        """Prune and retrain step by step. With ``keep_steps`` every retrained step's model
        (and the last's) is scored and kept (:meth:`top_step` picks the one the sharing
        budget is searched on); a one-shot step that a retrained one follows is a waypoint,
        neither judged nor kept; with
        ``stop_over_budget``, each step's model is held against the pruning's part of
        ``max_loss`` and the first over it is undone. Unlike a probe, what is judged is
        the model the stage delivers."""
        c, p = self.ctx, self.ctx.recipe.prune
        history: Rows = []
        judged: Rows = []
        for i, step in enumerate(p.steps, 1):
            c.log(f"[prune] step {i}/{len(p.steps)}: {step.method} {step.n_m or step.amount}, "
                  + (f"{step.epochs} epochs of masked retraining" if step.epochs else
                     "one shot"))
            before = copy.deepcopy(model) if p.stop_over_budget else None
            history += stages.prune_step(
                model, c.task, spec, step.config(p.include, p.exclude),
                c.recipe.train_config(p.train, step.epochs), loss_fn=c.loss(p.distill),
                out_dir=c.out / "prune" / f"step{i}", desc=f"prune {i}",
                calibration=p.calibration)
            if p.keep_steps and not step.epochs and i < len(p.steps) and p.steps[i].epochs:
                c.log(f"[prune] step {i}: one shot on the way to step {i + 1}, which "
                      "retrains it: neither judged nor kept")
            elif p.keep_steps and not self.keep_step(model, spec, judged, i):
                break
            if before is not None and not self.within_share(
                    model, spec, judged, f"step {i}", step=i,
                    sparsity=sparsity_of(model, p.include, p.exclude)):
                c.log(f"[prune] step {i} is over the pruning's part of max_loss: undone, "
                      + (f"keeping step {i - 1}" if i > 1 else "the model stays unpruned"))
                model = before
                break
        if p.keep_steps:
            model, search = self.top_step(judged, spec)
            return model, history, search
        if not p.stop_over_budget:
            return model, history, None
        kept = len(judged) - (not judged[-1]["within"])
        return model, history, self.share_record(judged, kept_step=kept)

    def keep_step(self, model: nn.Module, spec: ModelSpec, rows: Rows, i: int) -> bool:
        """``prune.keep_steps``: score step ``i``'s model on validation data and keep it
        (:func:`step_path`) for the quantize stage to choose from. False once a step is
        over the whole budget even less its margin: sparser steps would be too."""
        c, p, terms = self.ctx, self.ctx.recipe.prune, self.ctx.terms()
        value, extra = c.judge(model, spec)
        lost = c.lost(value)
        rows.append({"step": i, "sparsity": sparsity_of(model, p.include, p.exclude),
                     "score": value, "loss": lost, "margin": extra})
        if is_main_process():
            baked = copy.deepcopy(model)
            bake_(baked)
            save_checkpoint(baked, spec, step_path(c.out, i))
        hopeless = lost - extra > terms.allowed
        c.log(f"[prune] step {i}: {c.task.metric.name} {value:.4g} (loss {lost:.3g} "
              f"{terms.units}, margin {extra:.3g})"
              + (": over the whole budget less its margin, the last step" if hopeless else ""))
        return not hopeless

    def top_step(self, rows: Rows, spec: ModelSpec) -> tuple[nn.Module, dict[str, Any]]:
        """The kept steps' losses smoothed (:func:`deepzip.decide.monotone`), the steps
        whose pruning alone leaves room for the margin, and the sparsest of them: the
        model the sharing budget is searched on. None fits: the model stays unpruned."""
        c, t = self.ctx, self.ctx.terms()
        for r, f in zip(rows, decide.monotone([r["loss"] for r in rows]), strict=True):
            r["fit"] = f
        kept = decide.candidates(rows, t.allowed)
        top = max(kept, default=0)
        c.log("[prune] steps whose smoothed loss plus margin fits the budget: "
              + (", ".join(map(str, kept)) + f"; the sharing budget's search starts on step {top}"
                 if kept else "none: the model stays unpruned"))
        model = c.load(step_path(c.out, top), spec)[0] if top else c.fresh()
        return model, {"max_loss": t.allowed, "budget": str(t.budget), "units": t.units,
                       "margin_se": t.margin_se, "baseline_val_score": t.baseline,
                       "steps": rows, "candidates": kept, "top_step": top}

    def within_share(self, model: nn.Module, spec: ModelSpec, rows: Rows, what: str,
                     **row: Any) -> bool:
        """Is ``model``'s loss on validation data within the pruning's part of the budget:
        ``prune.loss_share`` of what its margin leaves of ``max_loss`` (the margin is kept
        for the final confirmation, after the sharing)? The measurement joins ``rows``."""
        c, terms = self.ctx, self.ctx.terms()
        value, extra = c.judge(model, spec)
        lost = c.lost(value)
        ok, allowed = terms.step(lost, extra, c.recipe.prune.loss_share, c.task.val_size or 0)
        rows.append({**row, "score": value, "loss": lost, "margin": extra, "limit": allowed,
                     "within": ok})
        c.log(f"[prune] {what}: {c.task.metric.name} {value:.4g} (loss {lost:.3g} "
              f"{terms.units}" + (f", limit {allowed:.3g} after margin {extra:.3g}"
                                  if extra else f", limit {allowed:.3g}")
              + ")" + (" ok" if ok else " over"))
        return ok

    def share_record(self, rows: Rows, **found: Any) -> dict[str, Any]:
        """What the report and a resumed run keep of a search of the pruning's part."""
        t, share = self.ctx.terms(), self.ctx.recipe.prune.loss_share
        return {"max_loss": t.allowed, "budget": str(t.budget), "units": t.units,
                "margin_se": t.margin_se, "loss_share": share, "limit": share * t.allowed,
                "baseline_val_score": t.baseline, "probes": rows, **found}

    def search_agp(self, model: nn.Module, spec: ModelSpec) -> tuple[AGPStage, dict[str, Any]]:
        """``max_loss`` with ``prune.agp.search_from``: the highest final sparsity whose
        probe (a copy of the model pruned by the schedule shrunk to ``probe_epochs``) stays
        within the pruning's part of the budget on validation data. A short schedule
        recovers less than the full one, so the probes tend to err on the safe side."""
        c, a = self.ctx, self.ctx.recipe.prune.agp
        assert a is not None and a.search_from is not None
        scale = a.probe_epochs / a.epochs
        shrunk = dataclasses.replace(a, epochs=a.probe_epochs, start_epoch=a.start_epoch * scale,
                                     end_epoch=a.end_epoch * scale)
        probes: Rows = []

        def passes(sparsity: float) -> bool:
            trial = copy.deepcopy(model)
            self.agp(trial, spec, dataclasses.replace(shrunk, final=sparsity),
                     c.out / "prune" / "probes" / f"{sparsity:.4f}", quiet=True)
            bake_(trial)
            return self.within_share(trial, spec, probes, f"probe {len(probes) + 1}/"
                                     f"{a.search_steps + 2} at sparsity {sparsity:.4f}",
                                     sparsity=sparsity)

        def search() -> dict[str, Any]:
            c.log(f"[prune] searching the highest sparsity in [{a.search_from}, {a.final}] "
                  f"within {c.recipe.prune.loss_share:g} of max_loss"
                  + (" (less each probe's margin)" if c.recipe.margin_se else "")
                  + f", probes of {a.probe_epochs} epochs")
            chosen = stages.bisect(passes, safe=a.search_from, bold=a.final,
                                   steps=a.search_steps, bold_first=True)
            if not any(p["within"] for p in probes):
                c.log(f"[prune] no probe within its limit: pruning to the lowest, {chosen}")
            if is_main_process():
                shutil.rmtree(c.out / "prune" / "probes", ignore_errors=True)
            return self.share_record(probes, probe_epochs=a.probe_epochs, chosen=chosen)

        found = c.kept(c.out / "prune" / "search.json", "sparsity search", search)
        return dataclasses.replace(a, final=found["chosen"]), found

    def per_layer(self, model: nn.Module, spec: ModelSpec, a: AGPStage) -> dict[str, float]:
        """AGP's per-layer targets: the recipe's, and with ``sensitivity_max_drop`` those a
        sensitivity scan derives (kept in ``prune/sensitivity.json`` for a resumed run)."""
        c, p = self.ctx, self.ctx.recipe.prune
        if a.sensitivity_max_drop is None:
            return dict(a.per_layer)
        scan = c.out / "prune" / "sensitivity.json"
        kept = read_json(scan, MAX_JSON, "sensitivity scan") if scan.is_file() else None
        if isinstance(kept, dict) and is_rows(kept.get("rows")):
            rows = kept["rows"]
        else:
            c.log("[prune] sensitivity scan for per-layer targets")
            rows = stages.sensitivity_scan(model, c.task, spec, include=p.include,
                                           exclude=p.exclude, score_fn=lambda m: c.score(m, spec))
            if is_main_process():
                scan.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(scan, "w") as f:
                    json.dump({"rows": rows}, f)
        derived = stages.layer_targets(rows, a.sensitivity_max_drop, c.task)
        return {n: max(v, a.final) if n not in a.per_layer else a.per_layer[n]
                for n, v in derived.items()}

    def agp(self, model: nn.Module, spec: ModelSpec, a: AGPStage, out_dir: Path, *,
            quiet: bool = False) -> Rows:
        """Gradual pruning (Zhu & Gupta's cubic ramp) during ``a.epochs`` of training."""
        c, p = self.ctx, self.ctx.recipe.prune
        per_layer = self.per_layer(model, spec, a)
        cfg = c.recipe.train_config(p.train, a.epochs)
        loader = stages.train_loader(c.task, spec, cfg)
        steps = len(loader)
        prune_(model, PruneConfig("percentile", 0.0, include=p.include, exclude=p.exclude))
        hook = AGPSchedule(model, a.final, int(a.start_epoch * steps), int(a.end_epoch * steps),
                           initial=a.initial, frequency=a.frequency, per_layer=per_layer,
                           global_=a.global_threshold, include=p.include, exclude=p.exclude,
                           kernel_exponent=a.kernel_exponent)
        if not quiet:
            c.log(f"[prune] gradual pruning to {a.final} over epochs {a.start_epoch}-"
                  f"{a.end_epoch} of {a.epochs}"
                  + (f", per layer {per_layer}" if per_layer else "")
                  + (f", kernel exponent {a.kernel_exponent}" if a.kernel_exponent else ""))
        return finetune_after_prune(model, loader, cfg, after_step=hook, **stages.training(
            c.task, spec, loss_fn=c.loss(p.distill), out_dir=out_dir,
            desc="agp probe" if quiet else "agp"))
