"""The blocked kernels against the plain operations they stand in for (float64 references)."""

from __future__ import annotations

import pytest
import torch

from factorize_cli.dense import cholesky, gram, times_lower


@pytest.mark.parametrize("shape", [(200, 300), (700, 900), (1000, 1000), (513, 2000), (2000, 513)])
def test_gram_is_the_symmetric_product(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    g = gram(a)
    assert torch.equal(g, g.T)
    reference = a.double() @ a.double().T
    assert torch.allclose(g.double(), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    assert torch.allclose(gram(a.T.contiguous().T), g, rtol=0, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("n,rows", [(300, 40), (1100, 700), (1536, 1536)])
def test_times_lower_is_the_product(n, rows):
    gen = torch.Generator().manual_seed(2)
    lower = torch.randn(n, n, generator=gen).tril()
    x = torch.randn(rows, n, generator=gen)
    reference = x.double() @ lower.double()
    got = times_lower(x, lower)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    assert torch.allclose(times_lower(x.double(), lower.double()), reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1000, 1537, 2100])
def test_blocked_cholesky_matches_lapack(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n + 300, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    c = x.T @ x
    upper_noise = c.clone()
    upper_noise.triu_(1).mul_(3.0)  # only the lower triangle is read
    lower, info = cholesky(c.tril() + upper_noise)
    expected, expected_info = torch.linalg.cholesky_ex(c)
    assert info == int(expected_info) == 0
    assert torch.equal(lower, lower.tril())
    assert torch.allclose(lower, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    assert torch.allclose(lower @ lower.T, c, rtol=0, atol=1e-12 * float(c.abs().max()))


@pytest.mark.parametrize("where", [(5, 5), (1500, 1500), (1999, 1999)])
def test_blocked_cholesky_reports_the_failing_pivot_like_lapack(where):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2300, 2000, generator=gen, dtype=torch.float64)
    c = x.T @ x
    c[where] = -1.0
    assert cholesky(c)[1] == int(torch.linalg.cholesky_ex(c)[1]) == where[0] + 1
    c = x.T @ x
    c[where[0], 3] = float("nan")
    assert cholesky(c)[1] == int(torch.linalg.cholesky_ex(c)[1]) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_half_precision_is_converted_a_chunk_at_a_time_to_the_same_products(dtype, transposed):
    from factorize_cli.dense import project

    gen = torch.Generator().manual_seed(4)
    # 2600 columns: three chunks, the last partial; a tall stored weight is factorized through its transpose
    a = torch.randn(2600, 700, generator=gen).to(dtype).T if transposed else \
        torch.randn(700, 2600, generator=gen).to(dtype)
    full = a.float()
    assert torch.allclose(gram(a), gram(full), rtol=0, atol=1e-4 * float(gram(full).abs().max()))
    assert gram(a).dtype == torch.float32 and torch.equal(gram(a), gram(a).T)
    u = torch.linalg.qr(torch.randn(700, 64, generator=gen)).Q
    assert torch.allclose(project(u, a), u.T @ full, rtol=0, atol=1e-5 * float((u.T @ full).abs().max()))
