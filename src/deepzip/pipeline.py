"""The whole Deep Compression pipeline as one resumable run.

baseline -> prune (+ masked retraining) -> quantize (+ centroid training) -> encode .dzip
-> evaluate the *decoded* file -> report. Each stage records its result in
``OUT/state.json`` and leaves its model on disk, so an interrupted run resumes at the stage
where it stopped (and inside a training stage, at its last epoch).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dzip
from .atomic import atomic_write
from .data import BatchLoader, Cifar10, load_cifar10
from .errors import DeepzipError
from .models import ModelSpec, load_checkpoint, load_model, save_checkpoint
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
from .quantize import QuantizeConfig, quantize_, train_centroids
from .recipe import Recipe
from .train import Distillation, TrainConfig, barrier, evaluate, is_main_process

__all__ = ["Pipeline", "run"]

STAGES = ("baseline", "prune", "quantize", "encode", "verify")


@dataclasses.dataclass
class DataSource:
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def split(self, train: bool) -> Cifar10:
        s = load_cifar10(self.data_dir, train=train, download=self.download)
        return s.subset(self.subset) if self.subset else s


class Pipeline:
    """One run of a recipe into ``out_dir``; :meth:`run` executes what is left to do."""

    def __init__(self, recipe: Recipe, out_dir: str | Path, data: DataSource,
                 log: Callable[[str], None] = print) -> None:
        self.recipe, self.out, self.data = recipe, Path(out_dir), data
        self.log = log if is_main_process() else (lambda _msg: None)
        self.state_path = self.out / "state.json"
        self.state: dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "stages": {}}
        self._train: Cifar10 | None = None
        self._test: BatchLoader | None = None
        self._teacher: nn.Module | None = None
        if self.state_path.is_file():
            self.state = self._resume_state(json.loads(self.state_path.read_text()))

    # ------------------------------------------------------------------ helpers
    def _resume_state(self, old: dict[str, Any]) -> dict[str, Any]:
        """What of an earlier run in ``out_dir`` still holds for this recipe.

        Same starting model, seed and pruning: the pruned model is kept, and if only the
        quantize or encode settings changed, those stages are redone (a cheap way to try
        other bit widths). Anything else is another run's folder: an error.
        """
        try:
            before = dataclasses.asdict(Recipe.from_dict(old["recipe"]))
        except (DeepzipError, KeyError, TypeError):
            before = {}
        now = self.state["recipe"]
        upstream = ("model", "reference", "seed", "prune")
        if not before or any(before[k] != now[k] for k in upstream):
            raise DeepzipError(f"{self.out} holds a run of a different recipe; "
                               "use another --out or --restart")
        if any(before[k] != now[k] for k in ("quantize", "encode")):
            self.log("[resume] quantize/encode settings changed: keeping the pruned model, "
                     "redoing quantize, encode and verify")
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

    def _done(self, stage: str) -> dict[str, Any] | None:
        return self.state["stages"].get(stage)

    def _finish(self, stage: str, t0: float, **result: Any) -> None:
        self.state["stages"][stage] = {**result, "seconds": time.time() - t0}
        self._save_state()

    def test_loader(self, spec: ModelSpec) -> BatchLoader:
        if self._test is None:
            self._test = BatchLoader(self.data.split(False), 500, mean=spec.mean, std=spec.std,
                                     device=self.data.device)
        return self._test

    def train_loader(self, spec: ModelSpec, cfg: TrainConfig) -> BatchLoader:
        if self._train is None:
            self._train = self.data.split(True)
        return BatchLoader(self._train, cfg.batch_size, train=True, mean=spec.mean,
                           std=spec.std, device=self.data.device, seed=cfg.seed,
                           channels_last=cfg.channels_last)

    def _loss(self, d: Any) -> Distillation | None:
        """The distillation loss against the baseline, if the stage asks for one."""
        if d is None:
            return None
        if self._teacher is None:
            self._teacher, _ = load_model(self.recipe.reference or self.recipe.model)
        return Distillation(self._teacher.to(self.data.device), d.alpha, d.temperature)

    def _acc(self, model: nn.Module, spec: ModelSpec) -> float:
        return evaluate(model.to(self.data.device), self.test_loader(spec))[1]

    def _load(self, path: Path) -> tuple[nn.Module, ModelSpec]:
        model, spec = load_checkpoint(path)
        return model.to(self.data.device), spec

    # ------------------------------------------------------------------ stages
    def baseline(self) -> tuple[nn.Module, ModelSpec]:
        """Evaluate the reference model (the starting one unless the recipe names another)."""
        r = self.recipe
        model, spec = load_model(r.model)
        model.to(self.data.device)
        if not self._done("baseline"):
            t0 = time.time()
            ref, ref_spec = (model, spec) if r.reference is None else load_model(r.reference)
            self.log(f"[baseline] evaluating {r.reference or r.model}")
            self._finish("baseline", t0, accuracy=self._acc(ref, ref_spec),
                         sparsity=sparsity_of(ref), model=r.reference or r.model)
        return model, spec

    def prune(self, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        p = self.recipe.prune
        path = self.out / "prune" / "model.pt"
        if self._done("prune"):
            return self._load(path)
        t0 = time.time()
        history: list[dict[str, Any]] = []
        if p.schedule == "iterative":
            for i, step in enumerate(p.steps, 1):
                self.log(f"[prune] step {i}/{len(p.steps)}: {step.method} {step.amount}, "
                         f"{step.epochs} epochs of masked retraining")
                prune_(model, PruneConfig(step.method, step.amount, exclude=p.exclude))
                cfg = self.recipe.train_config(p.train, step.epochs)
                history += finetune_after_prune(
                    model, self.train_loader(spec, cfg), cfg, test_loader=self.test_loader(spec),
                    out_dir=self.out / "prune" / f"step{i}", resume=True, desc=f"prune {i}",
                    loss_fn=self._loss(p.distill))
        elif p.schedule == "agp":
            history = self._agp(model, spec)
        bake_(model)
        if is_main_process():
            save_checkpoint(model, spec, path)
        self._finish("prune", t0, accuracy=self._acc(model, spec), sparsity=sparsity_of(model),
                     history=history)
        return model, spec

    def _agp(self, model: nn.Module, spec: ModelSpec) -> list[dict[str, Any]]:
        a = self.recipe.prune.agp
        assert a is not None
        per_layer = dict(a.per_layer)
        if a.sensitivity_max_drop is not None:
            scan = self.out / "prune" / "sensitivity.json"
            if scan.is_file():
                rows = json.loads(scan.read_text())["rows"]
            else:
                self.log("[prune] sensitivity scan for per-layer targets")
                rows = sensitivity(model, lambda m: self._acc(m, spec),
                                   exclude=self.recipe.prune.exclude)
                if is_main_process():
                    scan.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_write(scan, "w") as f:
                        json.dump({"rows": rows}, f)
            derived = targets_from_sensitivity(rows, a.sensitivity_max_drop)
            per_layer = {n: max(v, a.final) if n not in a.per_layer else a.per_layer[n]
                         for n, v in derived.items()}
        cfg = self.recipe.train_config(self.recipe.prune.train, a.epochs)
        loader = self.train_loader(spec, cfg)
        steps = len(loader)
        prune_(model, PruneConfig("percentile", 0.0, exclude=self.recipe.prune.exclude))
        hook = AGPSchedule(model, a.final, int(a.start_epoch * steps), int(a.end_epoch * steps),
                           initial=a.initial, frequency=a.frequency, per_layer=per_layer,
                           global_=a.global_threshold, exclude=self.recipe.prune.exclude)
        self.log(f"[prune] gradual pruning to {a.final} over epochs {a.start_epoch}-"
                 f"{a.end_epoch} of {a.epochs}" + (f", per layer {per_layer}" if per_layer else ""))
        return finetune_after_prune(model, loader, cfg, test_loader=self.test_loader(spec),
                                    out_dir=self.out / "prune" / "agp", resume=True,
                                    after_step=hook, desc="agp",
                                    loss_fn=self._loss(self.recipe.prune.distill))

    def quantize(self, model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
        q = self.recipe.quantize
        path = self.out / "quantize" / "model.pt"
        if self._done("quantize"):
            return self._load(path)
        t0 = time.time()
        if q is None:
            self._finish("quantize", t0, skipped=True)
            return model, spec
        qcfg = QuantizeConfig(bits=q.bits, bits_conv=q.bits_conv, bits_linear=q.bits_linear,
                              per_layer=q.per_layer, init=q.init, exclude=q.exclude,
                              seed=self.recipe.seed)
        self.log(f"[quantize] k-means weight sharing ({q.init} init, {q.bits} bits"
                 + (f", conv {q.bits_conv}" if q.bits_conv else "")
                 + (f", linear {q.bits_linear}" if q.bits_linear else "") + ")")
        layers = quantize_(model, qcfg)
        acc_kmeans = self._acc(model, spec)
        history: list[dict[str, Any]] = []
        if q.epochs:
            cfg = self.recipe.train_config({"weight_decay": 0.0, **q.train}, q.epochs)
            self.log(f"[quantize] centroid training, {q.epochs} epochs")
            history = train_centroids(model, self.train_loader(spec, cfg), cfg,
                                      test_loader=self.test_loader(spec),
                                      out_dir=self.out / "quantize" / "train", resume=True,
                                      desc="centroids", loss_fn=self._loss(q.distill))
        e = self.recipe.encode
        dzip.round_to_file_precision_(model, e.raw_dtype, e.codebook_dtype, e.fold_batchnorm)
        acc = self._acc(model, spec)
        from .quantize import dequantize_

        dequantize_(model)
        if is_main_process():
            save_checkpoint(model, spec, path)
        self._finish("quantize", t0, accuracy=acc, accuracy_kmeans=acc_kmeans, layers=layers,
                     history=history)
        return model, spec

    def encode(self, model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
        path = self.out / "model.dzip"
        if not self._done("encode"):
            t0 = time.time()
            e = self.recipe.encode
            if is_main_process():
                dzip.save(model, path, spec=spec, raw_dtype=e.raw_dtype,
                          codebook_dtype=e.codebook_dtype, fold_batchnorm=e.fold_batchnorm)
            barrier()
            info = dzip.inspect(path)
            self.log(f"[encode] {path}: {info['file_bytes']:,} bytes, "
                     f"{info['real_ratio']:.1f}x smaller than the fp32 state_dict")
            self._finish("encode", t0, **{k: v for k, v in info.items() if k != "tensors"},
                         tensors=info["tensors"])
        return self.state["stages"]["encode"]

    def verify(self, model: nn.Module, spec: ModelSpec) -> dict[str, Any]:
        if not self._done("verify"):
            t0 = time.time()
            decoded = dzip.load(self.out / "model.dzip", spec.build()).to(self.data.device)
            loader = self.test_loader(spec)
            model.eval()
            same, n = 0, 0
            with torch.inference_mode():
                for x, _ in loader:
                    same += int((model(x).argmax(1) == decoded(x).argmax(1)).sum())
                    n += len(x)
            acc = evaluate(decoded, loader)[1]
            self.log(f"[verify] decoded .dzip: accuracy {acc * 100:.2f}%, predictions equal "
                     f"to the in-memory model on {same}/{n} images")
            self._finish("verify", t0, accuracy=acc, same_predictions=same, images=n)
        return self.state["stages"]["verify"]

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._save_state()
        model, spec = self.baseline()
        model, spec = self.prune(model, spec)
        model, spec = self.quantize(model, spec)
        self.encode(model, spec)
        self.verify(model, spec)
        from .report import write_run_report

        if not is_main_process():
            return {"stages": self.state["stages"]}
        return write_run_report(self.out, self.recipe, self.state)


def run(recipe: Recipe, out_dir: str | Path, *, data_dir: str | None = None,
        download: bool = False, subset: int | None = None,
        device: torch.device | None = None) -> dict[str, Any]:
    """Run (or resume) ``recipe`` into ``out_dir``; return the report dict.

    >>> report = run(load_recipe("recipes/seed.yaml"), "runs/seed")  # doctest: +SKIP
    """
    from .train import default_device

    data = DataSource(data_dir, download, subset, device or default_device())
    return Pipeline(recipe, out_dir, data).run()
