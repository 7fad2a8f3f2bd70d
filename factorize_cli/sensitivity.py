"""Each layer's effect on the model's output, measured on calibration data, to weigh the budget.

The whitened spectrum's tail says how much of a layer's *output* a rank drops (mean squared error per
input row), but one unit of that error does not cost the model the same everywhere: in MiniLM a query
projection's error reaches the sentence embedding about fifty times less than an FFN output's, and
attention softmax, residual sums and layer norms scale errors differently from layer to layer. So
the allocation weighs each layer's tail by a measured factor:

    sensitivity = (||y' - y||^2 / ||y||^2)  /  (mean over rows of ||(W_r - W) x||^2)

where ``y`` is the model's output on the first calibration batches (masked by ``attention_mask`` when
there is one), ``y'`` the output with this one layer replaced by its whitened rank-``r`` approximation
``W_r``, and the denominator is the tail of the layer's whitened spectrum at ``r`` (the same unit the
allocator sums). ``r`` is the rank the budget's fraction would give the layer uniformly (``factorize
calibrate`` measures at :data:`CALIBRATE_FRACTION`, stored in the statistics file). The product
``sensitivity x tail(rank)`` then predicts the relative model-output error each layer adds, which is
what the budget minimises. One forward pass over the measured batches per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from factorize_cli.geometry import Geometry

SAMPLES = 64  # calibration samples (rows of the first input) the sensitivities are measured on
CALIBRATE_FRACTION = 0.8  # the reference fraction `factorize calibrate` measures at (no budget known yet)


def first_samples(data: Iterable[Any], samples: int = SAMPLES) -> list[Any]:
    """The leading batches of ``data`` holding about ``samples`` samples (at least one batch)."""
    out, seen = [], 0
    for batch in data:
        out.append(batch)
        seen += _batch_size(batch)
        if seen >= samples:
            break
    return out


def reference_rank(geometry: Geometry, fraction: float) -> int:
    """The rank at which the layer's factors cost ``fraction`` of it: where its sensitivity is measured."""
    full = geometry.out_features * geometry.fan_in
    rank = round(fraction * full / (geometry.out_features + geometry.fan_in))
    return min(max(rank, 1), geometry.max_rank - 1)


class OutputProbe:
    """The model's output on a few batches (``run(batch)``), and its relative change when one weight is
    replaced."""

    def __init__(self, run: Callable[[Any], Any], batches: list[Any]) -> None:
        self.run, self.batches = run, batches
        self.reference = [self._output(b) for b in batches]
        self.energy = sum(float(y.square().sum()) for y in self.reference)

    def _output(self, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            y = _first_tensor(self.run(batch))
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        y = y.detach().to(torch.float64)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(y.shape[:2]) == tuple(mask.shape):
            y = y * mask.to(y.device, y.dtype).reshape(*mask.shape, *([1] * (y.dim() - 2)))
        return y

    def relative_change(self, weight: torch.Tensor, approx: torch.Tensor) -> float:
        """``||y' - y||^2 / ||y||^2`` with the live ``weight`` replaced by ``approx`` in place (restored after,
        bit for bit)."""
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.copy_(approx.to(weight.dtype))
            changed = sum(float((self._output(b) - y).square().sum()) for b, y in zip(self.batches, self.reference))
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        return changed / self.energy if self.energy > 0 else 0.0


def approximation(weight: torch.Tensor, geometry: Geometry, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``second @ first`` in the weight's own layout (``in x out`` for a transposed Conv1D)."""
    rank = first.shape[0]
    matrix = second.reshape(geometry.out_features, rank).to(torch.float64) @ \
        first.reshape(rank, -1).to(torch.float64)
    return matrix.T.contiguous() if geometry.transposed else matrix.reshape(weight.shape)


def layer_sensitivity(probe: OutputProbe, live: torch.Tensor, geometry: Geometry, pair: tuple[torch.Tensor, torch.Tensor],
                      fraction: float, *, engine: str, seed: int, device: str) -> float | None:
    """The layer's sensitivity (module docstring) at the reference rank for ``fraction``, from its
    whitening ``pair``; None when the approximation drops nothing or cannot be computed."""
    from factorize_cli.factorization import factorize_whitened

    weight = live.detach()  # the layer's live weight: replaced in place while the probe runs
    rank = reference_rank(geometry, fraction)
    try:
        whitened = factorize_whitened(weight, geometry, rank, *pair, engine=engine, seed=seed, device=device)
    except torch.linalg.LinAlgError:
        return None
    factors = whitened.outcome.factors
    tail = (whitened.output_error * factors.stats.norm) ** 2  # mean over rows of ||(W_r - W) x||^2
    if not tail > 0:
        return None
    return probe.relative_change(live, approximation(weight, geometry, factors.first, factors.second)) / tail


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model returned {type(out).__name__} holding no tensor")


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim()), 1)
