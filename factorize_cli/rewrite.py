"""State-dict key rewriting: where each output tensor goes and what it is made from.

Keys follow Composer's ``FactorizedLinear``/``FactorizedConv2d``: ``<layer>.weight`` and
``<layer>.bias`` become ``<layer>.module0.weight``, ``<layer>.module1.weight`` and
``<layer>.module1.bias`` at the position of the original weight; every other key keeps
its place. The layout is computed from the plan alone, before any data is read.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from factorize_cli.errors import InputError
from factorize_cli.execution import split_cores
from factorize_cli.formats.base import Checkpoint
from factorize_cli.formats.safetensors import OutputTensor
from factorize_cli.planning import LayerPlan, Plan

if TYPE_CHECKING:
    import torch

    from factorize_cli.execution import LayerWork
    from factorize_cli.factorization import Factors


class Role(str, Enum):
    COPY = "copy"
    FIRST = "module0.weight"
    SECOND = "module1.weight"
    BIAS = "module1.bias"


@dataclass(frozen=True)
class Placed:
    """One output tensor: its layout entry, its role, and the layer it belongs to (if any)."""

    entry: OutputTensor
    role: Role
    layer: LayerPlan | None = None


def factor_key(layer_name: str, role: Role) -> str:
    return f"{layer_name}.{role.value}" if layer_name else role.value


def output_layout(checkpoint: Checkpoint, plan: Plan) -> list[Placed]:
    by_weight = {layer.candidate.weight.key: layer for layer in plan.to_factorize}
    moved_bias = {layer.candidate.bias.key for layer in plan.to_factorize if layer.candidate.bias}
    placed: list[Placed] = []
    for info in checkpoint.infos:
        if info.key in moved_bias:
            continue
        layer = by_weight.get(info.key)
        if layer is None:
            placed.append(Placed(OutputTensor(info.key, info.shape, info.dtype, info.key), Role.COPY))
            continue
        geo, rank = layer.geometry, layer.rank
        assert rank is not None
        first, second = geo.factor_shapes(rank)
        placed.append(Placed(OutputTensor(factor_key(layer.name, Role.FIRST), first, info.dtype, info.key),
                             Role.FIRST, layer))
        placed.append(Placed(OutputTensor(factor_key(layer.name, Role.SECOND), second, info.dtype, info.key),
                             Role.SECOND, layer))
        if geo.factorized_has_bias():
            bias = layer.candidate.bias
            placed.append(Placed(OutputTensor(factor_key(layer.name, Role.BIAS), (geo.out_features,),
                                              bias.dtype if bias else info.dtype, info.key), Role.BIAS, layer))
    seen: set[str] = set()
    for p in placed:
        if p.entry.key in seen:
            raise InputError(f"{checkpoint.path}: output key {p.entry.key} would be written twice "
                             "(does the input already hold factorized layers of that name?)")
        seen.add(p.entry.key)
    return placed


FACTORS = (Role.FIRST, Role.SECOND)


def _sources(layout: list[Placed], weights: bool) -> Iterator[str]:
    """The input keys :func:`execute` reads, in the order it reads them (``weights``: the factorized
    layers' weights too, unless their factors were computed before). A layer's weight is read for the
    first of its factors in the layout (a shard may begin with a second factor)."""
    seen: set[str] = set()
    for placed in layout:
        if placed.role is Role.COPY:
            yield placed.entry.source
        elif placed.role in FACTORS and placed.layer.name not in seen:
            seen.add(placed.layer.name)
            if weights:
                yield placed.layer.candidate.weight.key
        elif placed.role is Role.BIAS and placed.layer.candidate.bias is not None:
            yield placed.layer.candidate.bias.key


def execute(checkpoint: Checkpoint, layout: list[Placed], work: LayerWork) -> Iterator[torch.Tensor]:
    """Yield the output tensors in layout order. Each layer is factorized when its weight has been
    read (read ahead on a thread), on a pool of workers that splits the cores between two layers at a
    time: results are taken in layout order, so the output does not depend on which finishes first."""
    import torch

    from factorize_cli.formats.base import prefetch

    workers, threads = split_cores(work)
    # with two workers, one layer queued beyond those running: no core idles behind a slower front layer
    # (one worker runs each layer on every core, and a layer still running when the caller abandons the
    # output would outlive it)
    queued = 1 if workers > 1 else 0
    reads = prefetch(checkpoint, _sources(layout, getattr(work, "reads_weights", True)))
    window: collections.deque = collections.deque()  # (placed, value) not yet yielded, in layout order
    last: list[Factors] = []  # the factors of the layer being yielded (its other factor follows)

    def pending() -> int:
        return sum(isinstance(value, Future) for _, value in window)

    def front() -> torch.Tensor:
        placed, value = window.popleft()
        if isinstance(value, Future):  # the layer's first factor in this layout
            last[:] = [work.record(placed.layer, value.result()).factors]
        if placed.role in FACTORS:
            return last[0].first if placed.role is Role.FIRST else last[0].second
        return value

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # worker threads inherit it: one math thread per core, no oversubscription
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="factorize-math")
    finished = False
    try:
        for item in _staged(layout, reads, pool, work):
            window.append(item)
            while pending() >= workers + queued:
                yield front()
        while window:
            yield front()
        finished = True
    finally:
        # Abandoned (an error, a NaN weight): no waiting for a running layer, which may be during a garbage
        # collection that must not join threads (see formats.base.prefetch); it finishes on its own.
        reads.close()
        pool.shutdown(wait=finished, cancel_futures=True)
        torch.set_num_threads(saved)


def _staged(layout: list[Placed], reads: Iterator, pool: ThreadPoolExecutor, work: LayerWork) -> Iterator:
    """(placed, a tensor, a Future of a layer's factors, or None for a second factor) in layout order."""
    import torch

    weights = getattr(work, "reads_weights", True)
    seen: set[str] = set()
    for placed in layout:
        layer = placed.layer
        if placed.role is Role.COPY:
            yield placed, next(reads)
        elif placed.role in FACTORS and layer.name not in seen:
            seen.add(layer.name)
            yield placed, pool.submit(work.factorize, layer, next(reads) if weights else None)
        elif placed.role in FACTORS:
            yield placed, None
        else:  # Role.BIAS
            bias = layer.candidate.bias
            yield placed, next(reads) if bias else torch.zeros(placed.entry.shape, dtype=getattr(torch, placed.entry.dtype))


def placed_shards(checkpoint: Checkpoint, layout: list[Placed]) -> dict[str, list[Placed]]:
    """The shards of a folder output (as :func:`factorize_cli.formats.write_shard_set` names and fills
    them), each with the placed tensors it holds, in layout order."""
    from factorize_cli.formats import DEFAULT_MAX_SHARD_BYTES, assign_shards

    by_key = {p.entry.key: p for p in layout}
    shards = assign_shards(checkpoint, [p.entry for p in layout], DEFAULT_MAX_SHARD_BYTES)
    return {name: [by_key[e.key] for e in entries] for name, entries in shards.items()}


def unwritten(checkpoint: Checkpoint, layout: list[Placed], ready: dict[str, Path] | None) -> list[Placed]:
    """The layout without the tensors of shards that are ``ready`` (written by other processes)."""
    if not ready:
        return layout
    done = {p.entry.key for name, placed in placed_shards(checkpoint, layout).items() if name in ready
            for p in placed}
    return [p for p in layout if p.entry.key not in done]
