"""Choosing the sparsity and the sharing budget together, from every measurement a run has.

A run with ``prune.keep_steps`` prunes through all its steps and keeps each step's model;
its margin (``margin_se`` paired standard errors) is paid once, on the file that ships,
not on every intermediate model. Pure functions on measurements (nothing here trains or
reads data), so a test can drive the policy alone:

1. :func:`monotone` smooths the steps' losses against sparsity (more pruning does not
   help on average; one step scored lucky or unlucky on the validation examples should
   not decide alone).
2. :func:`candidates`: the steps whose smoothed loss plus margin fits the budget.
3. The sharing budget is searched on the sparsest candidate (its probes measure what
   sharing costs there, in loss, margin and bytes); where even the cap is over, on the
   next candidate down. :func:`options` pairs every candidate
   with every probed budget: its bytes measured (clustering only), its loss its smoothed
   loss plus what sharing cost the sparsest at as many bits per index or fewer (smoothed:
   fewer bits never cost less), its margin that probe's.
4. :func:`choose`: the smallest file predicted within the budget. When the full stage
   misses, the miss (its loss plus margin over the prediction) is added to every
   prediction and the next is chosen.

>>> monotone([-0.2, 0.3, 0.1, 0.6])
[-0.2, 0.2, 0.2, 0.6]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Option", "as_rows", "candidates", "choose", "from_rows", "monotone", "options"]


def monotone(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence nearest ``values`` in least squares (pool adjacent
    violators): each run of steps that breaks the order gets its mean."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    return [round(s / n, 12) for s, n in blocks for _ in range(int(n))]


def candidates(rows: Sequence[dict[str, Any]], allowed: float) -> list[int]:
    """The steps (their ``step`` numbers) whose smoothed loss (``fit``) plus ``margin``
    is within ``allowed``: the pruning alone leaves room for the file's own margin."""
    return [r["step"] for r in rows if r["fit"] + r["margin"] <= allowed]


@dataclass(frozen=True)
class Option:
    """One way to ship: the model of pruning step ``step`` shared at ``bits`` Huffman bits
    per nonzero's index, ``bytes`` on disk; ``loss`` from its own probe (``measured``,
    smoothed) or predicted from another step's, ``margin`` its noise allowance."""

    step: int
    sparsity: float
    bits: float
    bytes: int
    loss: float
    margin: float
    measured: bool

    def within(self, allowed: float, excess: float = 0.0) -> bool:
        return self.loss + self.margin + excess <= allowed


def options(steps: Sequence[dict[str, Any]], top: int, probes: Sequence[dict[str, Any]],
            sizes: dict[int, dict[float, tuple[int, float]]]) -> list[Option]:
    """Every candidate step paired with every probed budget. ``steps``: the pruning's
    rows (``step``, ``sparsity``, ``loss``, ``fit``); ``top``: the step the budget was
    searched on; ``probes``: that search's rows (``target_bits``, ``loss``, ``margin``,
    ``file_bytes``, ``index_bits``: the bits per nonzero index it reached);
    ``sizes[step][bits]``: another step's (bytes, index bits) shared at that budget.

    What sharing costs depends on the bits an index gets, not on the budget asked (a
    budget above what a model's clustering needs does not bind), so it is read against
    the bits reached: smoothed so that fewer bits never cost less, and for another step
    the cost (and margin) of the searched step's probe with the most bits at or below that
    step's own (fewer bits cost no less: the prediction errs on the safe side); a step
    clustered to fewer bits than any probe reached gets no prediction at that budget."""
    rows = {r["step"]: r for r in steps}
    base = rows[top]
    probes = sorted(probes, key=lambda p: (-p["index_bits"], -p["target_bits"]))
    cost = monotone([p["loss"] - base["loss"] for p in probes])
    out = [Option(top, base["sparsity"], p["target_bits"], p["file_bytes"], base["fit"] + c,
                  p["margin"], True) for p, c in zip(probes, cost, strict=True)]
    for step, at in sizes.items():
        r = rows[step]
        for bits, (size, reached) in at.items():
            near = [(p, c) for p, c in zip(probes, cost, strict=True)
                    if p["index_bits"] <= reached + 1e-9]
            if near:
                p, c = near[0]  # the most bits at or below the step's own
                out.append(Option(step, r["sparsity"], bits, size, r["fit"] + c, p["margin"],
                                  False))
    return out


def choose(table: Sequence[Option], allowed: float, *, excess: float = 0.0,
           tried: Sequence[tuple[int, float]] = ()) -> Option | None:
    """The smallest file within ``allowed`` once ``excess`` (what full stages missed
    their predictions by) is added, among the options not ``tried`` yet; None if none."""
    fits = [o for o in table if (o.step, o.bits) not in tried and o.within(allowed, excess)]
    return min(fits, key=lambda o: (o.bytes, -o.bits), default=None)


def as_rows(table: Sequence[Option]) -> list[dict[str, Any]]:
    """The options as JSON rows, smallest file first (the report's table)."""
    return [asdict(o) for o in sorted(table, key=lambda o: o.bytes)]


def from_rows(rows: Sequence[dict[str, Any]]) -> list[Option]:
    return [Option(**r) for r in rows]
