"""Pruning that repairs what it removes: SparseGPT (Frantar & Alistarh 2023), the Optimal
Brain Surgeon (Hassibi & Stork 1993) made cheap enough for every layer of a large model.

A layer's output on calibration inputs ``X`` is kept close by choosing the mask and updating
the weights that stay: with ``H = X^T X`` (the Hessian of the layer's squared output
error), each pruned weight's error is spread over the columns not yet visited through the
inverse Hessian's Cholesky factor, column by column, 128 columns at a time; within each
block the weights whose removal costs least (``w^2 / [H^-1]_jj^2``) are chosen. Magnitude
pruning and Wanda only choose; this is why models pruned without retraining keep their
quality here.

The functional core is :func:`obs_prune` (one weight matrix and its Hessian);
:func:`hessians` gathers the Hessians from calibration data with forward hooks, a group of
layers per pass so that their memory stays under a cap (and later groups see the inputs
that the pruned earlier ones produce, as SparseGPT prunes block after block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeepzipError
from .targets import Target
from .task import model_input

__all__ = ["HESSIAN_BYTES", "hessians", "obs_assign", "obs_prune",
           "reconstructable", "refit_codebook", "with_hessians"]

HESSIAN_BYTES = 1 << 29  # the Hessians one calibration pass gathers at most (512 MiB)
BLOCK = 128  # columns whose mask is chosen together (SparseGPT's adaptive mask blocks)


def reconstructable(t: Target) -> bool:
    """Can the layer's output error be written as ``W @ x`` for a column ``x``? A Linear's
    weight, or an ungrouped 2-D convolution's (over its unfolded input patches)."""
    if t.attr != "weight" or t.also:
        return False  # a tied tensor's other uses (an embedding) have no such Hessian
    m = t.module
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the columns its weight matrix multiplies."""
    x = x.detach().float()
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class _Stop(Exception):  # noqa: N818 - control flow: the group's layers have all been seen
    pass


def _groups(targets: Sequence[Target], cap: int) -> Iterator[list[Target]]:
    """Consecutive targets (model order) whose Hessians (fp32) fit ``cap`` bytes together;
    a layer bigger than the cap is a group of its own."""
    group: list[Target] = []
    used = 0
    for t in targets:
        size = 4 * t.weight[0].numel() ** 2
        if group and used + size > cap:
            yield group
            group, used = [], 0
        group.append(t)
        used += size
    if group:
        yield group


@torch.no_grad()
def hessians(model: nn.Module, targets: Sequence[Target], calibration: Iterable[Any],
             batches: int, *, cap: int = HESSIAN_BYTES
             ) -> Iterator[tuple[list[Target], dict[str, torch.Tensor]]]:
    """For each group of ``targets`` (see ``cap``), their Hessians ``sum X^T X`` over
    ``batches`` batches of ``calibration``, by target name; the caller prunes the group
    before the next pass gathers the next one. Targets that no batch reached are left out.
    A pass stops each batch's forward once every layer of its group has run."""
    was = model.training
    model.eval()
    try:
        for group in _groups(targets, cap):
            yield group, _gather(model, group, calibration, batches)
    finally:
        model.train(was)


def with_hessians(model: nn.Module, targets: Sequence[Target], calibration: Iterable[Any],
                  batches: int, *, cap: int = HESSIAN_BYTES
                  ) -> Iterator[tuple[Target, torch.Tensor | None]]:
    """Each of ``targets`` in order with its Hessian (None where :func:`reconstructable`
    says no, or no batch reached it). A group's pass runs when its first target is asked
    for: change each target before asking for the next, and the next group's inputs are
    those the changed model computes."""
    fit = [t for t in targets if reconstructable(t)]
    passes = hessians(model, fit, calibration, batches, cap=cap)
    ready: dict[str, torch.Tensor | None] = {}
    for t in targets:
        if t in fit and t.name not in ready:
            group, sums = next(passes)
            ready.update({g.name: sums.pop(g.name, None) for g in group})
        yield t, ready.pop(t.name, None)


def _gather(model: nn.Module, group: list[Target], calibration: Iterable[Any], batches: int
            ) -> dict[str, torch.Tensor]:
    """One pass: the group's Hessians over ``batches`` batches."""
    sums: dict[str, torch.Tensor] = {}
    seen: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def record(m: nn.Module, inputs: tuple[Any, ...], _out: Any) -> None:
            cols = _columns(m, inputs[0])
            h = cols.T @ cols
            sums[name] = sums[name] + h if name in sums else h
            seen.add(name)
            if len(seen) == len(group):
                raise _Stop
        return record

    device = next(model.parameters()).device
    hooks = [t.module.register_forward_hook(hook(t.name)) for t in group]
    try:
        done = 0
        for x, *_ in calibration:
            seen.clear()
            with contextlib.suppress(_Stop):
                model(model_input(x, device))
            done += 1
            if done >= batches:
                break
        if not done:
            raise DeepzipError("the calibration data is empty")
    finally:
        for h in hooks:
            h.remove()
    return sums


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``H^-1`` after adding ``damp`` x the mean diagonal;
    the damping grows tenfold (up to 3 times) while ``H`` is not positive definite."""
    mean = float(h.diagonal().mean())
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    for _ in range(4):
        factor, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if not info:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not info:
                return upper
        damp *= 10
    raise DeepzipError("the calibration Hessian is not positive definite even damped; "
                       "use more calibration data")


def _saliency(w: torch.Tensor, d: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """OBS's cost of removing each weight of columns ``a:b``: ``w^2 / [H^-1]_jj``, written
    with the Cholesky factor's diagonal ``d`` (whose square is that entry)."""
    return (w[:, a:b] / d[a:b]) ** 2


def obs_prune(w: torch.Tensor, h: torch.Tensor, amount: float, n_m: tuple[int, int] | None
              = None, *, block: int = BLOCK, damp: float = 0.01
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight matrix ``w`` (rows x columns) with its Hessian ``h``
    (columns x columns, ``X^T X`` of the calibration inputs): (the updated weights, the
    keep-mask). ``amount`` of each block of columns is pruned (with ``n_m`` = (N, M): of
    every M consecutive weights of a row, N kept). Weights that are zero already stay
    pruned. Columns no input ever reached are pruned first and cost nothing.

    >>> layer, x = torch.nn.Linear(64, 32), torch.randn(256, 64)
    >>> new, keep = obs_prune(layer.weight, x.T @ x, 0.5)
    >>> float(keep.float().mean())
    0.5
    """
    rows, cols = w.shape
    if n_m is not None:  # groups of M never straddle two blocks
        block = max(n_m[1], block // n_m[1] * n_m[1])
    if h.shape != (cols, cols):
        raise DeepzipError(f"Hessian of shape {tuple(h.shape)} for a {rows}x{cols} weight")
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    zero = w == 0
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_factor(h, damp)
    pruned = torch.zeros_like(zero)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d = u1.diagonal()
        err = torch.zeros_like(w1)
        if n_m is None:
            score = _saliency(w1, d, 0, i2 - i1).masked_fill(zero[:, i1:i2], -1).flatten()
            mask1 = torch.zeros(score.shape, dtype=torch.bool, device=w.device)
            k = round(amount * score.numel())
            if k:
                mask1[score.topk(k, largest=False).indices] = True
            mask1 = mask1.reshape(rows, i2 - i1) | zero[:, i1:i2]
        else:
            mask1 = zero[:, i1:i2].clone()
        for i in range(i2 - i1):
            if n_m is not None and (i1 + i) % n_m[1] == 0:
                span = min(n_m[1], i2 - i1 - i)
                drop = round(span * (1 - n_m[0] / n_m[1]))
                if drop:
                    was_zero = zero[:, i1 + i:i1 + i + span]
                    score = _saliency(w1, d, i, i + span).masked_fill(was_zero, -1)
                    idx = score.topk(drop, dim=1, largest=False).indices + i
                    mask1.scatter_(1, idx, True)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0)
            e = (col - q) / d[i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    w[pruned] = 0
    return w, ~pruned


def refit_codebook(w: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor,
                   h: torch.Tensor, codebook: torch.Tensor, *, ridge: float = 1e-6,
                   rows: int = 256) -> torch.Tensor:
    """The shared values that keep a shared layer's outputs closest to the unshared
    layer's on calibration inputs: least squares over the codebook, assignments fixed.
    ``w`` (rows x columns) are the weights before sharing, ``indices`` and ``mask`` their
    clusters and nonzeros, ``h`` the inputs' ``X^T X``. Minimizes ``sum_r (c[idx_r] -
    w_r)^T H (c[idx_r] - w_r)``, a K x K linear system (``ridge`` x its mean diagonal
    pulls unused or ill-determined values toward ``codebook``); ``rows`` bounds the
    one-hot block in memory (rows x columns x K).

    >>> from deepzip.quantize import QuantizeConfig, codebooks, quantize_
    >>> net, x = torch.nn.Sequential(torch.nn.Linear(64, 32)), torch.randn(256, 64)
    >>> w = net[0].weight.detach().clone()
    >>> layers = quantize_(net, QuantizeConfig(bits=3))
    >>> cb = codebooks(net)["0"]
    >>> new = refit_codebook(w, cb.indices, cb.mask, x.T @ x, cb.codebook)
    """
    k = len(codebook)
    w, h = w.detach().float().reshape(len(w), -1), h.detach().float()
    idx = indices.reshape(len(w), -1).long()
    live = mask.reshape(len(w), -1)
    gram = torch.zeros(k, k, dtype=torch.float64, device=w.device)
    rhs = torch.zeros(k, dtype=torch.float64, device=w.device)
    for r0 in range(0, len(w), rows):
        one = F.one_hot(idx[r0:r0 + rows], k).float() * live[r0:r0 + rows, :, None]
        hone = torch.matmul(h, one)  # (r, cols, k)
        gram += torch.einsum("rik,ril->kl", one, hone).double()
        rhs += torch.einsum("rik,ri->k", hone, w[r0:r0 + rows]).double()
    damp = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(k, dtype=torch.float64, device=w.device)
    old = codebook.detach().double()
    return torch.linalg.solve(gram + damp * eye, rhs + damp * old).to(codebook.dtype)


def obs_assign(w: torch.Tensor, h: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor,
               *, cost: torch.Tensor | None = None, block: int = BLOCK, damp: float = 0.01
               ) -> torch.Tensor:
    """Each nonzero weight's cluster, chosen as GPTQ (Frantar et al. 2023) rounds: column
    by column to the nearest shared value, each column's rounding error spread over the
    columns not yet visited (through ``H^-1``), so that the layer's outputs, not its
    weights, stay close. ``cost`` (per shared value, in squared weight units: an
    entropy-constrained clustering's penalty times each value's code length) is added to
    the distance, so the indices keep their Huffman size. Pruned weights stay zero (their
    error is spread as well). Returns the indices (rows x columns, 0 where pruned).

    >>> from deepzip.quantize import QuantizeConfig, codebooks, quantize_
    >>> net, x = torch.nn.Sequential(torch.nn.Linear(64, 32)), torch.randn(256, 64)
    >>> w = net[0].weight.detach().clone()
    >>> layers = quantize_(net, QuantizeConfig(bits=3))
    >>> cb = codebooks(net)["0"]
    >>> idx = obs_assign(w, x.T @ x, cb.codebook, cb.mask)
    """
    w = w.detach().float().reshape(len(w), -1).clone()
    live = mask.reshape(len(w), -1)
    book = codebook.detach().float()
    cols = w.shape[1]
    h = h.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    u = _inverse_factor(h, damp)
    out = torch.zeros(w.shape, dtype=torch.long, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            dist = (col[:, None] - book[None, :]) ** 2
            near = (dist if cost is None else dist + cost[None, :]).argmin(1)
            q = torch.where(live[:, i1 + i], book[near], torch.zeros_like(col))
            out[:, i1 + i] = near
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return out.masked_fill(~live, 0)
