"""Error-compensating factorization: the closed form of reduced-rank regression, as pure functions.

A layer ``y = W x`` (``W`` is ``out x fan_in``) sees the input rows ``X`` (``N x fan_in``, as
:func:`factorize_cli.calibration.input_rows` makes them) in the original model, and ``X'`` once the
layers before it are factorized. Its best rank-``r`` replacement minimises ``||X W^T - X' M^T||_F``:
the layer's new outputs stay close to the original model's, not just to what the layer would compute
on today's inputs, so each layer makes up for the error of the ones before it.

With ``S' = X'^T X'`` and the cross-moment ``C = X^T X'`` (``fan_in x fan_in`` each):

- the unconstrained least-squares solution is ``M* = W C S'^-1``; its residual is orthogonal to the
  column space of ``X'``, so ``||X W^T - X' M^T||^2 = const + ||(M* - M) S'^(1/2)||^2``;
- by Eckart-Young the best rank-``r`` ``M`` truncates ``P = M* S'^(1/2) = W C S'^(-1/2)`` to ``P_r``,
  and ``M = P_r S'^(-1/2)``.

When ``X' = X``, ``C = S'`` and ``P = W S'^(1/2)``: exactly whitening (SVD-LLM). ``S'^(+-1/2)`` come from
:func:`factorize_cli.factorization.whitening` (eigenvalues floored at a fraction of the largest), so a
singular ``S'`` regularises instead of failing. Any common scale of ``S'`` and ``C`` (sums or means over
rows) gives the same ``M``; callers pass means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from factorize_cli.factorization import (Outcome, as_matrix, balance, factorize_checked, measured,
                                         output_space, whitening)
from factorize_cli.geometry import Geometry


def compensated_target(weight: torch.Tensor, moment: torch.Tensor, cross: torch.Tensor, *,
                       floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, S'^(-1/2))`` with ``P = W C S'^(-1/2)``, for an ``out x fan_in`` matrix ``W`` (float64)."""
    _, inverse = whitening(moment, floor)
    return weight.to(torch.float64) @ cross.to(torch.float64) @ inverse, inverse


def output_residual(weight: torch.Tensor, approximation: torch.Tensor, moment: torch.Tensor,
                    cross: torch.Tensor, energy: float) -> float:
    """``||X W^T - X' M^T||_F^2 / N`` from the moments (means over ``N`` rows), ``energy = ||X W^T||^2 / N``:
    ``energy - 2 tr(W C M^T) + tr(M S' M^T)``, all ``out x fan_in`` matrices in float64."""
    w, m = weight.to(torch.float64), approximation.to(torch.float64)
    cross_term = float(((w @ cross.to(torch.float64)) * m).sum())
    square = float(((m @ moment.to(torch.float64)) * m).sum())
    return max(energy - 2.0 * cross_term + square, 0.0)


@dataclass(frozen=True)
class CompensatedOutcome:
    outcome: Outcome  # factors in the weight space; their spectrum and stats are those of P
    output_error: float | None  # ||X W^T - X' M^T||_F / ||X W^T||_F of the stored factors (None: energy unknown)
    output_norm: float | None  # ||X W^T||_F / sqrt(N)


def compensated_factors(weight: torch.Tensor, geometry: Geometry, rank: int, moment: torch.Tensor,
                        cross: torch.Tensor, energy: float | None = None, *, engine: str = "auto", seed: int = 0,
                        device: str = "cpu", floor: float = 1e-6) -> CompensatedOutcome:
    """Rank-``rank`` factors of ``weight`` minimising ``||X W^T - X' M^T||_F`` for inputs with mean
    second moment ``moment = X'^T X' / N`` and mean cross-moment ``cross = X^T X' / N``.

    The factors come back in the weight's dtype, shaped like :func:`low_rank_factors`' (``module0``,
    ``module1``). ``energy`` (``||X W^T||^2 / N``, the original outputs' mean square without bias) lets the
    outcome say the relative output error the stored factors achieve.
    """
    moment = moment.to(device=device, dtype=torch.float64)
    cross = cross.to(device=device, dtype=torch.float64)
    w = as_matrix(weight, geometry).to(device=device, dtype=torch.float64)
    p, inverse = compensated_target(w, moment, cross, floor=floor)
    inner = factorize_checked(p, output_space(geometry), rank, engine=engine, seed=seed, device=device,
                              measure=False)
    del p
    second = inner.factors.second.reshape(geometry.out_features, rank).to(device)
    second, first = balance(second, inner.factors.first.reshape(rank, geometry.fan_in).to(device) @ inverse)
    first_shape, second_shape = geometry.factor_shapes(rank)
    first = first.reshape(first_shape).to(device="cpu", dtype=weight.dtype).contiguous()
    second = second.reshape(second_shape).to(device="cpu", dtype=weight.dtype).contiguous()
    factors = replace(inner.factors, first=first, second=second)
    achieved, norm = measured(weight, first, second, geometry, device=device)
    output_error = output_norm = None
    if energy is not None:
        approx = second.to(device=device, dtype=torch.float64).reshape(geometry.out_features, rank) @ \
            first.to(device=device, dtype=torch.float64).reshape(rank, geometry.fan_in)
        residual = output_residual(w, approx, moment, cross, energy)
        output_norm = math.sqrt(max(energy, 0.0))
        output_error = math.sqrt(residual / energy) if energy > 0 else 0.0
    return CompensatedOutcome(Outcome(factors, achieved, inner.engine, norm), output_error, output_norm)
