"""What other budgets would cost: error-versus-size curves from the layers' spectra.

Pure functions of singular values and layer geometry, for the report and its plots.
- ``budget_curve``: one greedy sweep (every layer from the smallest rank up to break-even, the
  step that removes the most squared error per parameter first), sampled; the frontier the
  ``params:P`` policy walks along.
- ``uniform_curve``: the same layers at one uniform rank fraction, for comparison.
Errors are energy-weighted: ``sqrt(sum of dropped sigma^2 / sum ||W||^2)``; sizes are the
layers' parameters as a fraction of their original count.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from factorize_cli.geometry import Geometry
from factorize_cli.policies import tail_energy


@dataclass(frozen=True)
class CurveLayer:
    geometry: Geometry
    sigma: torch.Tensor  # all singular values


def _totals(layers: Sequence[CurveLayer]) -> tuple[list[list[float]], float, float]:
    tails = [tail_energy(layer.sigma).tolist() for layer in layers]
    energy = sum(t[0] for t in tails)
    before = sum(layer.geometry.params() for layer in layers)
    return tails, energy, before


def _point(fraction: float, dropped: float, energy: float) -> dict[str, float]:
    return {"params_fraction": round(fraction, 6),
            "error": round(math.sqrt(max(dropped, 0.0) / energy), 6) if energy else 0.0}


def budget_curve(layers: Sequence[CurveLayer], step: int = 1, points: int = 120) -> list[dict[str, float]]:
    if not layers:
        return []
    tails, energy, before = _totals(layers)
    ranks = [step] * len(layers)
    cost = sum(layer.geometry.params(step) for layer in layers)
    dropped = sum(t[min(step, len(t) - 1)] for t in tails)
    curve = [(cost, dropped)]
    heap = []

    def push(i: int) -> None:
        r, geo = ranks[i], layers[i].geometry
        if r + step <= geo.break_even_rank:
            t = tails[i]
            gain = t[min(r, len(t) - 1)] - t[min(r + step, len(t) - 1)]
            heapq.heappush(heap, (-gain / (geo.params(r + step) - geo.params(r)), i))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        geo, t, r = layers[i].geometry, tails[i], ranks[i]
        cost += geo.params(r + step) - geo.params(r)
        dropped -= t[min(r, len(t) - 1)] - t[min(r + step, len(t) - 1)]
        ranks[i] = r + step
        curve.append((cost, dropped))
        push(i)
    stride = max(1, len(curve) // points)
    sampled = curve[::stride] + ([curve[-1]] if (len(curve) - 1) % stride else [])
    return [_point(c / before, d, energy) for c, d in sampled]


def uniform_curve(layers: Sequence[CurveLayer], points: int = 40) -> list[dict[str, float]]:
    if not layers:
        return []
    tails, energy, before = _totals(layers)
    out = []
    for k in range(1, points + 1):
        f = k / points
        ranks = [min(max(1, int(f * layer.geometry.min_dim)), layer.geometry.break_even_rank) for layer in layers]
        if any(r < 1 for r in ranks):
            continue
        cost = sum(layer.geometry.params(r) for layer, r in zip(layers, ranks))
        dropped = sum(t[min(r, len(t) - 1)] for t, r in zip(tails, ranks))
        out.append(_point(cost / before, dropped, energy) | {"rank_fraction": f})
    return out


def chosen_point(layers: Sequence[CurveLayer], ranks: Sequence[int]) -> dict[str, float]:
    tails, energy, before = _totals(layers)
    cost = sum(layer.geometry.params(r) for layer, r in zip(layers, ranks))
    dropped = sum(t[min(r, len(t) - 1)] for t, r in zip(tails, ranks))
    return _point(cost / before, dropped, energy)


def sample_spectrum(sigma: torch.Tensor, marks: Sequence[int], points: int = 96) -> list[list[float]]:
    """``[[i, sigma_i], ...]`` (1-based i) at log-spaced indices plus the marked ranks."""
    k = len(sigma)
    if k == 0:
        return []
    picks = {1, k, *(m for m in marks if 1 <= m <= k), *(m + 1 for m in marks if 1 <= m < k)}
    picks |= {max(1, min(k, round(math.exp(j * math.log(k) / (points - 1))))) for j in range(points)}
    values = sigma.tolist()
    return [[i, float(f"{values[i - 1]:.6g}")] for i in sorted(picks)]
