"""The top eigenpairs of a symmetric positive semi-definite matrix without a full ``eigh``.

A full ``eigh`` of a ``2048 x 2048`` Gram matrix spends most of its time in the tridiagonal
reduction (memory-bound, and slow when the two cores are shared); truncation to rank ``r`` needs
only the top ``r`` eigenpairs. :func:`top_eigenpairs` gets them by Chebyshev-filtered subspace
iteration (Zhou & Saad, 2007): every step is a matrix product, a Cholesky-QR and a Rayleigh-Ritz
projection on a block of ``r + oversampling`` columns, so it runs at matrix-product speed on any
device.

Convergence is judged by what truncation loses: the captured energy ``sum(top r eigenvalues)``.
Each Ritz value ``theta_i`` with residual ``rho_i = ||G x_i - theta_i x_i||`` is within about
``rho_i^2 / gap_i`` of its eigenvalue (the gap to the unwanted part of the spectrum, estimated by
the block's smallest Ritz value); the iteration stops when those bounds, summed over the top
``r`` and doubled for safety, are below ``tol`` times the dropped energy (``trace(G)`` minus the
captured energy), so the truncation error is within about ``tol / 2`` of the optimum. When it
does not get there in ``max_rounds`` it says so and the caller falls back to a full ``eigh``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Eigenpairs:
    values: torch.Tensor  # the block's Ritz values, descending (float64); the first ``count`` are converged
    vectors: torch.Tensor  # the first ``count`` Ritz vectors (columns, the matrix's dtype)
    converged: bool
    rounds: int
    deficit: float  # estimated sum(lambda_i - theta_i) over the top ``count``
    trace: float  # trace of the matrix (float64): the total energy


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``y`` (unit columns): Cholesky-QR twice, matrix products only, in
    the block's precision; Householder QR in float64 when the block is too ill-conditioned for it."""
    q = y
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(q.T @ q, upper=True)
        if int(info) != 0:
            return torch.linalg.qr(y.to(torch.float64)).Q.to(y.dtype)
        q = torch.linalg.solve_triangular(factor, q, upper=True, left=False)
    return q


def _chebyshev(g: torch.Tensor, x: torch.Tensor, gx: torch.Tensor, degree: int, cut: float,
               top: float) -> torch.Tensor:
    """``p(G) x`` with ``p`` the degree-``degree`` Chebyshev polynomial that stays within [-1, 1] on
    ``[0, cut]`` and grows fast above it, scaled so that ``p(top) = 1`` (no overflow): the scaled
    three-term recurrence of Zhou & Saad. ``gx`` is ``G x``, already at hand."""
    e = c = cut / 2
    sigma1 = e / (top - c)
    sigma = sigma1
    previous, y = x, (gx - c * x) * (sigma1 / e)
    for _ in range(1, degree):
        sigma_next = 1.0 / (2.0 / sigma1 - sigma)
        y_next = (g @ y - c * y) * (2.0 * sigma_next / e) - (sigma * sigma_next) * previous
        previous, y, sigma = y, y_next, sigma_next
    return y


def _degree(top: float, low: float, cut: float, most: int, limit: float) -> int:
    """The highest degree (at most ``most``) whose filter amplifies ``top`` at most ``limit`` times more
    than ``low``: a column's rounding along the top eigenvectors must not swamp what it is converging to."""
    def t(d: int, x: float) -> float:
        return math.cosh(d * math.acosh(x)) if x >= 1 else 1.0

    xt, xl = 2 * top / cut - 1, 2 * low / cut - 1
    degree = 1
    while degree < most and t(degree + 1, xt) <= limit * t(degree + 1, xl):
        degree += 1
    return degree


def top_eigenpairs(g: torch.Tensor, count: int, *, seed: int = 0, tol: float = 1e-3, oversample: int | None = None,
                   degree: int = 4, max_rounds: int = 8) -> Eigenpairs:
    """The ``count`` largest eigenpairs of the symmetric PSD ``g`` (see the module docstring). Leading
    Ritz vectors whose own bound is negligible are locked: only the rest is filtered, projected off them."""
    m = g.shape[0]
    block = min(m, count + (oversample if oversample is not None else max(32, count // 4)))
    trace = float(torch.diagonal(g).to(torch.float64).sum())
    limit = 1e4 if g.dtype != torch.float64 else 1e10
    gen = torch.Generator(device="cpu").manual_seed(seed)
    y = g @ torch.randn(m, block, generator=gen, dtype=g.dtype).to(g.device)
    x = _orthonormal(y / y.norm(dim=0).clamp_min(torch.finfo(y.dtype).tiny))
    deficit, rounds = math.inf, 0
    while True:
        gx = g @ x
        h = x.T @ gx
        theta, w = torch.linalg.eigh((h + h.T) / 2)
        theta, w = theta.flip(0).to(torch.float64), w.flip(1)
        x, gx = x @ w, gx @ w
        top = theta[:count].clamp_min(0)
        captured = float(top.sum())
        floor = float(theta[-1].clamp_min(0))
        residual = (gx[:, :count] - x[:, :count] * theta[:count].to(g.dtype)).to(torch.float64)
        gaps = (top - floor).clamp_min(float(top[0]) * 1e-12 + 1e-300)
        bounds = 2.0 * residual.square().sum(0) / gaps
        deficit = float(bounds.sum())
        dropped = max(trace - captured, 0.0)
        if deficit <= tol * dropped or block == m or rounds >= max_rounds:
            converged = deficit <= tol * dropped or block == m
            return Eigenpairs(theta, x[:, :count].contiguous(), converged, rounds, deficit, trace)
        rounds += 1
        settled = (bounds <= 0.1 * tol * dropped / count).tolist()
        locked = next((j for j, ok in enumerate(settled) if not ok), count)
        cut = floor * 1.01 if floor > 0 else float(theta[0]) * 1e-6
        d = _degree(float(theta[locked]), float(theta[count - 1]), cut, degree, limit)
        y = _chebyshev(g, x[:, locked:], gx[:, locked:], d, cut, float(theta[locked]))
        if locked:
            kept = x[:, :locked]
            for _ in range(2):
                y = y - kept @ (kept.T @ y)
        active = _orthonormal(y / y.norm(dim=0).clamp_min(torch.finfo(y.dtype).tiny))
        x = torch.cat([x[:, :locked], active], dim=1) if locked else active
