"""Calibration statistics: what each layer's inputs look like, for data-aware factorization.

For every candidate layer, the float64 sums of ``x^T x`` and ``x`` over all rows its input
matrix has (tokens for a Linear; unfolded ``c*kh*kw`` patches for a conv) and the row count.
They are collected with forward pre-hooks while the model runs on the caller's batches (memory
stays bounded whatever the number of batches), and stored as safetensors keyed by layer name:
``<layer>.xtx``, ``<layer>.sum``, ``<layer>.count``.

    stats = collect_activation_stats(model, batches)
    save_activation_stats(stats, "stats.safetensors")
    factorize apply model.safetensors small.safetensors --calibration stats.safetensors
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorize_cli import __version__
from factorize_cli.errors import InputError
from factorize_cli.orientation import is_transformers_conv1d

FORMAT = "factorize-activation-stats/1"
_ROWS = 4096  # rows per float64 block while accumulating


@dataclass
class ActivationStats:
    xtx: torch.Tensor  # sum of x^T x, float64, fan_in x fan_in
    total: torch.Tensor  # sum of x, float64, fan_in
    count: int  # rows seen

    @classmethod
    def empty(cls, fan_in: int) -> ActivationStats:
        return cls(torch.zeros(fan_in, fan_in, dtype=torch.float64), torch.zeros(fan_in, dtype=torch.float64), 0)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.xtx / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def add(self, rows: torch.Tensor) -> None:
        for block in rows.split(_ROWS):
            block = block.to(torch.float64)
            self.xtx += block.T @ block
            self.total += block.sum(0)
        self.count += rows.shape[0]


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight matrix multiplies: tokens for a Linear, unfolded patches for a conv."""
    if isinstance(layer, nn.Linear) or is_transformers_conv1d(layer):
        return x.reshape(-1, x.shape[-1])
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str) or any(layer.padding):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = nn.functional.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    if isinstance(layer, nn.Conv2d):
        patches = nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N*L, c*kh*kw)
    (k,), (d,), (s,) = layer.kernel_size, layer.dilation, layer.stride
    windows = x.unfold(2, (k - 1) * d + 1, s)[..., ::d]  # (N, c, L, k)
    return windows.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * k)  # (N*L, c*k)


CALIBRATED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # exactly these types, and transformers Conv1D


def _calibrated(module: nn.Module) -> bool:
    return (type(module) in CALIBRATED_TYPES and getattr(module, "groups", 1) == 1) or is_transformers_conv1d(module)


def _fan_in(module: nn.Module) -> int:
    """Columns of the layer's ``out x fan_in`` matrix (a Conv1D's weight is stored ``nx x nf``)."""
    return module.weight.shape[0] if is_transformers_conv1d(module) else module.weight[0].numel()


def collect_activation_stats(model: nn.Module, batches: Iterable[Any], *, layers: Iterable[str] | None = None
                             ) -> dict[str, ActivationStats]:
    """Run ``model`` on each batch (a tensor, a tuple of positional inputs, or a dict of keyword
    inputs) and accumulate each layer's input statistics. ``layers`` defaults to every
    ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (exactly those types) with ``groups == 1``, and every
    transformers ``Conv1D`` (GPT-2; its statistics are those of its ``nx`` inputs)."""
    wanted = set(layers) if layers is not None else None
    targets = {name: m for name, m in model.named_modules()
               if _calibrated(m) and (wanted is None or name in wanted)}
    if wanted is not None and (missing := wanted - set(targets)):
        raise KeyError(f"no nn.Linear/nn.Conv1d/nn.Conv2d/Conv1D named {sorted(missing)[0]!r}")
    stats = {name: ActivationStats.empty(_fan_in(m)) for name, m in targets.items()}
    handles = []
    for name, module in targets.items():
        def hook(layer, args, name=name):
            stats[name].add(input_rows(layer, args[0].detach()).cpu())
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def run_batch(model, batch: Any) -> Any:
    """Call ``model`` on one batch: a tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def save_activation_stats(stats: Mapping[str, ActivationStats], path: str | Path,
                          metadata: Mapping[str, str] | None = None) -> None:
    from factorize_cli.atomic import atomic_path
    from factorize_cli.formats.safetensors import OutputTensor, write_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for name, s in stats.items():
        tensors[f"{name}.xtx"] = s.xtx
        tensors[f"{name}.sum"] = s.total
        tensors[f"{name}.count"] = torch.tensor(s.count, dtype=torch.int64)
    layout = [OutputTensor(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()]
    meta = {"format": FORMAT, "producer": f"factorize {__version__}",
            "layers": json.dumps(sorted(stats)), **dict(metadata or {})}
    with atomic_path(Path(path)) as tmp:
        write_safetensors(tmp, layout, iter(tensors.values()), meta)


def load_activation_stats(path: str | Path) -> dict[str, ActivationStats]:
    from factorize_cli.formats import open_checkpoint

    with open_checkpoint(path) as ckpt:
        if ckpt.metadata.get("format") != FORMAT:
            raise InputError(f"{path}: not activation statistics written by factorize "
                             f"(metadata format {ckpt.metadata.get('format')!r}, expected {FORMAT!r})")
        out = {}
        for name in json.loads(ckpt.metadata.get("layers", "[]")):
            try:
                xtx, total, count = (ckpt.get(f"{name}.{part}") for part in ("xtx", "sum", "count"))
            except KeyError:
                raise InputError(f"{path}: statistics of {name} are incomplete") from None
            if xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1] or total.shape != (xtx.shape[0],):
                raise InputError(f"{path}: statistics of {name} have inconsistent shapes")
            out[name] = ActivationStats(xtx.to(torch.float64), total.to(torch.float64), int(count))
    return out
