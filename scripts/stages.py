"""Where the time of one matrix goes, against the naive float32 SVD in the same process.

    python scripts/stages.py [CHECKPOINT] [KEY]    # default: the bench slice's layer-0 gate_proj

Times (best of three) the stages of ``factorize_checked(auto)`` on the Gram path: float32 copy, Gram
product, top-r subspace iteration, ``p = u^T a`` and the balanced factors, the achieved-error measurement;
then the whole call and a full ``eigh`` for comparison. Then the calibrated path's own stages for a
5632-wide input (down_proj's): the Cholesky factor, ``W L``, the map back and the output-error product.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factorize_cli.dense import cholesky, gram, times_lower  # noqa: E402
from factorize_cli.eigen import top_eigenpairs  # noqa: E402
from factorize_cli.factorization import factorize_checked, factors_error, low_rank_factors  # noqa: E402
from factorize_cli.formats import open_checkpoint  # noqa: E402
from factorize_cli.geometry import Geometry, LayerKind  # noqa: E402


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "build" / "bench" / "llama-slice.safetensors")
    key = sys.argv[2] if len(sys.argv) > 2 else "model.layers.0.mlp.gate_proj.weight"
    with open_checkpoint(path) as ckpt:
        w = ckpt.get(key)
    geo = Geometry.from_weight_shape(LayerKind.LINEAR, tuple(w.shape), False)
    rank = min(w.shape) // 4
    m = w.float()
    a = m if m.shape[0] <= m.shape[1] else m.T
    g = gram(a)
    pairs = top_eigenpairs(g, rank)
    f = low_rank_factors(w, geo, rank, engine="subspace")
    stages = {
        "float32 copy": best(lambda: w.float()),
        "Gram product (blocks on and above the diagonal)": best(lambda: gram(a)),
        "Gram product, full (before)": best(lambda: a @ a.T),
        f"top-{rank} subspace iteration ({pairs.rounds} filter rounds)": best(lambda: top_eigenpairs(g, rank)),
        "u^T a": best(lambda: pairs.vectors.T @ a),
        "achieved error (float32 residual)": best(lambda: factors_error(w, f.first, f.second, geo, precise=False)),
        "factorize_checked(auto), whole call": best(lambda: factorize_checked(w, geo, rank)),
        "full eigh of the Gram matrix (before)": best(lambda: torch.linalg.eigh(g)),
        "naive float32 torch.linalg.svd": best(lambda: torch.linalg.svd(m, full_matrices=False), repeat=1),
    }
    naive = stages["naive float32 torch.linalg.svd"]
    print(f"{key} {tuple(w.shape)} {w.dtype}, rank {rank}, {torch.get_num_threads()} threads")
    for name, seconds in stages.items():
        print(f"  {name:<55} {seconds:7.3f} s  ({naive / seconds:5.1f}x faster than naive)")
    whitening_stages(min(w.shape), rank)


def whitening_stages(out: int, rank: int, fan_in: int = 5632) -> None:
    """The calibrated path's own work for a layer reading a ``fan_in``-wide input (down_proj's): the float64
    Cholesky factor of the second moment (once per distinct input), ``W L``, the map back ``B L^-1`` and the
    output-error product ``B L``, each beside the plain operation it replaced."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(fan_in + 512, fan_in, generator=gen, dtype=torch.float64)
    moment = x.T @ x / x.shape[0]
    del x
    lower = cholesky(moment)[0]
    root = lower.float()
    w = torch.randn(out, fan_in, generator=gen)
    b = torch.randn(rank, fan_in, generator=gen)
    stages = {
        "Cholesky of the second moment, blocked": best(lambda: cholesky(moment)),
        "Cholesky, LAPACK potrf (before)": best(lambda: torch.linalg.cholesky_ex(moment)),
        "W L, triangular blocks": best(lambda: times_lower(w, root)),
        "W L, full product (before)": best(lambda: w @ root),
        "B L^-1 (triangular solve)": best(lambda: torch.linalg.solve_triangular(root, b, upper=False, left=False)),
        "B L (output error), triangular blocks": best(lambda: times_lower(b, root)),
    }
    print(f"whitening a {fan_in}-wide input (float64 factor), {out}x{fan_in} float32 weight, rank {rank}")
    for name, seconds in stages.items():
        print(f"  {name:<55} {seconds:7.3f} s")


if __name__ == "__main__":
    main()
