"""Calibration statistics: what each layer's inputs look like, for data-aware factorization.

For every candidate layer, the float64 sums of ``x^T x`` and ``x`` over all rows its input matrix has
(tokens for a Linear; unfolded ``c*k`` / ``c*kh*kw`` patches for a Conv1d / Conv2d, see
:func:`conv_rows`) and the row count. They are collected with forward pre-hooks while the model runs on
the caller's batches (memory stays bounded whatever the number of batches), and stored as safetensors
keyed by layer name: ``<layer>.xtx``, ``<layer>.sum``, ``<layer>.count``. Layers that read the same
input (q/k/v, gate/up) have identical statistics: format ``/2`` stores them once, under the first such
layer, and the metadata's ``aliases`` maps each other layer to it. :class:`StatsFile` reads a file
lazily, one layer at a time (an LLM's statistics are tens of GB); ``/1`` files are still read.

    stats = collect_activation_stats(model, batches)
    save_activation_stats(stats, "stats.safetensors")
    factorize apply model.safetensors small.safetensors --calibration stats.safetensors
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from factorize_cli import __version__
from factorize_cli.errors import InputError
from factorize_cli.formats.base import dtype_name
from factorize_cli.orientation import is_transformers_conv1d

if TYPE_CHECKING:
    from factorize_cli.distributed import Group

FORMAT = "factorize-activation-stats/2"
READABLE_FORMATS = ("factorize-activation-stats/1", FORMAT)
SENSITIVITY_KEY = "sensitivity"  # metadata: {layer: measured output sensitivity} (factorize_cli.sensitivity)
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


def input_rows(layer: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The rows the layer's weight matrix multiplies: tokens for a Linear, unfolded patches for a conv.
    ``keep`` (``batch x tokens``, bool: a batch's attention mask) leaves out a token-wise layer's rows of
    padding when its input is ``batch x tokens x features``."""
    if isinstance(layer, nn.Linear) or is_transformers_conv1d(layer):
        if keep is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(keep.shape):
            return x[keep.to(x.device)]
        return x.reshape(-1, x.shape[-1])
    return conv_rows(x, layer.kernel_size, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                     padding_mode=layer.padding_mode)


def conv_rows(x: torch.Tensor, kernel: tuple[int, ...], *, stride: tuple[int, ...], padding: tuple[int, ...] | str,
              dilation: tuple[int, ...], padding_mode: str = "zeros") -> torch.Tensor:
    """The rows a Conv1d/Conv2d weight's ``d x (c*k...)`` matrix multiplies: ``x`` (``N x c x spatial``)
    padded as the conv pads it (``padding`` per spatial dim, or ``'same'``/``'valid'``; ``padding_mode`` as
    nn.Conv's), then unfolded into one row of ``c*k...`` values per output position. The rows are copies of
    input values (or padding), so any route to them gives the same bits."""
    if padding == "valid":
        pairs = [(0, 0)] * len(kernel)
    elif padding == "same":  # as torch pads it: the odd unit of padding goes after
        pairs = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    else:
        pairs = [(p, p) for p in padding]
    pads = [side for pair in reversed(pairs) for side in pair]  # F.pad wants the last dim first
    if any(pads):
        x = nn.functional.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
    if len(kernel) == 2:
        patches = nn.functional.unfold(x, kernel, dilation=dilation, stride=stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N*L, c*kh*kw)
    (k,), (d,), (s,) = kernel, dilation, stride
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


def reduce_stats(stats: Mapping[str, ActivationStats], group: Group) -> None:
    """Sum each layer's statistics over the ranks of a torchrun launch, in place: each rank ran its share
    of the data, and the float64 sums and row counts of the shares add up to those of the whole. Layers
    go in sorted order (every rank must issue the same collectives in the same order); the counts and
    sum vectors travel as one tensor each, each ``xtx`` on its own. A single process does nothing."""
    if not group.distributed:
        return
    names = sorted(stats)
    layouts = group.gather([(name, stats[name].total.numel()) for name in names])
    if any(layout != layouts[0] for layout in layouts):
        raise RuntimeError("the ranks found different layers to calibrate; are they running the same model?")
    if not names:
        return
    counts = group.all_reduce_(torch.tensor([stats[name].count for name in names], dtype=torch.int64))
    totals = group.all_reduce_(torch.cat([stats[name].total.to(torch.float64) for name in names]))
    for name, count, total in zip(names, counts.tolist(), totals.split([stats[n].total.numel() for n in names])):
        s = stats[name]
        s.count, s.total = int(count), total.clone()
        group.all_reduce_(s.xtx)


def padding_mask(batch: Any) -> torch.Tensor | None:
    """Which tokens of a keyword batch are real (its ``attention_mask``, as bool), or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def run_batch(model, batch: Any) -> Any:
    """Call ``model`` on one batch: a tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def shared_inputs(stats: Mapping[str, ActivationStats]) -> dict[str, str]:
    """``{layer: canonical layer}`` for every layer whose statistics equal an earlier layer's:
    grouped by row count and the bits of the sum vector, then confirmed with ``torch.equal``."""
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    aliases: dict[str, str] = {}
    for name, s in stats.items():
        total = s.total.detach().to("cpu", torch.float64).contiguous()
        group = groups.setdefault((s.count, tuple(total.view(torch.int64).tolist())), [])
        same = next((c for c in group if torch.equal(stats[c].xtx, s.xtx)), None)
        if same is None:
            group.append(name)
        else:
            aliases[name] = same
    return aliases


def save_activation_stats(stats: Mapping[str, ActivationStats], path: str | Path,
                          metadata: Mapping[str, str] | None = None) -> None:
    """Write ``stats`` as safetensors; layers with identical statistics share one set of tensors."""
    from factorize_cli.atomic import atomic_path
    from factorize_cli.formats.safetensors import OutputTensor, write_safetensors

    aliases = shared_inputs(stats)
    tensors: dict[str, torch.Tensor] = {}
    for name, s in stats.items():
        if name in aliases:
            continue
        tensors[f"{name}.xtx"] = s.xtx.to(torch.float64)
        tensors[f"{name}.sum"] = s.total.to(torch.float64)
        tensors[f"{name}.count"] = torch.tensor(s.count, dtype=torch.int64)
    layout = [OutputTensor(k, tuple(v.shape), dtype_name(v.dtype)) for k, v in tensors.items()]
    meta = {"format": FORMAT, "producer": f"factorize {__version__}", "layers": json.dumps(sorted(stats)),
            "aliases": json.dumps(dict(sorted(aliases.items()))), **dict(metadata or {})}
    with atomic_path(Path(path)) as tmp:
        write_safetensors(tmp, layout, iter(tensors.values()), meta)


class StatsFile:
    """Activation statistics on disk, read one layer at a time (the file stays open until closed).

    Opening checks the header only: every layer's tensors exist with consistent shapes. A
    layer's input width comes from the header; its row count is a one-element read; its ``xtx``
    is read only by :meth:`second_moment` or :meth:`read`.
    """

    def __init__(self, path: str | Path) -> None:
        from factorize_cli.formats import open_checkpoint

        self.path = str(path)
        self._file = open_checkpoint(path)
        try:
            self.layers, self._aliases = self._check()
        except BaseException:
            self._file.close()
            raise
        self._names = frozenset(self.layers)
        self._counts: dict[str, int] = {}

    def _bad(self, why: str) -> InputError:
        return InputError(f"{self.path}: {why}")

    def _check(self) -> tuple[tuple[str, ...], dict[str, str]]:
        meta = self._file.metadata
        if meta.get("format") not in READABLE_FORMATS:
            raise self._bad(f"not activation statistics written by factorize (metadata format "
                            f"{meta.get('format')!r}, expected {FORMAT!r})")
        try:
            layers, aliases = json.loads(meta.get("layers", "[]")), json.loads(meta.get("aliases", "{}"))
        except ValueError:
            raise self._bad("the statistics' layer list is not JSON") from None
        if not (isinstance(layers, list) and all(isinstance(n, str) for n in layers) and isinstance(aliases, dict)):
            raise self._bad("the statistics' metadata lists no layers")
        for name, target in aliases.items():
            if name not in layers or target not in layers or target in aliases:
                raise self._bad(f"statistics of {name} point to {target!r}, which holds none")
        for name in layers:
            if name in aliases:
                continue
            xtx, total, count = (self._file.info(f"{name}.{part}") for part in ("xtx", "sum", "count"))
            if xtx is None or total is None or count is None:
                raise self._bad(f"statistics of {name} are incomplete")
            if len(xtx.shape) != 2 or xtx.shape[0] != xtx.shape[1] or total.shape != (xtx.shape[0],) \
                    or count.numel != 1:
                raise self._bad(f"statistics of {name} have inconsistent shapes")
        return tuple(layers), dict(aliases)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def sensitivity(self, name: str) -> float | None:
        """The layer's measured effect on the model output, when ``factorize calibrate`` measured it."""
        if not hasattr(self, "_sensitivity"):
            try:
                raw = json.loads(self._file.metadata.get(SENSITIVITY_KEY, "{}"))
                self._sensitivity = {str(k): float(v) for k, v in raw.items() if float(v) >= 0}
            except (ValueError, TypeError, AttributeError):
                raise self._bad("its sensitivity metadata is not a JSON map of layer names to numbers") from None
        return self._sensitivity.get(name)

    def canonical(self, name: str) -> str:
        """The layer whose tensors hold ``name``'s statistics (itself unless its input is shared)."""
        return self._aliases.get(name, name)

    def fan_in(self, name: str) -> int:
        info = self._file.info(f"{self.canonical(name)}.xtx")
        if info is None:
            raise KeyError(name)
        return info.shape[0]

    def count(self, name: str) -> int:
        canonical = self.canonical(name)
        if canonical not in self._counts:
            self._counts[canonical] = int(self._file.get(f"{canonical}.count").reshape(()))
        return self._counts[canonical]

    def second_moment(self, name: str) -> torch.Tensor:
        """``xtx / count`` in float64: the one read of the layer's (large) matrix."""
        xtx = self._file.get(f"{self.canonical(name)}.xtx").to(torch.float64)
        return xtx.div_(max(self.count(name), 1))

    def read(self, name: str) -> ActivationStats:
        canonical = self.canonical(name)
        xtx, total = (self._file.get(f"{canonical}.{part}").to(torch.float64) for part in ("xtx", "sum"))
        return ActivationStats(xtx, total, self.count(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> StatsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_activation_stats(path: str | Path) -> dict[str, ActivationStats]:
    """Every layer's statistics in memory (layers that share an input get their own copies)."""
    out: dict[str, ActivationStats] = {}
    first: dict[str, ActivationStats] = {}  # by canonical layer
    with StatsFile(path) as stats:
        for name in stats:
            s = first.get(stats.canonical(name))
            if s is None:
                out[name] = first[stats.canonical(name)] = stats.read(name)
            else:
                out[name] = ActivationStats(s.xtx.clone(), s.total.clone(), s.count)
    return out
