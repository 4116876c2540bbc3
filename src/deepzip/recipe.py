"""Pipeline recipes: YAML files validated into dataclasses before any work starts.

What each key means is said once, in :data:`HELP` (by its dotted name, ``prune.agp.final``),
which the README's recipe reference is generated from (``python -m deepzip.recipe``) and a
test holds to the dataclasses: the fields below carry no comments of their own."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .atomic import read_limited
from .budget import check_budget_text
from .checks import brief, build
from .codecs import BOOK_DTYPES, RAW_DTYPES
from .errors import DeepzipError
from .prune import PruneConfig
from .quantize import QuantizeConfig
from .train import TrainConfig

__all__ = ["AGPStage", "EncodeStage", "PruneStep", "QuantizeStage", "Recipe", "load_recipe",
           "recipe_path", "shipped_recipes"]


@dataclass
class PruneStep:
    """One step of iterative pruning: prune to ``amount`` (or an ``n_m`` pattern, "2:4"),
    then retrain ``epochs`` (0: one shot, as ``wanda`` and ``sparsegpt`` are made for)."""

    method: str = "percentile"
    amount: float = 0.5
    epochs: int = 10
    n_m: str | None = None
    allocate: str = "layer"

    def config(self, include: list[str] | None, exclude: list[str]) -> PruneConfig:
        """The library's :class:`~deepzip.prune.PruneConfig` for this step (it validates)."""
        return PruneConfig(self.method, self.amount, include=include, exclude=exclude,
                           n_m=self.n_m, allocate=self.allocate)


BUDGET_PROBES = 7  # a max_loss search of the sharing budget: the cap and six halvings


@dataclass
class AGPStage:
    """Gradual pruning during ``epochs`` of training (Zhu & Gupta): sparsity ramps from
    ``initial`` to ``final`` (or ``per_layer``) between ``start_epoch`` and ``end_epoch``."""

    final: float = 0.8
    initial: float = 0.0
    epochs: int = 30
    start_epoch: float = 0.0
    end_epoch: float = 20.0
    frequency: int = 50
    global_threshold: bool = False
    kernel_exponent: float = 0.0
    per_layer: dict[str, float] = field(default_factory=dict)
    sensitivity_max_drop: float | None = None
    search_from: float | None = None
    probe_epochs: int = 4
    search_steps: int = 3


@dataclass
class Distill:
    """Retrain against the uncompressed model's soft outputs (knowledge distillation)."""

    alpha: float = 0.5
    temperature: float = 4.0


@dataclass
class PruneStage:
    schedule: str = "iterative"
    steps: list[PruneStep] = field(default_factory=list)
    agp: AGPStage | None = None
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)
    distill: Distill | None = None
    stop_over_budget: bool = False
    loss_share: float = 0.5
    keep_steps: bool = False
    calibration: int = 1024  # training examples that wanda and sparsegpt steps read

    @property
    def reads_budget(self) -> bool:
        """Whether the pruning reads ``max_loss`` (a changed budget must redo it)."""
        return self.stop_over_budget or self.keep_steps or (
            self.schedule == "agp" and self.agp is not None and self.agp.search_from is not None)


@dataclass
class QuantizeStage:
    bits: int = 5
    bits_conv: int | None = None
    bits_linear: int | None = None
    per_layer: dict[str, int] = field(default_factory=dict)
    init: str = "linear"
    entropy_weight: float = 0.0
    sensitivity: str | None = None
    target_bits: float | None = None
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    qat_epochs: int = 0
    qat_train: dict[str, Any] = field(default_factory=dict)
    recluster_every: int = 50
    probe_epochs: int = 1
    epochs: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    distill: Distill | None = None
    calibration: int = 0  # > 0: clusters chosen for each layer's outputs on this many

    def config(self, seed: int) -> QuantizeConfig:
        """The library's :class:`~deepzip.quantize.QuantizeConfig` for this stage: every
        field the two share, by name (it validates), but ``sensitivity``, a method here
        and measured values there (measured when the stage runs)."""
        shared = {f.name for f in dataclasses.fields(QuantizeConfig)} & {
            f.name for f in dataclasses.fields(self)} - {"sensitivity"}
        return QuantizeConfig(seed=seed, **{k: copy.copy(getattr(self, k)) for k in shared})


@dataclass
class EncodeStage:
    raw_dtype: str = "float16"
    codebook_dtype: str = "float32"
    fold_batchnorm: bool = True


@dataclass
class Recipe:
    """A whole compression run. See ``recipes/*.yaml``."""

    name: str = "default"
    description: str = ""
    model: str = "resnet20"
    reference: str | None = None
    arch: str | None = None
    normalize: str | None = None
    task: str = "cifar10"
    validation: int = 0
    validation_from: str = "train"
    max_loss: float | str | None = None
    margin_se: float = 0.0
    seed: int = 0
    eval_every: int = 1
    prune: PruneStage = field(default_factory=PruneStage)
    quantize: QuantizeStage | None = field(default_factory=QuantizeStage)
    encode: EncodeStage = field(default_factory=EncodeStage)

    def validate(self) -> None:
        p, q = self.prune, self.quantize
        problems = [f"{where} contains a NUL byte" for where in _nul_strings(
            dataclasses.asdict(self), "recipe")]
        if problems:  # nothing else can be said safely about such names
            raise DeepzipError(f"recipe: {problems[0]}")
        if not _NAME.fullmatch(self.name) or self.name in (".", ".."):
            problems.append(f"name {brief(self.name)} must be a plain folder name (1-100 "
                            "letters, digits, '-', '_', '.'; not '.' or '..'): it names the "
                            "run folder runs/NAME")
        if p.schedule not in ("iterative", "agp", "none"):
            problems.append(f"prune.schedule must be iterative, agp or none, not {p.schedule!r}")
        if p.schedule == "iterative" and not p.steps:
            problems.append("prune.schedule iterative needs prune.steps")
        if p.schedule == "agp" and p.agp is None:
            problems.append("prune.schedule agp needs a prune.agp section")
        for i, step in enumerate(p.steps):
            if step.epochs < 0:
                problems.append(f"prune.steps[{i}].epochs must be >= 0")
            problems += _invalid(f"prune.steps[{i}]", lambda step=step: step.config(
                p.include, p.exclude))
        if not (type(p.calibration) is int and p.calibration >= 1):
            problems.append("prune.calibration must be a count of examples >= 1")
        if p.agp is not None:
            problems += _agp_problems(p.agp, searched=self.max_loss is not None)
        if p.stop_over_budget and not (p.schedule == "iterative" and self.max_loss is not None):
            problems.append("prune.stop_over_budget needs the iterative schedule and max_loss")
        if p.keep_steps and not (p.schedule == "iterative" and self.max_loss is not None
                                 and not p.stop_over_budget and self.quantize is not None):
            problems.append("prune.keep_steps needs the iterative schedule, max_loss and a "
                            "quantize stage, without stop_over_budget")
        if not (isinstance(p.stop_over_budget, bool) and 0 < p.loss_share <= 1):
            problems.append("prune needs stop_over_budget true or false and "
                            "0 < loss_share <= 1")
        for d in (p.distill, q.distill if q else None):
            if d is not None and (not 0 <= d.alpha <= 1 or d.temperature <= 0):
                problems.append("distill needs 0 <= alpha <= 1 and temperature > 0")
        if q is not None:
            problems += _invalid("quantize", lambda: q.config(self.seed))
            problems += _quantize_problems(q)
        for key, allowed in (("raw_dtype", RAW_DTYPES), ("codebook_dtype", BOOK_DTYPES)):
            v = getattr(self.encode, key)
            if not isinstance(v, str) or v not in allowed:
                problems.append(f"encode.{key} must be one of {', '.join(allowed)}, not "
                                f"{brief(v)}")
        problems += self._budget_problems()
        if self.validation_from not in ("train", "test"):
            problems.append(f"validation_from must be train or test, got "
                            f"{brief(self.validation_from)}")
        if not 0 <= self.validation <= 10_000_000:
            problems.append(f"validation must be a count of examples >= 0, got "
                            f"{brief(self.validation)}")
        if not 0 <= self.seed < 2 ** 63:
            problems.append(f"seed must be in 0..2^63-1, got {brief(self.seed)}")
        if problems:
            raise DeepzipError(f"recipe {brief(self.name)}: " + "; ".join(problems))
        for section in (p.train, q.train if q else {}, q.qat_train if q else {}):
            self.train_config(section, epochs=1)  # unknown or bad training keys fail now

    def with_overrides(self, **overrides: Any) -> Recipe:
        """A copy with ``overrides`` applied: any recipe key (``validation=1000``,
        ``max_loss="1%"``), a section's keys merged into it (``prune={"loss_share": 0.6}``,
        ``quantize={"epochs": 8}``), checked as a recipe file's keys are.

        >>> load_recipe("recipes/default.yaml").with_overrides(validation=2000)  # doctest: +SKIP
        """
        data = dataclasses.asdict(self)
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        recipe = Recipe.from_dict(data)
        recipe.validate()
        return recipe

    def _budget_problems(self) -> list[str]:
        """What is wrong with ``max_loss`` and ``margin_se``, and what they need."""
        q, problems = self.quantize, []
        if self.max_loss is not None:
            problems += _invalid("max_loss", lambda: check_budget_text(self.max_loss))
            if not (q is not None and q.entropy_weight > 0 and q.target_bits is None):
                problems.append("max_loss needs a quantize section with entropy_weight > 0 "
                                "and no target_bits (it chooses them)")
        if not (math.isfinite(self.margin_se) and self.margin_se >= 0) or (
                self.margin_se and self.max_loss is None):
            problems.append("margin_se must be a number >= 0, and needs max_loss")
        return problems

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """A recipe from its ``asdict`` form; keys added since it was written take defaults."""
        return build(cls, data, "recipe")

    def entry_points(self) -> dict[str, str]:
        """The keys that name Python code to import and call (``package.module:name``)."""
        return {k: v for k in ("task", "arch") if ":" in (v := getattr(self, k) or "")}

    def check_code(self, allowed: bool, *, where: Any = "the recipe",
                   given: Any = ()) -> None:
        """A recipe file runs code only with the user's consent (``--allow-code``, in the
        spirit of ``trust_remote_code``): stop before anything runs if it names entry
        points, except those the user gave on the command line (``given``)."""
        code = {k: v for k, v in self.entry_points().items() if k not in given}
        if code and not allowed:
            raise DeepzipError(
                f"recipe {where} names Python code to run ("
                + ", ".join(f"{k}: {v}" for k, v in code.items())
                + "); pass --allow-code (allow_code=True) if you trust it")

    def planned_epochs(self) -> dict[str, int]:
        """The epochs of training each stage plans, searches' probes included (a stage
        may stop early or retry): what a run's progress lines count down."""
        p, q = self.prune, self.quantize
        prune = sum(s.epochs for s in p.steps) if p.schedule == "iterative" else 0
        if p.schedule == "agp" and p.agp is not None:
            probes = p.agp.search_steps + 2 if p.agp.search_from is not None else 0
            prune = p.agp.epochs + probes * p.agp.probe_epochs
        quantize = 0
        if q is not None:
            probes = BUDGET_PROBES if self.max_loss is not None else 0
            quantize = q.qat_epochs + q.epochs + probes * q.probe_epochs
        return {"prune": prune, "quantize": quantize}

    def train_config(self, overrides: dict[str, Any], epochs: int) -> TrainConfig:
        return TrainConfig.from_dict({"seed": self.seed, "eval_every": self.eval_every,
                                      **overrides, "epochs": epochs})


_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _invalid(where: str, build: Any) -> list[str]:
    """The problem a library config finds with a recipe section, as one message: the
    values are checked in one place, the config's own ``__post_init__``."""
    try:
        build()
    except DeepzipError as e:
        return [f"{where}: {e}"]
    return []


def _agp_problems(a: AGPStage, *, searched: bool) -> list[str]:
    """What is wrong with a ``prune.agp`` section (``searched``: the recipe has a
    ``max_loss`` for ``search_from`` to read)."""
    problems = [f"prune.agp sparsities must be in [0, 1), got {v}"
                for v in [a.final, a.initial, *a.per_layer.values()] if not 0 <= v < 1]
    if not 0 <= a.start_epoch <= a.end_epoch <= a.epochs:
        problems.append("prune.agp needs 0 <= start_epoch <= end_epoch <= epochs")
    if a.frequency < 1:
        problems.append("prune.agp.frequency must be >= 1")
    if a.global_threshold and (a.per_layer or a.sensitivity_max_drop is not None):
        problems.append("prune.agp.global_threshold excludes per-layer targets")
    if not (math.isfinite(a.kernel_exponent) and 0 <= a.kernel_exponent <= 100):
        problems.append("prune.agp.kernel_exponent must be in [0, 100]")
    if a.sensitivity_max_drop is not None and not a.sensitivity_max_drop >= 0:
        problems.append("prune.agp.sensitivity_max_drop must be >= 0")
    if a.search_from is not None and not (searched and 0 <= a.search_from < a.final):
        problems.append("prune.agp.search_from needs max_loss and must be in [0, final)")
    if not (a.probe_epochs >= 1 and a.search_steps >= 0):
        problems.append("prune.agp needs probe_epochs >= 1 and search_steps >= 0")
    return problems


def _quantize_problems(q: QuantizeStage) -> list[str]:
    """What is wrong with a ``quantize`` section beyond its QuantizeConfig's own checks."""
    problems = []
    if q.epochs < 0 or q.qat_epochs < 0:
        problems.append("quantize.epochs and quantize.qat_epochs must be >= 0")
    if q.recluster_every < 1:
        problems.append("quantize.recluster_every must be >= 1")
    if q.sensitivity not in (None, "fisher"):
        problems.append(f"quantize.sensitivity must be fisher or null, not "
                        f"{brief(q.sensitivity)}")
    if not (type(q.calibration) is int and q.calibration >= 0):
        problems.append("quantize.calibration must be a count of examples >= 0")
    elif q.calibration and q.qat_epochs:
        problems.append("quantize.calibration chooses clusters without training: not with "
                        "qat_epochs")
    if q.probe_epochs < 0:
        problems.append("quantize.probe_epochs must be >= 0")
    return problems


def _nul_strings(v: Any, where: str) -> Iterator[str]:
    """Where in a nested recipe mapping a string (key or value) holds a NUL byte."""
    if isinstance(v, str) and "\0" in v:
        yield where
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _nul_strings(k, where)
            yield from _nul_strings(x, f"{where}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _nul_strings(x, f"{where}[{i}]")


def shipped_recipes() -> list[str]:
    """The names of the recipes that ship inside the package."""
    from importlib import resources

    return sorted(p.name.removesuffix(".yaml") for p in
                  (resources.files("deepzip") / "recipes").iterdir() if p.name.endswith(".yaml"))


def recipe_path(name: str | os.PathLike[str] | None) -> str:
    """A recipe file, or the name of one shipped with deepzip (default, seed, ...)."""
    from importlib import resources

    name = "default" if name is None else str(name)
    if os.path.exists(name):
        return name
    ref = resources.files("deepzip") / "recipes" / f"{name}.yaml"
    if ref.is_file():
        return str(ref)
    raise DeepzipError(f"no recipe file {name!r}; shipped recipes: "
                       f"{', '.join(shipped_recipes())}")


MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32


def _yaml_loader() -> type:
    """PyYAML's safe loader without aliases (no billion-laughs expansion) and with a
    nesting limit: a recipe is a small tree of plain values."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent) or getattr(
                    self.peek_event(), "anchor", None):
                raise DeepzipError("recipes may not use YAML anchors or aliases (& and *)")
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                if self._depth > MAX_DEPTH:
                    raise DeepzipError(f"recipe nests deeper than {MAX_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return RecipeLoader


def load_recipe(path: str | os.PathLike[str] | None) -> Recipe:
    """Read and validate a recipe file; ``None`` gives the built-in defaults.

    The file is read with a size limit, parsed without YAML aliases and nested at most
    32 levels, and every value is checked against its declared type (finite numbers,
    bounded integers) before anything runs.
    """
    if path is None:
        recipe = Recipe(prune=PruneStage(steps=[PruneStep()]))
    else:
        import yaml

        try:
            raw = read_limited(path, MAX_RECIPE_BYTES, "recipe")
            data = yaml.load(raw.decode("utf-8"), Loader=_yaml_loader())  # noqa: S506
        except OSError as e:
            raise DeepzipError(f"cannot read recipe {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise DeepzipError(f"recipe {path} is not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise DeepzipError(f"recipe {path} is not valid YAML: "
                               f"{str(e).splitlines()[0]}") from None
        except RecursionError:
            raise DeepzipError(f"recipe {path} nests too deeply") from None
        except (ValueError, OverflowError) as e:  # e.g. a 5,000-digit number
            raise DeepzipError(f"recipe {path}: a value cannot be read "
                               f"({str(e).splitlines()[0][:80]})") from None
        recipe = Recipe.from_dict(data if data is not None else {})
    recipe.validate()
    return recipe


# What each recipe key means, by its dotted path: the reference (README's recipe section,
# ``python -m deepzip.recipe``) is generated from the dataclasses and these lines, and a
# test checks that every key has one.
HELP = {
    "name": "the run's name: a plain folder name; the run goes to runs/NAME unless --out",
    "description": "what the recipe does, copied into every run's report",
    "model": "where compression starts: a checkpoint, a .dzip file or a shipped model's name",
    "reference": "what the loss is measured against and distillation imitates (default: model)",
    "arch": "architecture of a checkpoint without deepzip metadata: a registered name, or "
            "package.module:Factory (needs --allow-code)",
    "normalize": "the input normalization the weights were trained with: cifar, imagenet, "
                 "mnist or M,.../S,...",
    "task": "cifar10, mnist, or package.module:function returning a Task (needs --allow-code)",
    "validation": "examples held out as validation data (shipped tasks and tasks of "
                  "DataLoaders over sized datasets; other tasks pass val=): every decision "
                  "of the run (training-time evaluations, sensitivity scans, max_loss) reads "
                  "them, and the test set is read only by the final evaluation; 0: none, "
                  "decisions read the test set",
    "validation_from": "where validation holds its examples out of: train (unseen only by "
                       "a model trained without them: deepzip train --validation N) or "
                       "test (for a model that saw every training example, as published "
                       "ones did: decisions read that part of the test set, the report "
                       "the rest)",
    "max_loss": "the budget: the smallest file whose loss against the baseline on "
                "validation data stays within this. A number is points for an accuracy and "
                "a percent of the baseline's value for any other metric (1: one point, or "
                "1%); 1% is relative for any metric; 0.01 mse is absolute, in the metric's "
                "units. It chooses the sharing budget (and the sparsity where the pruning "
                "reads it); a budget the validation data's noise leaves nothing of is "
                "refused before training; needs validation data",
    "margin_se": "max_loss: each measured loss counts this many of its standard errors "
                 "more (paired over the validation examples; accuracy, MSE, MAE), so a pass "
                 "means the loss is likely within max_loss, not only measured within it",
    "seed": "data order, augmentation and k-means seed",
    "eval_every": "test-set evaluations while training: every N epochs and the last (0: none)",
    "prune": "the pruning stage",
    "prune.schedule": "iterative (prune, retrain, repeat), agp (gradual, during training) "
                      "or none",
    "prune.steps": "iterative: the steps, in order",
    "prune.steps.method": "percentile (q of each layer), std (|w| < s x std), global "
                          "(one threshold, this fraction of all weights), wanda (|w| x "
                          "input norm, per row) or sparsegpt (per layer, the weights that "
                          "stay updated to keep its outputs); the last two read "
                          "prune.calibration training examples",
    "prune.steps.amount": "q, s or the global sparsity; percentiles are total sparsity",
    "prune.steps.epochs": "masked retraining after this step (0: one shot)",
    "prune.steps.n_m": "N:M (2:4): of every M consecutive weights of a row, N kept "
                       "(percentile, wanda, sparsegpt)",
    "prune.steps.allocate": "wanda, sparsegpt: layer (amount in every layer) or global "
                            "(each layer as much as one magnitude threshold would prune)",
    "prune.calibration": "training examples that wanda and sparsegpt steps read",
    "prune.agp": "agp: gradual pruning (Zhu & Gupta 2017)",
    "prune.agp.final": "sparsity reached at end_epoch",
    "prune.agp.initial": "sparsity at start_epoch",
    "prune.agp.epochs": "training epochs in all",
    "prune.agp.start_epoch": "when the cubic ramp starts",
    "prune.agp.end_epoch": "when it reaches final (the rest retrains at that sparsity)",
    "prune.agp.frequency": "optimizer steps between mask updates",
    "prune.agp.global_threshold": "one magnitude threshold across layers instead of one "
                                  "per layer",
    "prune.agp.kernel_exponent": "> 0: prune weights of weak kernels first (cheaper "
                                 "positions, some accuracy)",
    "prune.agp.per_layer": "name pattern -> final sparsity of matching layers",
    "prune.agp.search_from": "with max_loss: choose the final sparsity, the highest in "
                             "[search_from, final] whose probe stays within prune.loss_share "
                             "of max_loss on validation data (final is tried first); the "
                             "sharing search then spends what is left",
    "prune.agp.probe_epochs": "each probe of the sparsity search: a copy of the model "
                              "pruned by the schedule shrunk to this many epochs",
    "prune.agp.search_steps": "halvings of the sparsity interval after its two ends",
    "prune.agp.sensitivity_max_drop": "derive per-layer targets from a sensitivity scan: "
                                      "the most each layer may cost alone",
    "prune.include": "name patterns of the parameters to prune (default: Conv, Linear, "
                     "Embedding, attention and RNN weights)",
    "prune.exclude": "name patterns to leave unpruned",
    "prune.train": "training settings (deepzip.TrainConfig fields: lr, batch_size, "
                   "weight_decay, schedule, ...)",
    "prune.distill": "retrain against the reference's soft outputs",
    "prune.distill.alpha": "weight of the distillation term",
    "prune.distill.temperature": "softmax temperature of both models",
    "prune.stop_over_budget": "iterative, with max_loss: score each step's model on "
                              "validation data; the first over loss_share of max_loss is "
                              "undone and the pruning stops with the step before it",
    "prune.keep_steps": "iterative, with max_loss: prune through every step, score and "
                        "keep each step's model (a 0-epoch step before a retrained one is "
                        "a waypoint, not kept); the quantize stage chooses the step and "
                        "the sharing budget together (the smallest file within max_loss, "
                        "its margin paid once, on that file)",
    "prune.loss_share": "the part of max_loss the pruning may spend (stop_over_budget, "
                        "agp.search_from); with margin_se, of what each model's margin "
                        "leaves of it",
    "quantize": "the weight-sharing stage (null: none)",
    "quantize.bits": "cluster bits per layer (at most 2^bits shared values; a cap when "
                     "entropy-constrained)",
    "quantize.bits_conv": "bits for convolutions instead",
    "quantize.bits_linear": "bits for Linear layers instead",
    "quantize.per_layer": "name pattern -> bits",
    "quantize.init": "k-means initialization: linear, kmeans++, random, density or optimal",
    "quantize.entropy_weight": "> 0: entropy-constrained clustering; a bit of code length is "
                               "worth this times the layer's k-means error",
    "quantize.sensitivity": "fisher: weigh each layer's error by its Fisher sensitivity",
    "quantize.target_bits": "at most this many Huffman bits per nonzero's index (a size "
                            "budget; needs entropy_weight)",
    "quantize.include": "name patterns of the parameters to share",
    "quantize.exclude": "name patterns to leave unshared",
    "quantize.qat_epochs": "quantization-aware training of the weights before sharing is "
                           "fixed",
    "quantize.qat_train": "its training settings (TrainConfig fields)",
    "quantize.recluster_every": "optimizer steps between re-clusterings during it",
    "quantize.probe_epochs": "max_loss: centroid training of each probe of the search",
    "quantize.epochs": "centroid training (trained quantization) after sharing",
    "quantize.calibration": "> 0: choose each layer's clusters for its outputs on this "
                            "many training examples (GPTQ's rounding, shared values "
                            "refitted by least squares): sharing without retraining",
    "quantize.train": "its training settings (TrainConfig fields)",
    "quantize.distill": "distillation for both kinds of training",
    "quantize.distill.alpha": "weight of the distillation term",
    "quantize.distill.temperature": "softmax temperature of both models",
    "encode": "how the .dzip file stores what is not shared",
    "encode.raw_dtype": "unshared tensors (BatchNorm, biases, excluded weights): float16, "
                        "float32 or int2..int8 (an N-bit grid, float16 where too coarse)",
    "encode.codebook_dtype": "codebooks: float16, float32 or int2..int8",
    "encode.fold_batchnorm": "fold BatchNorm into a scale and a shift (4 -> 2 values per "
                             "channel)",
}


def _type_name(tp: Any) -> str:
    """A recipe value's type in words: text, integer, number, true/false, a list or map of
    them, a section (a nested mapping), each ``or null`` where null is allowed."""
    args = typing.get_args(tp)
    if type(tp) is types.UnionType or typing.get_origin(tp) is typing.Union:
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(args[0]).replace('section', 'sections')}"
    if origin is dict:
        return f"map of {_type_name(args[1])}" if args[1] is not Any else "map"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {str: "text", int: "integer", float: "number", bool: "true/false"}.get(tp, str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
        if dataclasses.is_dataclass(v):
            return "(see below)"
    else:
        return ""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    return f"`{v}`" if v != "" else '`""`'


def reference() -> str:
    """The recipe reference as a Markdown table: every key, its type, default and meaning,
    from the dataclasses themselves (so it cannot drift from what is validated)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    sections = {"": Recipe, "prune": PruneStage, "prune.steps": PruneStep,
                "prune.agp": AGPStage, "prune.distill": Distill, "quantize": QuantizeStage,
                "quantize.distill": Distill, "encode": EncodeStage}
    hints = {cls: typing.get_type_hints(cls) for cls in sections.values()}
    for prefix, cls in sections.items():
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            meaning = HELP[key].replace("|", "\\|")
            rows.append(f"| `{key}` | {_type_name(hints[cls][f.name])} | {_default(f)} | "
                        f"{meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m deepzip.recipe: the reference, for the README
    print(reference())
