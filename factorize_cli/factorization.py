"""The math, as pure functions: truncated SVD into two balanced factors.

For ``W ~= U_r S_r V_r^T`` the factors are ``first = sqrt(S_r) V_r^T`` (``module0``,
in -> r) and ``second = U_r sqrt(S_r)`` (``module1``, r -> out). Everything is computed
in float64 and cast to the weight's dtype at the end. By Eckart-Young the relative
error ``sqrt(sum of dropped sigma^2) / ||W||_F`` is the optimum for the rank.

SVD engines share one signature, ``engine(matrix, rank) -> (U_r, sigma, Vh_r)`` where
``sigma`` holds every singular value the engine knows (all of them for ``exact``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from factorize_cli.geometry import Geometry

SvdEngine = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def exact_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAPACK's full thin SVD, truncated."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s, vh[:rank]


ENGINES: dict[str, SvdEngine] = {"exact": exact_svd}


@dataclass(frozen=True)
class SpectrumStats:
    """What a spectrum says about truncating at ``rank``."""

    rank: int
    relative_error: float  # sqrt(sum of dropped sigma^2) / ||W||_F
    energy_kept: float  # sum of kept sigma^2 / ||W||_F^2
    norm: float  # ||W||_F


def spectrum_stats(sigma: torch.Tensor, rank: int) -> SpectrumStats:
    squares = sigma.to(torch.float64).square()
    total = float(squares.sum())
    if total == 0.0:
        return SpectrumStats(rank, 0.0, 1.0, 0.0)
    dropped = float(squares[rank:].sum())
    return SpectrumStats(rank, math.sqrt(dropped / total), 1.0 - dropped / total, math.sqrt(total))


@dataclass(frozen=True)
class Factors:
    first: torch.Tensor  # module0.weight, shaped like the layer kind wants
    second: torch.Tensor  # module1.weight
    sigma: torch.Tensor  # singular values (float64)
    stats: SpectrumStats  # predicted from the spectrum


def as_matrix(weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The weight as a float64 ``out x fan_in`` matrix (one shared reshape for every kind)."""
    return weight.detach().to(torch.float64).reshape(geometry.matrix_shape)


def singular_values(weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    return torch.linalg.svdvals(as_matrix(weight, geometry))


def low_rank_factors(weight: torch.Tensor, geometry: Geometry, rank: int, *, engine: str = "exact") -> Factors:
    """Best rank-``rank`` factors of ``weight``, in the weight's dtype."""
    if not 1 <= rank <= geometry.max_rank:
        raise ValueError(f"rank {rank} outside [1, {geometry.max_rank}]")
    u, sigma, vh = ENGINES[engine](as_matrix(weight, geometry), rank)
    root = sigma[:rank].sqrt()
    first_shape, second_shape = geometry.factor_shapes(rank)
    first = (root[:, None] * vh).reshape(first_shape).to(weight.dtype)
    second = (u * root[None, :]).reshape(second_shape).to(weight.dtype)
    return Factors(first, second, sigma, spectrum_stats(sigma, rank))


def reconstruct(first: torch.Tensor, second: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """``second @ first`` as a float64 weight of the original shape."""
    rank = first.shape[0]
    a = second.to(torch.float64).reshape(geometry.out_features, rank)
    b = first.to(torch.float64).reshape(rank, geometry.fan_in)
    return (a @ b).reshape(geometry.weight_shape)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||W - W'||_F / ||W||_F`` in float64 (0 for an all-zero weight)."""
    w = weight.detach().to(torch.float64)
    norm = float(torch.linalg.vector_norm(w))
    if norm == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(w - approximation.to(torch.float64))) / norm
