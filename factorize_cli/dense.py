"""Dense kernels at matrix-product speed on the CPU: the Gram matrix, products with a lower-triangular
factor, and a blocked Cholesky factorization.

A CPU BLAS computes ``a @ a.T`` and ``x @ lower`` whole, although half of each is known in advance
(symmetry, zeros), and LAPACK's Cholesky (``potrf``) runs at well under the matrix-product rate on two
cores. Each function here splits the work into blocks of rows or columns so that only the needed
half is multiplied, by matrix products. On other devices they call the plain operation.
"""

from __future__ import annotations

import torch


def working(dtype: torch.dtype) -> torch.dtype:
    """The precision products of a ``dtype`` matrix run in: float32 for half precisions, else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def column_chunks(a: torch.Tensor, columns: int = 1024):
    """``(start, chunk)`` of ``a``'s columns in its working precision: a half-precision matrix is converted a
    chunk at a time (a 2048 x 5632 bf16 weight: 8 MB at once instead of a 46 MB float32 copy)."""
    if a.dtype == working(a.dtype):
        yield 0, a
        return
    for start in range(0, a.shape[1], columns):
        yield start, a[:, start:start + columns].to(working(a.dtype))


def gram(a: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``a a^T`` in ``a``'s working precision (column chunks of a half-precision ``a`` summed). On the CPU only
    the blocks of ``rows`` rows on and above the diagonal are multiplied, then mirrored: 35% less time than
    the full product, measured from 768 to 2048 rows on one and two threads."""
    m = a.shape[0]
    g = torch.zeros(m, m, dtype=working(a.dtype), device=a.device)
    if a.device.type != "cpu" or m <= rows:
        for _, chunk in column_chunks(a):
            g.addmm_(chunk, chunk.T)
        return g
    for _, chunk in column_chunks(a):
        for start in range(0, m, rows):
            g[start:start + rows, start:].addmm_(chunk[start:start + rows], chunk[start:].T)
    for start in range(0, m, rows):
        g[start + rows:, start:start + rows] = g[start:start + rows, start + rows:].T
    return g


def project(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``u^T a`` in ``u``'s precision, a column chunk of a half-precision ``a`` at a time."""
    if a.dtype == u.dtype:
        return u.T @ a
    p = torch.empty(u.shape[1], a.shape[1], dtype=u.dtype, device=u.device)
    for start, chunk in column_chunks(a):
        p[:, start:start + chunk.shape[1]] = u.T @ chunk
    return p


def times_lower(x: torch.Tensor, lower: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``x @ lower`` for a lower-triangular ``lower``: on the CPU each block of result columns is the product
    of the rows of ``lower`` from its diagonal block down (40% less time than the full product, measured
    for 2048- and 5632-wide whitening factors on two cores)."""
    n = lower.shape[0]
    if x.device.type != "cpu" or n <= block:
        return x @ lower
    out = torch.empty(x.shape[0], n, dtype=torch.promote_types(x.dtype, lower.dtype))
    for start in range(0, n, block):
        out[:, start:start + block] = x[:, start:] @ lower[start:, start:start + block]
    return out


def cholesky(c: torch.Tensor, block: int = 512) -> tuple[torch.Tensor, int]:
    """``(L, info)`` with ``L L^T = c`` from ``c``'s lower triangle, as ``torch.linalg.cholesky_ex`` (``info``: 0,
    or the 1-based index of the first pivot that is not positive). On the CPU a right-looking blocked
    factorization: LAPACK on each diagonal block, a triangular solve for the panel below it, and the trailing
    lower triangle updated by matrix products a column block at a time (5632 float64 on two cores: 0.65-0.85 s
    against ``potrf``'s 0.90-0.93 s, in runs minutes apart; the same factor to 1e-15)."""
    n = c.shape[0]
    if c.device.type != "cpu" or n <= 2 * block:
        lower, info = torch.linalg.cholesky_ex(c)
        return lower, int(info)
    a = c.tril()
    for start in range(0, n, block):
        end = min(start + block, n)
        diagonal, info = torch.linalg.cholesky_ex(a[start:end, start:end])
        if int(info):
            return a, start + int(info)
        a[start:end, start:end] = diagonal
        if end == n:
            break
        panel = torch.linalg.solve_triangular(diagonal.T, a[end:, start:end], upper=True, left=False)
        a[end:, start:end] = panel
        for column in range(end, n, block):
            stop = min(column + block, n)
            a[column:, column:stop] -= panel[column - end:] @ panel[column - end:stop - end].T
    return a.tril_(), 0
