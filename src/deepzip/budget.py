"""A loss budget in the user's terms: points of accuracy, a percent of the baseline's
value, or the metric's own units; and what a validation set's noise leaves of it.

``max_loss`` is written as a number (``1``: one point for an accuracy, 1% of the
baseline's value for any other metric, since "one" of an MSE means nothing), as a
percent (``"1%"``: relative to the baseline, any metric) or with the metric's name
(``"0.002 mse"``: absolute, in that metric's units). Losses are compared in one unit,
:func:`loss` (points for an accuracy, the metric's units otherwise), so a budget is
turned into that unit once the baseline is known (:meth:`Budget.allowed`).

>>> Budget.parse("1%", "mse").allowed(points=False, baseline=0.027)  # doctest: +SKIP
0.00027
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import DeepzipError

__all__ = ["Budget", "check_budget_text", "loss", "margin_estimate", "needed_examples"]

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
