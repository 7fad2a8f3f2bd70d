"""The naive way, for the benchmark: load everything, full float32 SVD per weight, save.

    python scripts/naive_baseline.py in.safetensors out.safetensors [--min-features 512] [--latent 0.25]

Selects what `factorize apply` selects with the ratio policy (2-D weights outside embeddings,
min(in, out) >= min-features, rank = int(latent * min(in, out)) within break-even) and writes
Composer-style keys, so both outputs hold the same tensors.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--min-features", type=int, default=512)
    ap.add_argument("--latent", type=float, default=0.25)
    args = ap.parse_args()
    state = load_file(args.input)
    out: dict[str, torch.Tensor] = {}
    for key, w in state.items():
        name = key.removesuffix(".weight")
        if key.endswith(".bias") and f"{key.removesuffix('.bias')}.weight" in state:
            continue  # moved with its weight below, or copied there
        vocabulary = w.dim() == 2 and w.shape[0] >= 16384 and w.shape[0] >= 8 * w.shape[1]
        if not key.endswith(".weight") or w.dim() != 2 or "embed" in key or vocabulary or \
                min(w.shape) < args.min_features:
            out[key] = w
            bias = state.get(f"{name}.bias")
            if key.endswith(".weight") and bias is not None:
                out[f"{name}.bias"] = bias
            continue
        m, n = w.shape
        rank = max(1, int(args.latent * min(m, n)))
        if rank > (m * n - 1) // (m + n):
            out[key] = w
            continue
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        root = s[:rank].sqrt()
        out[f"{name}.module0.weight"] = (root[:, None] * vh[:rank]).to(w.dtype).contiguous()
        out[f"{name}.module1.weight"] = (u[:, :rank] * root).to(w.dtype).contiguous()
        if f"{name}.bias" in state:
            out[f"{name}.module1.bias"] = state[f"{name}.bias"]
    save_file(out, args.output)


if __name__ == "__main__":
    main()
