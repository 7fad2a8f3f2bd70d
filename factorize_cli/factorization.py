"""The math, as pure functions: truncated SVD into two balanced factors.

For ``W ~= U_r S_r V_r^T`` the factors are ``first = sqrt(S_r) V_r^T`` (``module0``,
in -> r) and ``second = U_r sqrt(S_r)`` (``module1``, r -> out), cast to the weight's
dtype at the end. By Eckart-Young the relative error ``sqrt(sum of dropped sigma^2) /
||W||_F`` is the optimum for the rank.

Engines share one signature. Each works on a wide matrix ``a`` (rows <= columns; the
caller transposes tall ones) and returns ``(u, p, sigma)`` with ``u`` orthonormal
(``m x r``), ``p = u^T a`` (``r x n``), and ``sigma`` every singular value it knows:

- ``exact``: LAPACK's SVD in float64.
- ``gram``: eigendecomposition of ``a a^T`` (``m x m``, the smaller side). Squaring the
  condition number loses the smallest singular values, not the top subspace, so the
  truncation stays optimal to ~1e-6 unless almost nothing is dropped (``auto`` checks).
- ``subspace``: the top ``r`` eigenpairs of the same Gram matrix by Chebyshev-filtered subspace
  iteration (:mod:`factorize_cli.eigen`): matrix products only, 2-10x faster than a full ``eigh``
  for ``r`` up to about a third of the small side. It stops when its residual bound puts the
  truncation within ~0.05% of the optimum and raises :class:`NotConverged` otherwise; it knows
  only the top singular values (``trace(a a^T)`` gives the total energy).
- ``randomized``: a seeded range finder with oversampling and power iterations, stopped
  when the captured energy has converged; only the top singular values are known.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from factorize_cli.dense import cholesky, gram, project, times_lower, working
from factorize_cli.geometry import Geometry

Decomposition = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Engine = Callable[[torch.Tensor, int, int], Decomposition]


def sum_squares(t: torch.Tensor, rows: int = 256) -> float:
    """``sum(t^2)`` accumulated in float64, a block of rows at a time (no float64 copy of a big matrix)."""
    t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    return sum(float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2 for block in t.split(rows))


_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf. First the sum (one pass, no temporary: 10-25x faster than the bit test): a NaN or an
    Inf always makes it NaN or infinite. Only when it is not finite (such values, or an overflow of the sum)
    are the exponent bits of every element checked (not all ones; 3-4x faster than isfinite)."""
    if t.is_floating_point() and t.numel() and math.isfinite(float(t.detach().sum())):
        return True
    if t.dtype not in _EXPONENT or t.numel() == 0:
        return bool(torch.isfinite(t).all())
    int_type, mask = _EXPONENT[t.dtype]
    bits = t.detach().contiguous().view(int_type)
    return not bool(((bits & mask) == mask).any())


def exact_svd(a: torch.Tensor, rank: int, seed: int = 0) -> Decomposition:
    u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    return u[:, :rank], s[:rank, None] * vh[:rank], s


def gram_svd(a: torch.Tensor, rank: int, seed: int = 0) -> Decomposition:
    lam, vectors = torch.linalg.eigh(gram(a))  # ascending
    u = vectors[:, -rank:].flip(1).contiguous()
    sigma = lam.flip(0).clamp_min(0).sqrt().to(torch.float64)
    return u, project(u, a), sigma


class NotConverged(RuntimeError):
    """The subspace iteration did not certify its truncation: the caller falls back to a full ``eigh``."""


def subspace_svd(a: torch.Tensor, rank: int, seed: int = 0) -> Decomposition:
    from factorize_cli.eigen import top_eigenpairs

    pairs = top_eigenpairs(gram(a), rank, seed=seed)
    if not pairs.converged:
        raise NotConverged(f"subspace iteration: estimated deficit {pairs.deficit:.3g} after {pairs.rounds} rounds")
    u = pairs.vectors
    return u, project(u, a), pairs.values[:rank].clamp_min(0).sqrt()


def randomized_svd(a: torch.Tensor, rank: int, seed: int = 0, *, max_power: int = 8,
                   tol: float = 1e-5) -> Decomposition:
    m, n = a.shape
    k = min(m, rank + max(16, rank // 2))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, dtype=a.dtype).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    total = sum_squares(a)
    captured_before = -1.0
    for _ in range(max_power + 1):
        b = q.T @ a
        small_u, s, _ = torch.linalg.svd(b.to(torch.float64), full_matrices=False)
        captured = float(s[:rank].square().sum())
        if captured - captured_before <= tol * max(total - captured, total * 1e-12):
            break
        captured_before = captured
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
    u = (q.to(torch.float64) @ small_u[:, :rank]).to(a.dtype)
    return u, u.T @ a, s


ENGINES: dict[str, Engine] = {"exact": exact_svd, "gram": gram_svd, "subspace": subspace_svd,
                              "randomized": randomized_svd}
CHUNKED = frozenset({"gram", "subspace"})  # engines that take a half-precision matrix as it is stored


@dataclass(frozen=True)
class SpectrumStats:
    """What a spectrum says about truncating at ``rank``."""

    rank: int
    relative_error: float  # sqrt(sum of dropped sigma^2) / ||W||_F
    energy_kept: float  # sum of kept sigma^2 / ||W||_F^2
    norm: float  # ||W||_F


def spectrum_stats(sigma: torch.Tensor, rank: int, norm: float | None = None) -> SpectrumStats:
    """Stats from singular values; ``norm`` completes a partial spectrum (top values only)."""
    squares = sigma.to(torch.float64).square()
    total = float(squares.sum()) if norm is None else norm * norm
    if total == 0.0:
        return SpectrumStats(rank, 0.0, 1.0, 0.0)
    kept = float(squares[:rank].sum())
    dropped = max(total - kept, 0.0) if norm is not None else float(squares[rank:].sum())
    return SpectrumStats(rank, math.sqrt(dropped / total), 1.0 - dropped / total, math.sqrt(total))


@dataclass(frozen=True)
class Factors:
    first: torch.Tensor  # module0.weight, shaped like the layer kind wants
    second: torch.Tensor  # module1.weight
    sigma: torch.Tensor  # singular values the engine knows (float64)
    stats: SpectrumStats  # predicted from the spectrum
    engine: str
    engine_error: float  # relative error of the factors before rounding to the weight's dtype


def as_matrix(weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The weight as an ``out x fan_in`` matrix (one shared reshape for every kind; a view of a
    transposed-stored Linear's ``in x out`` weight)."""
    if geometry.transposed:
        return weight.detach().T
    return weight.detach().reshape(geometry.matrix_shape)


def working_dtype(weight: torch.Tensor, engine: str) -> torch.dtype:
    """float64 for exact and float64 inputs; float32 otherwise (bf16/fp16 inputs included)."""
    return torch.float64 if engine == "exact" or weight.dtype == torch.float64 else torch.float32


def singular_values(weight: torch.Tensor, geometry: Geometry, *, engine: str = "exact",
                    device: str = "cpu") -> torch.Tensor:
    """All singular values (float64, descending), the cheapest accurate way for the engine."""
    m = as_matrix(weight, geometry).to(device=device, dtype=working_dtype(weight, engine))
    if engine == "exact":
        return torch.linalg.svdvals(m).cpu()
    a = m if m.shape[0] <= m.shape[1] else m.T
    lam = torch.linalg.eigvalsh(gram(a))
    return lam.flip(0).clamp_min(0).sqrt().to(torch.float64).cpu()


def low_rank_factors(weight: torch.Tensor, geometry: Geometry, rank: int, *, engine: str = "exact",
                     seed: int = 0, device: str = "cpu", precision: torch.dtype | None = None) -> Factors:
    """Best rank-``rank`` factors of ``weight`` (for the engine), in the weight's dtype, on the CPU."""
    if not 1 <= rank <= geometry.max_rank:
        raise ValueError(f"rank {rank} outside [1, {geometry.max_rank}]")
    dtype = precision or working_dtype(weight, engine)
    m = as_matrix(weight, geometry)
    if not (engine in CHUNKED and m.device.type == "cpu" and device == "cpu" and working(m.dtype) == dtype):
        m = m.to(device=device, dtype=dtype)  # else the engine converts a column chunk at a time (dense.py)
    tall = m.shape[0] > m.shape[1]
    a = m.T if tall else m
    u, p, sigma = ENGINES[engine](a, rank, seed)
    total = sum_squares(a)
    del m, a  # a working copy, when there is one, is the largest temporary: freed before the factors
    captured = sum_squares(p)  # u is orthonormal: ||a - u p||^2 = ||a||^2 - ||p||^2
    norms = p.norm(dim=1)
    root = norms.sqrt()
    left = u * root[None, :]
    scale = torch.where(norms > 0, 1 / root.clamp_min(torch.finfo(p.dtype).tiny), 0)
    right = p.mul_(scale[:, None])  # in place: p is the engine's own
    second, first = (right.T, left.T) if tall else (left, right)
    first_shape, second_shape = geometry.factor_shapes(rank)
    first = first.reshape(first_shape).to(device="cpu", dtype=weight.dtype)
    second = second.reshape(second_shape).to(device="cpu", dtype=weight.dtype)
    sigma = sigma.to(device="cpu", dtype=torch.float64)
    engine_error = math.sqrt(max(total - captured, 0.0) / total) if total else 0.0
    norm = math.sqrt(total) if len(sigma) < geometry.max_rank else None  # completes a partial spectrum
    return Factors(first.contiguous(), second.contiguous(), sigma, spectrum_stats(sigma, rank, norm), engine,
                   engine_error)


def reconstruct(first: torch.Tensor, second: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """``second @ first`` as a float64 weight of the original shape and orientation."""
    rank = first.shape[0]
    a = second.to(torch.float64).reshape(geometry.out_features, rank)
    b = first.to(torch.float64).reshape(rank, geometry.fan_in)
    product = a @ b
    return product.T if geometry.transposed else product.reshape(geometry.weight_shape)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||W - W'||_F / ||W||_F`` in float64 (0 for an all-zero weight)."""
    w = weight.detach().to(torch.float64)
    norm = float(torch.linalg.vector_norm(w))
    if norm == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(w - approximation.to(torch.float64))) / norm


def factors_error(weight: torch.Tensor, first: torch.Tensor, second: torch.Tensor, geometry: Geometry, *,
                  precise: bool = True, device: str = "cpu", rows: int = 512) -> float:
    """``||W - second @ first||_F / ||W||_F``, from the residual a block of rows at a time (no full-size
    temporary). ``precise`` computes in float64; otherwise float32 products with every square summed in
    float64: the residual's entries carry ~1e-6 of ``|W|``, so the error is good to ~1e-5 of itself
    when it is above 1e-2 (the Gram form ``||W||^2 - 2<.,.> + <.,.>`` would lose its square)."""
    return measured(weight, first, second, geometry, precise=precise, device=device, rows=rows)[0]


def measured(weight: torch.Tensor, first: torch.Tensor, second: torch.Tensor, geometry: Geometry, *,
             precise: bool = True, device: str = "cpu", rows: int = 512) -> tuple[float, float]:
    """``(relative error, ||W||_F)`` as :func:`factors_error` measures them, in one pass."""
    dtype = torch.float64 if precise else torch.float32
    rank = first.shape[0]
    w = as_matrix(weight, geometry)
    a = second.reshape(geometry.out_features, rank).to(device=device, dtype=dtype)
    b = first.reshape(rank, geometry.fan_in).to(device=device, dtype=dtype)
    total = residual = 0.0
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows].to(device=device, dtype=dtype)
        total += float(block.square().sum(dtype=torch.float64))
        block = torch.addmm(block, a[start:start + rows], b, alpha=-1)
        residual += float(block.square().sum(dtype=torch.float64))
    return (math.sqrt(residual / total) if total else 0.0), math.sqrt(total)


@dataclass(frozen=True)
class Outcome:
    """Factors plus what they achieved, measured on the factors as stored."""

    factors: Factors
    achieved_error: float
    engine: str  # the engine that produced the factors (after any fallback)
    norm: float  # ||W||_F, from the same pass as achieved_error (NaN when not measured)


AUTO_TOLERANCE = 1e-3  # auto keeps each layer within 0.1% (relative) of the optimal error


def choose_engine(geometry: Geometry) -> str:
    """``auto``'s pick from the shape: LAPACK's SVD when the matrix is small, the Gram
    eigendecomposition otherwise (2-7x faster from 768-wide matrices up, and verified)."""
    small, big = sorted(geometry.matrix_shape)
    return "exact" if small < 256 or small * big < 1 << 18 else "gram"


def partial_pays(geometry: Geometry, rank: int) -> bool:
    """Whether the top-``rank`` subspace iteration beats a full ``eigh`` of the Gram matrix: a wide
    enough small side and a block (``rank`` + oversampling) well short of it."""
    small = min(geometry.matrix_shape)
    return small >= 1536 and rank + max(32, rank // 4) <= small * 0.45  # 768 wide: eigh 0.15 s, subspace 0.55 s


PRECISE_BELOW = 0.02  # float64 measurement of the achieved error when the optimum is below this


def factorize_checked(weight: torch.Tensor, geometry: Geometry, rank: int, *, engine: str = "auto",
                      seed: int = 0, device: str = "cpu", measure: bool = True) -> Outcome:
    """Factor with ``engine``. ``auto`` picks per layer. On the Gram path it first tries the top-``rank``
    subspace iteration (certified within ~0.05% of the optimum by its residuals), then a full ``eigh``,
    whose result must be within 0.1% of the optimum its own full spectrum shows, else it is redone
    with a float64 Gram matrix, then exactly."""
    chosen = choose_engine(geometry) if engine == "auto" else engine
    factors = None
    if engine == "auto" and chosen == "gram" and partial_pays(geometry, rank):
        try:
            factors = low_rank_factors(weight, geometry, rank, engine="subspace", seed=seed, device=device)
            chosen = "subspace"
            if not _near_optimal(factors, resolvable=PRECISE_BELOW):
                chosen, factors = "gram", None
        except NotConverged:
            factors = None
    if factors is None:
        factors = low_rank_factors(weight, geometry, rank, engine=chosen, seed=seed, device=device)
    if engine == "auto" and chosen == "gram" and not _near_optimal(factors, resolvable=PRECISE_BELOW):
        chosen = "gram-float64"
        factors = low_rank_factors(weight, geometry, rank, engine="gram", device=device, precision=torch.float64)
        if not _near_optimal(factors, resolvable=1e-6):
            chosen = "exact"
            factors = low_rank_factors(weight, geometry, rank, engine="exact", device=device)
    if not measure:
        return Outcome(factors, math.nan, chosen, math.nan)
    precise = factors.stats.relative_error < PRECISE_BELOW or weight.dtype == torch.float64
    achieved, norm = measured(weight, factors.first, factors.second, geometry, precise=precise, device=device)
    return Outcome(factors, achieved, chosen, norm)


def _near_optimal(factors: Factors, *, resolvable: float) -> bool:
    """Engine error within AUTO_TOLERANCE of the spectrum's optimum, when the working precision
    can tell (an optimum below ``resolvable`` is lost in the rounding of the Gram matrix)."""
    optimum = factors.stats.relative_error
    return optimum >= resolvable and factors.engine_error <= optimum * (1 + AUTO_TOLERANCE)


def whitening(second_moment: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^-1)`` with ``S`` the symmetric square root of the second moment ``C`` (``S S = C``).

    From a float64 eigendecomposition; eigenvalues below ``floor`` times the largest are raised to
    it, so a singular or slightly indefinite ``C`` (dead inputs, rounding) still gives an invertible
    ``S`` instead of a failure. Directions that carry no activation then barely count.
    """
    c = second_moment.to(torch.float64)
    c = c + c.T
    c /= 2  # (C + C^T) / 2 with one temporary: C is fan_in^2 float64
    lam, q = torch.linalg.eigh(c)
    del c
    top = float(lam.max()) if lam.numel() else 0.0
    if not math.isfinite(top) or top <= 0 or not bool(torch.isfinite(lam).all()):
        raise ValueError("the second moment is zero or not finite")
    root = lam.clamp_min(floor * top).sqrt()
    return (q * root) @ q.T, (q / root) @ q.T


def cholesky_whitening(second_moment: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, None]:
    """``(L, None)`` with ``L`` the lower Cholesky factor of ``C + d I`` (``L L^T = C + d I``), float64; no
    inverse: :func:`factorize_whitened` maps back by a triangular solve (``r fan_in^2``, not ``fan_in^3``).

    Any ``S`` with ``S S^T = C`` whitens: ``||(W - W') S||_F^2 = tr((W - W') C (W - W')^T)``, so truncating
    ``W L`` is as good as truncating ``W C^(1/2)`` (same singular values), at a ``fan_in^3 / 3`` factorization
    instead of an eigendecomposition (1 s instead of ~90 s for a 5632-wide input on two cores).
    ``d = 0`` when ``C`` factors with every pivot above ``floor`` times its largest diagonal entry; else
    ``d = floor * max(diag C)`` (raised tenfold until the factorization succeeds) keeps a singular or
    slightly indefinite ``C`` invertible with a bounded ``L^-1``, as :func:`whitening`'s eigenvalue floor does.
    """
    c = second_moment.to(torch.float64)  # the factorization reads its lower triangle: no symmetrized copy
    n = c.shape[0]
    scale = float(torch.diagonal(c).max()) if n else 0.0
    # NaN and Inf survive a sum (one pass, no temporary); so would an overflow, as unusable
    if not math.isfinite(scale) or scale <= 0 or not math.isfinite(float(c.sum())):
        raise ValueError("the second moment is zero or not finite")
    ridge, added = floor * scale, 0.0
    for _ in range(9):
        lower, info = cholesky(c)
        if info == 0 and float(torch.diagonal(lower).square().min()) >= ridge:
            return lower, None
        if c is second_moment:
            c = c.clone()  # the caller's matrix is not raised
        step = ridge * (1.0 if added == 0.0 else 9.0)  # the total ridge: floor * max(diag), then tenfold
        torch.diagonal(c).add_(step)
        added += step
    raise ValueError("the second moment is not positive semi-definite")


def output_space(geometry: Geometry) -> Geometry:
    """The plain ``out x fan_in`` matrix a whitened factorization works on, whatever the layer kind."""
    return Geometry(geometry.kind.LINEAR, geometry.out_features, geometry.fan_in, (), False)


def whitened_singular_values(weight: torch.Tensor, geometry: Geometry, root: torch.Tensor, *,
                             engine: str = "exact", device: str = "cpu", lower: bool = False) -> torch.Tensor:
    """All singular values of ``W S`` (float64, descending), the spectrum :func:`factorize_whitened`
    truncates, computed the way ``engine`` would compute them (``gram``: float64 Gram matrix);
    ``lower``: ``S`` is lower triangular (:func:`cholesky_whitening`)."""
    w = as_matrix(weight, geometry).to(torch.float64)
    m = times_lower(w, root) if lower else w @ root
    return singular_values(m, output_space(geometry), engine=engine, device=device)


def balance(second: torch.Tensor, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(second, first)`` rescaled per rank so that each column of ``second`` and row of ``first`` have
    equal norms (their product unchanged): a map back from a whitened space unbalances them."""
    scale = (first.norm(dim=1) / second.norm(dim=0).clamp_min(1e-300)).sqrt()
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return second * scale[None, :], first / scale[:, None]


@dataclass(frozen=True)
class WhitenedOutcome:
    outcome: Outcome  # factors in the weight space; their stats describe the output space
    output_error: float  # ||(W - W') S||_F / ||W S||_F of the stored factors


def factorize_whitened(weight: torch.Tensor, geometry: Geometry, rank: int, root: torch.Tensor,
                       root_inverse: torch.Tensor | None, *, engine: str = "auto", seed: int = 0,
                       device: str = "cpu") -> WhitenedOutcome:
    """Factors minimising ``||(W - W') X||_F`` for inputs with second moment ``S S^T``: truncate the SVD
    of ``W S`` and map the input-side factor back with ``S^-1`` (SVD-LLM's whitening); ``root_inverse``
    None: ``S`` is lower triangular (:func:`cholesky_whitening`) and is solved with. The products run
    in the working precision of the engine (float32 for auto on float32/bf16/fp16 weights), with the
    same engines and checks as a plain factorization."""
    dtype = working_dtype(weight, "exact" if engine == "exact" else "gram")
    root = root.to(device=device, dtype=dtype)
    lower = root_inverse is None
    w = as_matrix(weight, geometry).to(device=device, dtype=dtype)
    m = times_lower(w, root) if lower else w @ root
    del w
    inner = factorize_checked(m, output_space(geometry), rank, engine=engine, seed=seed, device=device, measure=False)
    second = inner.factors.second.reshape(geometry.out_features, rank).to(device=device)
    first = inner.factors.first.reshape(rank, geometry.fan_in).to(device=device)
    first = first @ root_inverse.to(device=device, dtype=dtype) if root_inverse is not None else \
        torch.linalg.solve_triangular(root, first, upper=False, left=False)
    second, first = balance(second, first)
    first_shape, second_shape = geometry.factor_shapes(rank)
    first = first.reshape(first_shape).to(device="cpu", dtype=weight.dtype).contiguous()
    second = second.reshape(second_shape).to(device="cpu", dtype=weight.dtype).contiguous()
    factors = replace(inner.factors, first=first, second=second)
    precise = dtype == torch.float64 or inner.factors.stats.relative_error < PRECISE_BELOW
    achieved, norm = measured(weight, first, second, geometry, precise=precise, device=device)
    # (W - W') S = W S - A (B S), from the stored factors, without an out x fan_in float64 product
    a = second.reshape(geometry.out_features, rank).to(device=device, dtype=m.dtype)
    b = first.reshape(rank, geometry.fan_in).to(device=device, dtype=m.dtype)
    b_root = times_lower(b, root) if lower else b @ root
    total = sum_squares(m)
    residual = sum_squares(torch.addmm(m, a, b_root, alpha=-1))
    output_error = math.sqrt(residual / total) if total else 0.0
    return WhitenedOutcome(Outcome(factors, achieved, inner.engine, norm), output_error)
