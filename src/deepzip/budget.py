"""A loss budget in the user's terms: points of accuracy, a percent of the baseline's
value, or the metric's own units; and what a validation set's noise leaves of it.

``max_loss`` is written as a number (``1``: one point for an accuracy, 1% of the
baseline's value for any other metric, since "one" of an MSE means nothing), as a
percent (``"1%"``: relative to the baseline, any metric) or with the metric's name
(``"0.002 mse"``: absolute, in that metric's units). Losses are compared in one unit,
:func:`loss` (points for an accuracy, the metric's units otherwise), so a budget is
turned into that unit once the baseline is known (:meth:`Budget.allowed`).

>>> round(Budget.parse("1%", "mse").allowed(points=False, baseline=0.027), 8)
0.00027
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import DeepzipError

__all__ = ["Budget", "Terms", "check_budget_text", "loss", "margin_estimate",
           "needed_examples"]

_TEXT = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"  # the amount
                   r"(%|points?|pts?|[A-Za-z_][\w-]*)?\s*")  # its unit, if any


@dataclass(frozen=True)
class Budget:
    """``amount`` of ``unit``: ``"points"`` (of an accuracy), ``"%"`` (of the baseline's
    value) or ``"metric"`` (the metric's own units, absolute)."""

    amount: float
    unit: str
    metric: str

    @classmethod
    def parse(cls, value: float | str, metric: str, *, points: bool | None = None) -> Budget:
        """``value`` as a recipe or ``--max-loss`` writes it, for a metric named ``metric``
        (``points``: whether it is an accuracy, counted in points; default: ``acc``)."""
        points = metric == "acc" if points is None else points
        amount, unit = _split(value)
        if unit is None:
            unit = "points" if points else "%"
        elif unit in ("point", "points", "pt", "pts"):
            if not points:
                raise DeepzipError(f"max_loss {value!r}: points are for an accuracy; the "
                                   f"metric here is {metric} (write a percent, like 1%, or "
                                   f"{metric} units, like 0.01 {metric})")
            unit = "points"
        elif unit != "%":
            if unit.lower() != metric.lower():
                raise DeepzipError(f"max_loss {value!r}: the metric here is {metric}, not "
                                   f"{unit} (write 1%, or 0.01 {metric})")
            unit = "metric"
        return cls(amount, unit, metric)

    def allowed(self, *, points: bool, baseline: float) -> float:
        """The budget in :func:`loss`'s unit: points for an accuracy, else metric units."""
        if self.unit == "%":
            scale = 100 if points else 1
            return self.amount / 100 * abs(baseline) * scale
        if self.unit == "metric" and points:
            return self.amount * 100
        return self.amount

    def __str__(self) -> str:
        if self.unit == "points":
            return f"{self.amount:g} point{'s' if self.amount != 1 else ''}"
        if self.unit == "%":
            return f"{self.amount:g}% of the baseline's {self.metric}"
        return f"{self.amount:g} {self.metric}"


def _split(value: float | str) -> tuple[float, str | None]:
    if isinstance(value, bool):
        raise DeepzipError(f"max_loss must be a number or a text like 1% or 0.01 mse, "
                           f"not {value!r}")
    if isinstance(value, (int, float)):
        amount, unit = float(value), None
    else:
        m = _TEXT.fullmatch(str(value))
        if m is None:
            raise DeepzipError(f"max_loss {str(value)[:40]!r}: write a number (1), a percent "
                               "(1%) or an amount of the metric (0.01 mse)")
        amount, unit = float(m.group(1)), m.group(2)
    if not (math.isfinite(amount) and amount >= 0):
        raise DeepzipError(f"max_loss must be >= 0 and finite, not {value!r}")
    return amount, unit


def check_budget_text(value: float | str) -> None:
    """Is ``value`` a budget's form at all (before the metric is known)?"""
    _split(value)


def loss(baseline: float, score: float, *, higher_is_better: bool, points: bool) -> float:
    """How much worse ``score`` is than ``baseline``: in points (hundredths) for an
    accuracy, in the metric's own units otherwise; negative is better."""
    worse = baseline - score if higher_is_better else score - baseline
    return worse * 100 if points else worse


# An accuracy's paired standard error before anything is measured: of the examples a
# compressed model and its baseline disagree on (either way), a fraction about half the
# baseline's error rate: 3.8% of the 5,000 held-out CIFAR-10 images on the shipped
# ResNet-20 at 92.5% (results/default, default-seed1: margins 0.52-0.57 at 2 SEs).
DISAGREEMENT_PER_ERROR = 0.5


def margin_estimate(accuracy: float, examples: int, margin_se: float) -> float:
    """The margin (``margin_se`` paired standard errors, in points) a compressed model of
    a baseline at ``accuracy`` is likely to carry on ``examples`` validation examples."""
    disagree = min(1.0, max(DISAGREEMENT_PER_ERROR * (1 - accuracy), 1 / max(1, examples)))
    return margin_se * math.sqrt(disagree / max(1, examples)) * 100


def needed_examples(accuracy: float, margin_se: float, margin: float) -> int:
    """How many validation examples bring :func:`margin_estimate` down to ``margin``."""
    disagree = max(DISAGREEMENT_PER_ERROR * (1 - accuracy), 1e-6)
    return math.ceil(disagree * (margin_se * 100 / max(margin, 1e-9)) ** 2)


@dataclass(frozen=True)
class Terms:
    """A run's budget against its baseline: what a decision may lose, in the loss's unit,
    what to call it, and what a validation set's noise leaves of it. The pipeline asks;
    nothing here trains or reads data, so a test can drive it alone.

    >>> t = Terms(Budget.parse(1, "acc"), baseline=0.925, points=True, metric="acc",
    ...           margin_se=2.0)
    >>> t.allowed
    1.0
    >>> print(t.before_training(5000))  # doctest: +ELLIPSIS
    [budget] max_loss 1 point against ... likely about 0.55 points, leaving about 0.45 ...
    """

    budget: Budget
    baseline: float
    points: bool
    metric: str
    margin_se: float

    @property
    def allowed(self) -> float:
        """``max_loss`` in the loss's unit: points for an accuracy, else metric units."""
        return self.budget.allowed(points=self.points, baseline=self.baseline)

    @property
    def units(self) -> str:
        return "points" if self.points else self.metric

    def words(self) -> str:
        """The budget as written and, where that is not already in the loss's unit, in it:
        "1 point", "1% of the baseline's mse (8.52e-05 mse)"."""
        if self.budget.unit == "points":
            return str(self.budget)
        return f"{self.budget} ({self.allowed:.4g} {self.units})"

    def noise_takes_all(self, n: int, margin: float, need: int, how: str) -> DeepzipError:
        """The one line for a budget the validation data's noise leaves nothing of."""
        return DeepzipError(
            f"max_loss {self.words()} cannot be met on {n:,} validation examples: their "
            f"noise alone ({self.margin_se:g} paired standard errors, {how} {margin:.3g} "
            f"{self.units}) takes all of it; about {need:,} examples would leave half for "
            f"the compression (--validation {need}, or validation= in Python), or lower "
            "margin_se")

    def before_training(self, n: int) -> str:
        """What a run says before any training: the budget in the metric's units and, for
        an accuracy, the margin ``n`` validation examples likely carry. Raises the one
        line when that margin takes the budget whole."""
        line = (f"[budget] max_loss {self.words()} against the baseline's validation "
                f"{self.metric} {self.baseline:.4g}")
        k = self.margin_se
        if k and self.points and n:
            est = margin_estimate(self.baseline, n, k)
            if est >= self.allowed:
                raise self.noise_takes_all(n, est, needed_examples(
                    self.baseline, k, self.allowed / 2), "likely")
            return (line + f"; on {n:,} validation examples a margin of {k:g} paired "
                    f"standard errors is likely about {est:.2f} points, leaving about "
                    f"{self.allowed - est:.2f} for the compression")
        return line + ("; the margin is measured at the first judged model" if k else "")

    def step(self, lost: float, margin: float, share: float, n: int) -> tuple[bool, float]:
        """(within, limit) for a pruning step that lost ``lost`` with ``margin``: the step
        may spend ``share`` of what its margin leaves of the budget (the margin is kept for
        the final confirmation). A step over only because its margin is larger than the
        whole budget is the data's noise, not the step: the one line, measured."""
        limit = share * (self.allowed - margin)
        ok = lost <= limit
        if not ok and margin >= self.allowed and lost <= share * self.allowed:
            raise self.noise_takes_all(n, margin, math.ceil(n * (2 * margin / self.allowed)
                                                            ** 2), "measured")
        return ok, limit
