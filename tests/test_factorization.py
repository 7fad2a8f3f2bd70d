"""The math against float64 references: the error must equal the Eckart-Young optimum."""

from __future__ import annotations

import math

import pytest
import torch

from factorize_cli.factorization import low_rank_factors, reconstruct, relative_error, spectrum_stats
from factorize_cli.geometry import Geometry, LayerKind
from tests.conftest import decaying_matrix, optimum_error


def geometry_of(weight: torch.Tensor) -> Geometry:
    return Geometry.from_weight_shape(LayerKind.from_ndim(weight.dim()), tuple(weight.shape), has_bias=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,rank", [((96, 64), 16), ((64, 200), 40), ((48, 32, 3, 3), 12), ((20, 8, 5, 3), 7)])
def test_error_equals_optimum(shape, rank, dtype):
    out, fan_in = shape[0], math.prod(shape[1:])
    weight = decaying_matrix(out, fan_in, alpha=0.6, seed=rank).reshape(shape).to(dtype)
    geo = geometry_of(weight)
    f = low_rank_factors(weight, geo, rank)
    first_shape, second_shape = geo.factor_shapes(rank)
    assert tuple(f.first.shape) == first_shape and tuple(f.second.shape) == second_shape
    assert f.first.dtype == dtype and f.second.dtype == dtype
    achieved = relative_error(weight, reconstruct(f.first, f.second, geo))
    best = optimum_error(weight, rank)
    assert abs(achieved - best) < 1e-6
    assert abs(f.stats.relative_error - best) < 1e-12  # predicted from the float64 spectrum


def test_conv_factors_compose_like_the_layers():
    """module1(module0(x)) with the factors equals conv2d with the reconstructed weight."""
    weight = torch.randn(24, 10, 3, 3, dtype=torch.float64)
    geo = geometry_of(weight)
    f = low_rank_factors(weight, geo, 6)
    x = torch.randn(2, 10, 11, 13, dtype=torch.float64)
    y_pair = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, f.first, stride=2, padding=1), f.second)
    y_full = torch.nn.functional.conv2d(x, reconstruct(f.first, f.second, geo), stride=2, padding=1)
    assert torch.allclose(y_pair, y_full, atol=1e-12)


def test_factors_are_balanced():
    weight = decaying_matrix(50, 40, seed=3, dtype=torch.float64)
    f = low_rank_factors(weight, geometry_of(weight), 10)
    # first = sqrt(S) Vh and second = U sqrt(S): each row/column norm is sqrt(sigma_i)
    assert torch.allclose(f.first.norm(dim=1), f.sigma[:10].sqrt(), atol=1e-12)
    assert torch.allclose(f.second.norm(dim=0), f.sigma[:10].sqrt(), atol=1e-12)


def test_bfloat16_stays_bfloat16_and_is_near_optimal():
    weight = decaying_matrix(128, 96, seed=4).to(torch.bfloat16)
    geo = geometry_of(weight)
    f = low_rank_factors(weight, geo, 24)
    assert f.first.dtype == torch.bfloat16 and f.second.dtype == torch.bfloat16
    achieved = relative_error(weight, reconstruct(f.first, f.second, geo))
    assert achieved == pytest.approx(optimum_error(weight, 24), abs=1e-2)  # bf16 rounding of the factors


def test_full_rank_is_exact_and_zero_weight_is_defined():
    weight = torch.randn(12, 9, dtype=torch.float64)
    geo = geometry_of(weight)
    f = low_rank_factors(weight, geo, 9)
    assert relative_error(weight, reconstruct(f.first, f.second, geo)) < 1e-13
    zero = torch.zeros(12, 9)
    fz = low_rank_factors(zero, geo, 3)
    assert fz.stats.relative_error == 0.0 and fz.stats.energy_kept == 1.0
    assert relative_error(zero, reconstruct(fz.first, fz.second, geo)) == 0.0


def test_rank_out_of_range_is_refused():
    weight = torch.randn(6, 4)
    with pytest.raises(ValueError):
        low_rank_factors(weight, geometry_of(weight), 5)
    with pytest.raises(ValueError):
        low_rank_factors(weight, geometry_of(weight), 0)


def test_spectrum_stats_energy_and_error_agree():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    st = spectrum_stats(sigma, 2)
    total = 16 + 4 + 1 + 0.25
    assert st.energy_kept == pytest.approx(20 / total)
    assert st.relative_error == pytest.approx(math.sqrt(1.25 / total))
    assert st.relative_error ** 2 + st.energy_kept == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    from factorize_cli.factorization import all_finite

    info = torch.finfo(dtype)
    clean = torch.tensor([0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.tiny / 4], dtype=dtype)
    assert all_finite(clean) and bool(torch.isfinite(clean).all())
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = clean.clone()
        t[3] = bad
        assert not all_finite(t)
        assert not all_finite(t.reshape(2, 4).t())  # non-contiguous too
    assert all_finite(torch.zeros(0, dtype=dtype))


def test_float32_achieved_error_matches_float64():
    """The residual-based measurement in float32 (float64 sums) agrees with float64 to ~1e-5 of itself."""
    from factorize_cli.factorization import factors_error, low_rank_factors

    w = decaying_matrix(512, 1536, alpha=0.4, seed=7).to(torch.bfloat16)
    geo = Geometry.from_weight_shape(LayerKind.LINEAR, (512, 1536), False)
    f = low_rank_factors(w, geo, 128, engine="gram")
    fast = factors_error(w, f.first, f.second, geo, precise=False)
    exact = factors_error(w, f.first, f.second, geo, precise=True)
    assert fast > 0.02 and fast == pytest.approx(exact, rel=1e-5)


def test_cholesky_whitening_whitens_like_the_symmetric_root():
    from factorize_cli.factorization import cholesky_whitening, whitening

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(900, 300, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 300, dtype=torch.float64)
    c = x.T @ x / 900
    lower, _ = cholesky_whitening(c)
    assert torch.allclose(lower @ lower.T, c, rtol=0, atol=1e-12 * float(c.abs().max()))
    assert torch.equal(lower, lower.tril())
    w = decaying_matrix(200, 300, seed=3).to(torch.float64)
    root, _ = whitening(c)
    assert torch.allclose(torch.linalg.svdvals(w @ lower), torch.linalg.svdvals(w @ root), rtol=1e-8)
    singular = c.clone()
    singular[:, 0] = singular[0, :] = 0.0  # a dead input: a ridge keeps L invertible and L^-1 bounded
    lower, _ = cholesky_whitening(singular)
    inverse = torch.linalg.inv(lower)
    assert bool(torch.isfinite(inverse).all()) and float(inverse.abs().max()) < 1e4 / float(c.diagonal().max()) ** 0.5
