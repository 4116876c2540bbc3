"""The quantize stage of a run and its policies: k-means weight sharing with trained
centroids and, with ``max_loss``, the budget of Huffman bits searched on probes (with
``prune.keep_steps``, the pruning step chosen with it), confirmed by the full stage and
retried when over, down to shipping the pruned model unshared.

:class:`Sharing` works on a :class:`~deepzip.context.RunContext`; the pipeline runs it as
its third stage, and a test can run it alone.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from . import decide, dzip_torch, stages
from .checkpoint import ModelSpec, save_checkpoint
from .context import RunContext
from .prune import sparsity_of
from .quantize import QuantizeConfig, dequantize_
from .recipe import QuantizeStage
from .sparsity import step_path
from .train import is_main_process

__all__ = ["UNSHARED_DTYPE", "Sharing", "encoding"]

UNSHARED_DTYPE = "float16"  # the weights of a model no sharing fits the budget of
Budget = dict[str, Any]
Probe = Callable[[nn.Module], tuple[float, list[dict[str, Any]]]]


def encoding(ctx: RunContext) -> dict[str, Any]:
    """The recipe's ``encode`` settings, with unshared weights stored as float16 where
    the quantize stage found that no sharing fits the budget."""
    e = dataclasses.asdict(ctx.recipe.encode)
    unshared = (ctx.done("quantize") or {}).get("unshared")
    return {**e, "raw_dtype": unshared} if unshared else e


def _describe(q: QuantizeStage) -> str:
    return (f"[quantize] k-means weight sharing ({q.init} init, {q.bits} bits"
            + (f", conv {q.bits_conv}" if q.bits_conv else "")
            + (f", linear {q.bits_linear}" if q.bits_linear else "")
            + (f", entropy-constrained, weight {q.entropy_weight}" if q.entropy_weight else "")
            + (", penalties weighted by the Fisher sensitivity of each layer"
               if q.sensitivity == "fisher" else "")
            + (f", indices within {q.target_bits} Huffman bits per nonzero"
               if q.target_bits else "") + ")")


class Sharing:
    """The recipe's ``quantize`` section, run on the pruned model."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def __call__(self, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        c, q, e = self.ctx, self.ctx.recipe.quantize, self.ctx.recipe.encode
        t0 = time.time()
        if q is None:  # nothing to share: the pruned model at file precision (idempotent)
            dzip_torch.round_to_file_precision_(model, e.raw_dtype, e.codebook_dtype,
                                                e.fold_batchnorm)
            if not c.done("quantize"):
                c.finish("quantize", t0, skipped=True, **c.scored(model, spec))
            return model, spec
        if c.done("quantize"):
            return c.load(c.out / "quantize" / "model.pt", spec)
        qcfg = q.config(c.recipe.seed)
        c.log(_describe(q))
        if q.sensitivity == "fisher":  # before the budget search: its probes share them
            qcfg = stages.with_fisher(model, c.task, spec, qcfg,
                                      c.recipe.train_config(q.train, 1))
        if c.recipe.max_loss is None:
            shared = self.share(model, spec, qcfg)
            return self.finish(model, spec, shared, qcfg, c.score(model, spec), None, t0)
        return self.within_budget(model, spec, qcfg, t0)

    def share(self, model: nn.Module, spec: ModelSpec, qcfg: QuantizeConfig) -> stages.Shared:
        """The full stage: share, train the centroids, round to the file's precision."""
        c, q, e = self.ctx, self.ctx.recipe.quantize, self.ctx.recipe.encode
        assert q is not None
        shared = stages.share(
            model, c.task, spec, qcfg,
            qat=c.recipe.train_config({"weight_decay": 0.0, **q.qat_train}, q.qat_epochs),
            recluster_every=q.recluster_every,
            centroids=c.recipe.train_config({"weight_decay": 0.0, **q.train}, q.epochs),
            out_dir=c.out / "quantize", loss_fn=c.loss(q.distill), log=c.log,
            calibration=q.calibration)
        dzip_torch.round_to_file_precision_(model, e.raw_dtype, e.codebook_dtype,
                                            e.fold_batchnorm)
        return shared

    def within_budget(self, model: nn.Module, spec: ModelSpec, qcfg: QuantizeConfig,
                      t0: float) -> tuple[nn.Module, ModelSpec]:
        """``max_loss``: the searched budget (and step), confirmed by the full stage on
        validation data; over it, :meth:`retry` says what to run next."""
        c = self.ctx
        qcfg, budget = self.budget(model, spec, qcfg)
        # prune.keep_steps: the step chosen with the budget; else the pruned model as it is
        pruned = (self.step_model(budget["chosen_step"], spec) if "options" in budget
                  else model)
        while True:
            model = copy.deepcopy(pruned)
            shared = self.share(model, spec, qcfg)
            value, extra = c.judge(model, spec)
            if self.confirmed(budget, value, qcfg.target_bits, extra,
                              **({"step": budget["chosen_step"]} if "options" in budget
                                 else {})):
                return self.finish(model, spec, shared, qcfg, value, budget, t0)
            bits, pruned = self.retry(budget, qcfg, pruned, spec)
            if bits is None:
                return self.unshared(pruned, spec, budget, t0)
            qcfg = dataclasses.replace(qcfg, target_bits=bits)
            if is_main_process():
                shutil.rmtree(c.out / "quantize", ignore_errors=True)

    def retry(self, budget: Budget, qcfg: QuantizeConfig, pruned: nn.Module, spec: ModelSpec
              ) -> tuple[float | None, nn.Module]:
        """After a full stage over the budget: the budget (and model) to run it at once
        more, or None and the model to ship unshared. With ``keep_steps``, the next
        option (:meth:`next_option`); else once at the smallest probed budget still
        within once the miss is added (:func:`deepzip.stages.retry_budget`), then at the
        cap, then none."""
        c, cap = self.ctx, float(self.ctx.recipe.quantize.bits)
        if "options" in budget:
            option = self.next_option(budget)
            if option is None:
                return None, self.step_model(min(budget["candidates"], default=0), spec)
            budget["chosen_step"] = option.step
            c.log(f"[quantize] over budget: once more, step {option.step} at "
                  f"{option.bits:.3f} bits")
            return option.bits, self.step_model(option.step, spec)
        if qcfg.target_bits >= cap:  # over at the cap: no sharing fits the budget
            return None, pruned
        bits = stages.retry_budget(budget["probes"], budget["confirmed"][-1],
                                   budget["max_loss"], cap) \
            if len(budget["confirmed"]) == 1 else cap
        c.log(f"[quantize] over budget: once more at {bits:.3f} bits")
        return bits, pruned

    def finish(self, model: nn.Module, spec: ModelSpec, shared: stages.Shared,
               qcfg: QuantizeConfig, value: float, budget: Budget | None, t0: float
               ) -> tuple[nn.Module, ModelSpec]:
        c = self.ctx
        dequantize_(model)
        if is_main_process():
            save_checkpoint(model, spec, c.out / "quantize" / "model.pt")
        c.drop_checkpoints("quantize")
        c.finish("quantize", t0, **{c.named("score"): value},
                 **{c.named("score_kmeans"): shared.score_kmeans}, **self.shipped(model, budget),
                 layers=shared.layers, history=shared.history,
                 **({"sensitivity": qcfg.sensitivity} if qcfg.sensitivity else {}),
                 **({"budget": budget, "target_bits": qcfg.target_bits} if budget else {}))
        return model, spec

    def shipped(self, model: nn.Module, budget: Budget | None) -> dict[str, Any]:
        """What the stage records of the model it ships: its sparsity and, where the
        budget chose among the kept pruning steps, which step it is."""
        p = self.ctx.recipe.prune
        step = {"step": budget["chosen_step"]} if budget and "options" in budget else {}
        return {"sparsity": stages.sparsity(model, p.include, p.exclude), **step}

    def budget(self, model: nn.Module, spec: ModelSpec, qcfg: QuantizeConfig
               ) -> tuple[QuantizeConfig, Budget]:
        """The recipe's ``max_loss``: the sharing budget of the smallest file within it on
        validation data, searched on probes of the pruned model (which stays as it is)."""
        c, q, t = self.ctx, self.ctx.recipe.quantize, self.ctx.terms()

        def probe(pruned: nn.Module) -> tuple[float, list[dict[str, Any]]]:
            return stages.search_budget(
                pruned, c.task, spec, qcfg, baseline=t.baseline, max_loss=t.allowed,
                probe=c.recipe.train_config({"weight_decay": 0.0, **q.train}, q.probe_epochs),
                loss_fn=c.loss(q.distill), encoding=dataclasses.asdict(c.recipe.encode),
                log=c.log, margin=c.margin, calibration=q.calibration)

        def search() -> Budget:
            c.log(f"[quantize] searching the smallest file within {t.words()} of the "
                  f"baseline's validation {t.metric} {t.baseline:.4g}")
            found = {"max_loss": t.allowed, "budget": str(t.budget), "units": t.units,
                     "margin_se": t.margin_se, "baseline_val_score": t.baseline,
                     "confirmed": []}
            if c.recipe.prune.keep_steps:
                return {**found, **self.options(model, probe, spec, qcfg)}
            bits, probes = probe(model)
            return {**found, "probes": probes, "chosen": bits}

        budget = c.kept(c.out / "quantize" / "budget.json", "budget search", search)
        return dataclasses.replace(qcfg, target_bits=budget["chosen"]), budget

    def step_model(self, step: int, spec: ModelSpec) -> nn.Module:
        """The model of a kept pruning step (0: the unpruned start)."""
        return self.ctx.load(step_path(self.ctx.out, step), spec)[0] if step \
            else self.ctx.fresh()

    def options(self, model: nn.Module, probe: Probe, spec: ModelSpec, qcfg: QuantizeConfig
                ) -> dict[str, Any]:
        """``prune.keep_steps``: the budget searched on the sparsest candidate (``model``)
        and, where even its cap is over the budget, on the next candidate down; then every
        candidate step at every budget probed there (:func:`deepzip.decide.options`; the
        three candidates below the searched one are clustered for their bytes) and the
        smallest file predicted within the budget (none: the one predicted nearest it)."""
        c, t = self.ctx, self.ctx.terms()
        search = c.state["stages"]["prune"]["search"]
        top, rows = search["top_step"], list(search["steps"])
        if top == 0:
            rows.append({"step": 0, "sparsity": sparsity_of(c.fresh()), "loss": 0.0,
                         "fit": 0.0, "margin": 0.0})
        searched: dict[int, list[dict[str, Any]]] = {}  # step: its probes, in order
        while True:
            searched[top] = [{**p, "step": top} for p in probe(model)[1]]
            lower = [s for s in search["candidates"] if s < top]
            if any(p["within"] for p in searched[top]) or not lower:
                break
            c.log(f"[quantize] step {top} is over the budget at the cap: the budget is "
                  f"searched on step {lower[-1]}, the next candidate")
            top = lower[-1]
            model = self.step_model(top, spec)
        bits = sorted({p["target_bits"] for p in searched[top]})
        sizes = {}
        for k in lower[-3:]:
            c.log(f"[quantize] bytes of step {k} shared at each probed budget")
            sizes[k] = stages.shared_sizes(self.step_model(k, spec), spec, qcfg, bits,
                                           encoding(c))
        table = [o for s, found in searched.items()
                 for o in decide.options(rows, s, found, sizes if s == top else {})]
        choice = decide.choose(table, t.allowed) or min(table, key=lambda o: o.loss + o.margin)
        c.log(f"[quantize] chosen: step {choice.step} (sparsity {choice.sparsity:.4f}) at "
              f"{choice.bits:.3f} bits, {choice.bytes:,} bytes, loss "
              f"{'measured' if choice.measured else 'predicted'} {choice.loss:.3g} + "
              f"margin {choice.margin:.3g} {t.units}")
        return {"probes": [p for found in searched.values() for p in found],
                "searched_step": top, "options": decide.as_rows(table),
                "chosen": choice.bits, "chosen_step": choice.step,
                "candidates": search["candidates"]}

    @staticmethod
    def next_option(budget: Budget) -> decide.Option | None:
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

    def confirmed(self, budget: Budget, val_score: float, bits: float | None, extra: float,
                  **row: Any) -> bool:
        """Did the full stage stay within ``max_loss`` (its loss plus ``extra``, the
        margin) on validation data? The confirmation joins the budget's record."""
        c = self.ctx
        lost = stages.loss_points(c.task, budget["baseline_val_score"], val_score)
        ok = lost + extra <= budget["max_loss"]
        budget["confirmed"].append({"target_bits": bits, "val_score": val_score,
                                    "loss": lost, "margin": extra, "within": ok, **row})
        t = c.terms()
        c.log("[quantize] full stage "
              + (f"at {bits:.3f} bits" if bits is not None else "without sharing")
              + f": validation loss {lost:.3g}" + (f" + margin {extra:.3g}" if extra else "")
              + f" {t.units} (budget {t.words()})")
        return ok

    def unshared(self, pruned: nn.Module, spec: ModelSpec, budget: Budget, t0: float
                 ) -> tuple[nn.Module, ModelSpec]:
        """No sharing fits the budget, at the cap either: the pruned model ships with its
        weights unshared, stored as float16 (the recipe's ``encode`` is kept for the
        rest). Judged like a shared one; over the budget even so, the loss is the
        pruning's, and the report says so."""
        c = self.ctx
        c.log("[quantize] over the budget at the cap: storing the pruned model's weights "
              "unshared, as float16")
        e = encoding(c)
        model = copy.deepcopy(pruned)
        dzip_torch.round_to_file_precision_(model, UNSHARED_DTYPE, e["codebook_dtype"],
                                            e["fold_batchnorm"])
        value, extra = c.judge(model, spec)
        if not self.confirmed(budget, value, None, extra, raw_dtype=UNSHARED_DTYPE):
            c.log("[quantize] still over the budget without sharing: the loss is the pruning's")
        if is_main_process():
            shutil.rmtree(c.out / "quantize", ignore_errors=True)
            save_checkpoint(model, spec, c.out / "quantize" / "model.pt")
        c.finish("quantize", t0, skipped=True, unshared=UNSHARED_DTYPE,
                 **{c.named("score"): value}, **self.shipped(model, budget), budget=budget)
        return model, spec
