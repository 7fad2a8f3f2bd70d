"""The plan's per-layer work: inspecting weights while planning, factorizing each planned layer.

Formats call :meth:`LayerWork.factorize` for every layer they write, whatever they write it into
(state-dict tensors, a TorchScript or ``.pt2`` graph): plain or whitened, on the configured
engine and device, with a per-layer seed, and the numbers the report needs.
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from factorize_cli.config import FactorizeConfig
from factorize_cli.formats.base import Checkpoint, prefetch
from factorize_cli.memory import give_back
from factorize_cli.planning import LayerPlan
from factorize_cli.progress import Progress, Silent
from factorize_cli.report import LayerResult
from factorize_cli.selection import SkipReason
from factorize_cli.whitening import Whitener

if TYPE_CHECKING:  # torch is imported where weights are read: a header-only plan needs none
    import torch

    from factorize_cli.factorization import Outcome


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on the order layers are processed in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


class NonFiniteWeight(Exception):
    """A planned layer's weight holds NaN or Inf (found while factorizing a plan made from headers)."""

    def __init__(self, *names: str) -> None:
        super().__init__(f"{', '.join(names)}: weight holds NaN or Inf values")
        self.names = frozenset(names)


@dataclass
class LayerWork:
    """Factorizes planned layers; the writer records each result and advances the progress.

    ``check_finite``: the plan was made without reading the weights, so each weight is checked here,
    on the read that factorizes it, and :class:`NonFiniteWeight` sends the caller back to planning."""

    config: FactorizeConfig
    whitener: Whitener
    progress: Progress = field(default_factory=Silent)
    results: dict[str, LayerResult] = field(default_factory=dict)
    check_finite: bool = False

    def factorize(self, layer: LayerPlan, weight: torch.Tensor) -> tuple[Outcome, LayerResult]:
        """The factors of one planned layer (whitened when calibrated) and what they achieved."""
        from factorize_cli.factorization import all_finite, factorize_checked

        config, weight = self.config, weight.detach()
        if self.check_finite and not all_finite(weight):
            raise NonFiniteWeight(layer.name)
        seed = layer_seed(config.seed, layer.name)
        whitened = self.whitener.factorize(weight, layer, engine=config.svd, seed=seed, device=config.device) \
            if layer.calibrated else None
        if whitened is None or isinstance(whitened, str):  # not calibrated, or why whitening failed
            outcome = factorize_checked(weight, layer.geometry, layer.rank, engine=config.svd, seed=seed,
                                        device=config.device)
            output_error, fallback = None, whitened
        else:
            outcome, output_error, fallback = whitened.outcome, whitened.output_error, None
        factors = outcome.factors
        give_back()  # the layer's temporaries, before the next layer's read or math
        full = len(factors.sigma) == layer.geometry.max_rank
        return outcome, LayerResult(
            outcome.achieved_error, factors.stats.energy_kept, outcome.norm, outcome.engine,
            factors.sigma if full else None, output_error,
            factors.stats.norm if output_error is not None else None, fallback)

    def record(self, layer: LayerPlan, outcome_and_result: tuple[Outcome, LayerResult]) -> Outcome:
        outcome, self.results[layer.name] = outcome_and_result
        self.progress.advance(layer.name)
        return outcome


@dataclass(frozen=True)
class GivenFactors:
    first: torch.Tensor
    second: torch.Tensor


@dataclass(frozen=True)
class Given:
    """An outcome whose factors were computed before the writer asked (what writers read of an Outcome)."""

    factors: GivenFactors


@dataclass
class GivenWork:
    """The writer's per-layer work when each layer's factors were computed before writing (by a live run,
    or by the ranks of a distributed run, in the journal): ``lookup(layer)`` gives them and the result.
    The writer does not read the weights of such layers."""

    lookup: Callable[[LayerPlan], tuple[Given, LayerResult]]
    progress: Progress = field(default_factory=Silent)
    results: dict[str, LayerResult] = field(default_factory=dict)
    ready_shards: dict | None = None  # shards of a folder output other processes wrote: {name: path}
    reads_weights = False

    def factorize(self, layer: LayerPlan, weight: object) -> tuple[Given, LayerResult]:
        return self.lookup(layer)

    def record(self, layer: LayerPlan, outcome_and_result: tuple[Given, LayerResult]) -> Given:
        outcome, self.results[layer.name] = outcome_and_result
        self.progress.advance(layer.name)
        return outcome


NON_FINITE = "weight holds NaN or Inf values"


def looker(config: FactorizeConfig, whitener: Whitener, *, spectra: bool,
           non_finite: frozenset[str] = frozenset()) -> Callable[[LayerPlan, Any], LayerPlan]:
    """``look(layer, weight)`` for a layer still in the running (``weight`` None when only headers are
    read): refuse non-finite weights (and the layers in ``non_finite``, found so by an earlier read), note
    whether activation statistics cover it, and read its spectrum (of ``W S`` when whitened) if asked."""
    def look(layer: LayerPlan, weight: Any) -> LayerPlan:
        from factorize_cli.factorization import all_finite, choose_engine, singular_values  # torch: not for headers

        if weight is not None and tuple(weight.shape) != layer.candidate.weight.shape:
            raise RuntimeError(f"internal error: read-ahead out of step at {layer.name}")
        if layer.name in non_finite or (weight is not None and not all_finite(weight)):
            return layer.skipped(SkipReason.NON_FINITE, NON_FINITE)
        if whitener.active:
            why_not = whitener.why_not(layer)
            layer = replace(layer, calibrated=why_not is None, detail=why_not or "",
                            sensitivity=whitener.sensitivity(layer.name) if why_not is None else None)
        if not spectra:
            return layer
        engine = config.svd if config.svd in ("exact", "gram") else choose_engine(layer.geometry)
        if layer.calibrated:
            whitened = whitener.spectrum(weight, layer, engine=engine, device=config.device)
            if not isinstance(whitened, str):
                return replace(layer, spectrum=whitened)
            layer = replace(layer, calibrated=False, detail=whitened)
        return replace(layer, spectrum=singular_values(weight, layer.geometry, engine=engine, device=config.device))

    return look


def split_cores(work: Any) -> tuple[int, int]:
    """(layers factorized at once, math threads each): two layers on CPUs with two or more cores; one
    when whitening (the whitener holds one float64 pair in memory at a time; two workers measured slower,
    waiting on each other's whitening), on an accelerator, or for work that computes nothing (factors given
    by a live run)."""
    import torch

    threads = torch.get_num_threads()
    config, whitener = getattr(work, "config", None), getattr(work, "whitener", None)
    if config is None or config.device != "cpu" or threads < 2 or (whitener is not None and whitener.active):
        return 1, threads
    return 2, threads // 2


def each_layer(checkpoint: Checkpoint, layers: list[LayerPlan], fn: Callable[[LayerPlan, Any], Any],
               work: Any) -> Iterator[tuple[LayerPlan, Future]]:
    """``(layer, future of fn(layer, weight))`` in order, each weight read ahead, as many layers at a time and
    on as many math threads each as factorizing uses (:func:`split_cores`): results then do not depend on
    how many processes share the layers. Closed early, it joins no thread (see formats.base.prefetch)."""
    import torch

    workers, threads = split_cores(work)
    weights = prefetch(checkpoint, (layer.candidate.weight.key for layer in layers))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="factorize-math")
    pending: collections.deque = collections.deque()
    saved, finished = torch.get_num_threads(), False
    torch.set_num_threads(threads)  # worker threads inherit it
    try:
        for layer in layers:
            pending.append((layer, pool.submit(fn, layer, next(weights))))
            if len(pending) >= workers:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
        finished = True
    finally:
        weights.close()
        pool.shutdown(wait=finished, cancel_futures=True)
        torch.set_num_threads(saved)


def inspect_all(checkpoint: Checkpoint, layers: list[LayerPlan], look: Callable[[LayerPlan, Any], LayerPlan],
                work: LayerWork, progress: Progress) -> dict[str, LayerPlan]:
    """``look(layer, weight)`` for each layer (:func:`each_layer`): spectra computed as factorizing would
    compute them, two layers at a time on two cores."""
    found: dict[str, LayerPlan] = {}
    with closing(each_layer(checkpoint, layers, look, work)) as looked:
        for layer, future in looked:
            found[layer.name] = future.result()
            progress.advance(layer.name)
    return found
