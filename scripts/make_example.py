"""Build the bundled example checkpoint for `make demo`.

A small transformer-like model with a conv stem, saved as safetensors. Weights are
synthesised with the power-law singular-value decay of trained layers (sigma_i ~ i^-alpha)
so that the plan shows realistic trade-offs. Deterministic: the same bytes every run.

    python scripts/make_example.py build/example/model.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def decaying(out: int, fan_in: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    k = min(out, fan_in)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(fan_in, k, generator=gen, dtype=torch.float64))
    sigma = torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    w = (u * sigma) @ v.T
    return (w / w.std() * (2.0 / (out + fan_in)) ** 0.5).to(torch.float32)


def build(hidden: int = 512, mlp: int = 2048, layers: int = 2, vocab: int = 8000) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    sd["stem.conv.weight"] = decaying(hidden, 64 * 9, 0.8, gen).reshape(hidden, 64, 3, 3)
    sd["stem.conv.bias"] = torch.zeros(hidden)
    sd["stem.bn.weight"] = torch.ones(hidden)
    sd["stem.bn.bias"] = torch.zeros(hidden)
    sd["stem.bn.running_mean"] = torch.zeros(hidden)
    sd["stem.bn.running_var"] = torch.ones(hidden)
    sd["stem.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    sd["embed_tokens.weight"] = torch.randn(vocab, hidden, generator=gen) * 0.02
    sd["position_ids"] = torch.arange(512, dtype=torch.int64)[None]
    for i in range(layers):
        p = f"blocks.{i}"
        for name, alpha in (("q_proj", 0.9), ("k_proj", 1.0), ("v_proj", 0.5), ("o_proj", 0.6)):
            sd[f"{p}.attn.{name}.weight"] = decaying(hidden, hidden, alpha, gen)
            sd[f"{p}.attn.{name}.bias"] = torch.zeros(hidden)
        sd[f"{p}.mlp.up.weight"] = decaying(mlp, hidden, 0.7, gen)
        sd[f"{p}.mlp.up.bias"] = torch.zeros(mlp)
        sd[f"{p}.mlp.down.weight"] = decaying(hidden, mlp, 0.7, gen)
        sd[f"{p}.mlp.down.bias"] = torch.zeros(hidden)
        sd[f"{p}.norm.weight"] = torch.ones(hidden)
        sd[f"{p}.norm.bias"] = torch.zeros(hidden)
    sd["head.weight"] = decaying(10, hidden, 0.5, gen)
    sd["head.bias"] = torch.zeros(10)
    return sd


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/example/model.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(build(), str(out), metadata={"format": "pt"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
