"""The numbers behind structured pruning (``lmc.passes.prune``): which units go, and the least-squares refit of
the weight that reads them. Pure numpy; no graph.

A *site* is one weight W [K, N] read as ``y = x W`` whose K input features come in *units* (an MLP channel:
1 feature; an attention head: head_dim features). Removing the units S keeps the rows K' = K \\ S.

Saliency of a unit u (features F_u), from G = E[x xᵀ] over the calibration activations x of the site's input:
- measured: E‖x_F W_F‖² = tr(W_Fᵀ G_FF W_F) — the energy the unit adds to the output (activation statistics ×
  weight norms; for one channel G_jj·‖W_j‖²);
- magnitude (the comparison baseline): ‖W_F‖_F · Σ_producers ‖P_F‖_F, weights only.

Compensation refits the kept rows to the calibration activations (ordinary least squares, ridge-damped):
    W'_K' = argmin E‖x W − x_K' W'‖² = (G_K'K' + λI)⁻¹ G_K'· W,    λ = DAMP · mean diag(G_K'K')
and the output error of a choice, with or without the refit, is exact from G:
    E‖x W − x_K' W'‖² = tr(Wᵀ G W) − 2 tr(W'ᵀ G_K'· W) + tr(W'ᵀ G_K'K' W'),
reported relative to E‖x W‖² (its square root). Precondition: G is symmetric positive semi-definite.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

DAMP = 1e-3


def unit_rows(units: np.ndarray | list[int], unit_size: int) -> np.ndarray:
    """The feature rows of ``units`` (each ``unit_size`` consecutive rows), in order."""
    units = np.asarray(units, dtype=np.int64)
    return (units[:, None] * unit_size + np.arange(unit_size)[None, :]).reshape(-1)


def measured_saliency(gram: np.ndarray, weight: np.ndarray, unit_size: int) -> np.ndarray:
    """tr(W_Fᵀ G_FF W_F) per unit: the output energy each unit contributes."""
    k = weight.shape[0]
    scores = np.empty(k // unit_size)
    for u in range(k // unit_size):
        rows = slice(u * unit_size, (u + 1) * unit_size)
        w = weight[rows].astype(np.float64)
        scores[u] = float(np.einsum("in,ij,jn->", w, gram[rows, rows], w))
    return scores


def magnitude_saliency(weight: np.ndarray, producers: list[np.ndarray], unit_size: int) -> np.ndarray:
    """‖W_F‖ · Σ ‖P_F‖ per unit, where each producer P holds the unit's features along its last axis."""
    k = weight.shape[0]
    w = np.sqrt((weight.astype(np.float64).reshape(k // unit_size, -1) ** 2).sum(axis=1))
    p = np.zeros_like(w)
    for prod in producers:
        cols = prod.astype(np.float64).reshape(-1, k) ** 2
        p += np.sqrt(cols.sum(axis=0).reshape(k // unit_size, unit_size).sum(axis=1))
    return w * (p if producers else 1.0)


@dataclass(frozen=True)
class Refit:
    weight: np.ndarray        # the kept rows, refitted or not [K', N]
    rel_error: float          # sqrt(E‖xW − x_K'W'‖² / E‖xW‖²) on the calibration activations
    rel_error_plain: float    # the same without the refit (W' = W_K')


def _error(gram: np.ndarray, weight: np.ndarray, rows: np.ndarray, new: np.ndarray, total: float) -> float:
    cross = float(np.einsum("kn,kn->", new, gram[rows] @ weight))
    own = float(np.einsum("kn,kn->", new, gram[np.ix_(rows, rows)] @ new))
    return float(np.sqrt(max(total - 2 * cross + own, 0.0) / max(total, 1e-30)))


def refit(gram: np.ndarray, weight: np.ndarray, keep_rows: np.ndarray, compensate: bool = True,
          damp: float = DAMP) -> Refit:
    """The kept rows of ``weight`` [K, N] (refitted by least squares when ``compensate``) and the output
    error with and without the refit, both measured with ``gram`` = E[x xᵀ] [K, K]."""
    w = weight.astype(np.float64)
    g = gram.astype(np.float64)
    total = float(np.einsum("kn,kn->", w, g @ w))
    plain = w[keep_rows]
    plain_err = _error(g, w, keep_rows, plain, total)
    if not compensate:
        return Refit(plain.astype(weight.dtype), plain_err, plain_err)
    gkk = g[np.ix_(keep_rows, keep_rows)]
    lam = damp * max(float(np.mean(np.diag(gkk))), 1e-30)
    rhs = g[keep_rows] @ w
    try:
        new = np.linalg.solve(gkk + lam * np.eye(len(keep_rows)), rhs)
    except np.linalg.LinAlgError:
        new = np.linalg.lstsq(gkk + lam * np.eye(len(keep_rows)), rhs, rcond=None)[0]
    err = _error(g, w, keep_rows, new, total)
    if err > plain_err:        # damping can only do this on a degenerate gram: never make it worse
        return Refit(plain.astype(weight.dtype), plain_err, plain_err)
    return Refit(new.astype(weight.dtype), err, plain_err)


@dataclass(frozen=True)
class Step:
    """A removable step at one site: its cost in units counted towards the fraction (channels, query heads),
    its saliency, and the units of the site it removes. A site's steps go in order (e.g. the second head of
    each group only after the first)."""

    site: int
    cost: int
    score: float
    units: tuple[int, ...]


def choose_global(steps: dict[int, list[Step]], budget: int, caps: dict[int, int]) -> list[Step]:
    """Greedy across sites: repeatedly the least salient next step of any site, while its cost fits the
    ``budget`` left and its site has given fewer than ``caps[site]`` steps."""
    heap = [(s[0].score, site, 0) for site, s in steps.items() if s and caps.get(site, 0) > 0]
    heapq.heapify(heap)
    taken: list[Step] = []
    left = budget
    while heap and left > 0:
        _, site, i = heapq.heappop(heap)
        step = steps[site][i]
        if step.cost > left:
            continue                  # this site's steps are too big for what is left
        taken.append(step)
        left -= step.cost
        if i + 1 < len(steps[site]) and i + 1 < caps[site]:
            heapq.heappush(heap, (steps[site][i + 1].score, site, i + 1))
    return taken
