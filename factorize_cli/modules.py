"""Python API for live models: Composer-compatible factorized modules and a converter.

    ranks = read_rank_map("out.safetensors")          # or the JSON report
    convert_to_factorized(model, ranks)                # swap nn.Linear/nn.Conv*/Conv1D for pairs
    model.load_state_dict(load_file("out.safetensors"), strict=True)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from factorize_cli.errors import InputError
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.orientation import is_transformers_conv1d


class FactorizedLinear(nn.Module):
    """``Linear(in, out)`` as ``Linear(in, r, bias=False)`` then ``Linear(r, out, bias)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.module0 = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.module1 = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module1(self.module0(x))

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int, *, from_weights: bool = True) -> FactorizedLinear:
        new = cls(layer.in_features, layer.out_features, rank, bias=layer.bias is not None,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        if from_weights:
            _load_factors(new, layer, Geometry.from_weight_shape(LayerKind.LINEAR, tuple(layer.weight.shape),
                                                                 layer.bias is not None))
        return new

    @classmethod
    def from_conv1d(cls, layer: nn.Module, rank: int, *, from_weights: bool = True) -> FactorizedLinear:
        """transformers' ``Conv1D(nf, nx)`` (weight ``nx x nf``, ``y = x @ W + b``) as the same pair:
        the factors are in nn.Linear orientation, like every other Linear's."""
        nx, nf = layer.weight.shape
        new = cls(nx, nf, rank, bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
        if from_weights:
            _load_factors(new, layer, Geometry.from_weight_shape(LayerKind.LINEAR, (nx, nf), layer.bias is not None,
                                                                 transposed=True))
        return new


class _FactorizedConv(nn.Module):
    """A conv ``c -> d`` as a same-kernel conv ``c -> r`` (no bias) then a pointwise conv ``r -> d`` (bias)."""

    conv: type[nn.Module]
    kind: LayerKind

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, padding_mode: str = "zeros", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.module0 = self.conv(in_channels, rank, kernel_size, stride=stride, padding=padding,
                                 dilation=dilation, bias=False, padding_mode=padding_mode,
                                 device=device, dtype=dtype)
        self.module1 = self.conv(rank, out_channels, 1, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module1(self.module0(x))

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int, *, from_weights: bool = True):
        if conv.groups != 1:
            raise ValueError(f"cannot factorize a grouped convolution (groups={conv.groups})")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        if from_weights:
            _load_factors(new, conv, Geometry.from_weight_shape(cls.kind, tuple(conv.weight.shape),
                                                                conv.bias is not None))
        return new


class FactorizedConv2d(_FactorizedConv):
    """``Conv2d(c, d, k)`` as a ``k x k`` conv ``c -> r`` (no bias) then a ``1 x 1`` conv ``r -> d`` (bias)."""

    conv = nn.Conv2d
    kind = LayerKind.CONV2D


class FactorizedConv1d(_FactorizedConv):
    """``Conv1d(c, d, k)`` as a ``k`` conv ``c -> r`` (no bias) then a ``1`` conv ``r -> d`` (bias)."""

    conv = nn.Conv1d
    kind = LayerKind.CONV1D


FACTORIZED = {nn.Linear: FactorizedLinear, nn.Conv1d: FactorizedConv1d, nn.Conv2d: FactorizedConv2d}


def _load_factors(new: nn.Module, old: nn.Module, geometry: Geometry) -> None:
    from factorize_cli.factorization import low_rank_factors

    factors = low_rank_factors(old.weight.detach().cpu(), geometry, new.rank)
    set_factors(new, factors.first, factors.second, old.bias)


def set_factors(pair: nn.Module, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy factors (``module0``'s weight, then ``module1``'s) and the original bias (zeros when the
    original had none) into a factorized pair, converting to the pair's dtype and device."""
    with torch.no_grad():
        pair.module0.weight.copy_(first)
        pair.module1.weight.copy_(second)
        if pair.module1.bias is not None:
            if bias is not None:
                pair.module1.bias.copy_(bias)
            else:
                pair.module1.bias.zero_()


def convert_to_factorized(model: nn.Module, ranks: Mapping[str, int], *, from_weights: bool = False) -> nn.Module:
    """Replace each named ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` by its factorized pair at a rank, in place;
    a transformers ``Conv1D`` (GPT-2) becomes a :class:`FactorizedLinear`, as the CLI writes it.

    Dtype, device, stride, padding, dilation and padding_mode are kept. With ``from_weights`` the
    pair starts from the truncated SVD of the current weight; otherwise load a checkpoint into it.
    """
    for name, rank in ranks.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"model has no submodule {name!r}") from None
        factorized = FACTORIZED.get(type(layer))
        if is_transformers_conv1d(layer):
            new = FactorizedLinear.from_conv1d(layer, rank, from_weights=from_weights)
        elif factorized is None:
            raise TypeError(f"{name} is a {type(layer).__name__}, not an nn.Linear, nn.Conv1d, nn.Conv2d or "
                            "transformers Conv1D")
        elif factorized is FactorizedLinear:
            new = factorized.from_linear(layer, rank, from_weights=from_weights)
        else:
            new = factorized.from_conv(layer, rank, from_weights=from_weights)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def read_rank_map(path: str | Path) -> dict[str, int]:
    """The ``{layer: rank}`` map of a factorized output or its JSON report. A folder output keeps it in its
    shard index, its ``model.safetensors`` metadata, or (a single ``pytorch_model.bin``) a sidecar file."""
    from factorize_cli.outputs import RANKS_METADATA_KEY

    path = Path(path)
    if path.is_dir():
        from factorize_cli.formats.hfmodel import rank_map_source

        path, kind = rank_map_source(path)
        if kind == "safetensors":
            return read_rank_map(path)
        meta = json.loads(path.read_text()).get("metadata", {})
        raw = meta.get(RANKS_METADATA_KEY)
    elif path.suffix == ".json":
        report = json.loads(path.read_text())
        return {e["name"]: e["rank"] for e in report["layers"] if e["action"] == "factorize"}
    else:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(RANKS_METADATA_KEY)
        except Exception as e:
            raise InputError(f"{path}: no rank map: not a safetensors file; pass the JSON report instead") from e
    if raw is None:
        raise InputError(f"{path}: carries no {RANKS_METADATA_KEY} metadata; pass the JSON report instead")
    return {str(k): int(v) for k, v in json.loads(raw).items()}
