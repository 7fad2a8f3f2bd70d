"""Planning: a decision per candidate, collected into a :class:`Plan` that ``apply`` executes.

The plan is data. ``factorize plan`` prints it; ``factorize apply`` builds the same
object and executes it, so a dry run and a real run cannot disagree. Order of decisions:
selection rules (no data) -> inspection (NaN/Inf, spectra) -> ranks (pins, then the
policy, per layer or global) -> the break-even guard.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

from factorize_cli.config import (BudgetMetric, BudgetPolicy, EnergyPolicy, ErrorPolicy, FactorizeConfig,
                                  RatioPolicy)
from factorize_cli.errors import UsageError
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.policies import round_down, round_nearest, round_up
from factorize_cli.selection import Candidate, SkipReason, screen

if TYPE_CHECKING:
    import torch


class Action(str, Enum):
    FACTORIZE = "factorize"
    SKIP = "skip"


@dataclass(frozen=True)
class LayerPlan:
    candidate: Candidate
    action: Action
    rank: int | None  # the rank asked for (None when skipped before ranking)
    reason: SkipReason | None = None
    detail: str = ""
    pinned: bool = False  # rank set by --rank PATTERN=R
    calibrated: bool = False  # whitened by activation statistics: the spectrum is that of W S
    spectrum: torch.Tensor | None = field(default=None, compare=False, repr=False)  # float64 singular values
    sensitivity: float | None = None  # measured model-output error per unit of output error (calibrated budgets)

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def geometry(self) -> Geometry:
        return self.candidate.geometry

    @property
    def factorized(self) -> bool:
        return self.action is Action.FACTORIZE

    def skipped(self, reason: SkipReason, detail: str) -> LayerPlan:
        return replace(self, action=Action.SKIP, reason=reason, detail=detail)


@dataclass(frozen=True)
class Plan:
    source: str
    format: str
    config: FactorizeConfig
    layers: tuple[LayerPlan, ...]
    notes: tuple[str, ...] = ()

    @property
    def to_factorize(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.factorized)

    def layer(self, name: str) -> LayerPlan:
        return next(layer for layer in self.layers if layer.name == name)


Inspector = Callable[[LayerPlan], LayerPlan]


def build_plan(candidates: Iterable[Candidate], config: FactorizeConfig, *, source: str, fmt: str,
               inspect: Inspector | None = None, notes: Iterable[str] = ()) -> Plan:
    """Screen every candidate, inspect the data of the ones left, then rank them."""
    layers = []
    for candidate in candidates:
        screened = screen(candidate, config.selection)
        if screened.reason is not None:
            layers.append(LayerPlan(candidate, Action.SKIP, None, screened.reason, screened.detail))
            continue
        layer = LayerPlan(candidate, Action.FACTORIZE, None)
        layers.append(inspect(layer) if inspect is not None else layer)
    ranked, ranking = assign_ranks(layers, config)
    return Plan(source=source, format=fmt, config=config, layers=tuple(ranked), notes=(*notes, *ranking))


def ratio_rank(geometry: Geometry, policy: RatioPolicy) -> int:
    latent = policy.latent_features if geometry.kind is LayerKind.LINEAR else policy.latent_channels
    return latent.rank_for(geometry.min_dim)


def _pin(layer: LayerPlan, config: FactorizeConfig) -> int | None:
    return next((p.rank for p in config.pins if fnmatch.fnmatchcase(layer.name, p.pattern)), None)


def _spectrum(layer: LayerPlan) -> torch.Tensor:
    if layer.spectrum is None:
        raise RuntimeError(f"internal error: {layer.name} was planned without its spectrum")
    return layer.spectrum


def assign_ranks(layers: list[LayerPlan], config: FactorizeConfig) -> tuple[list[LayerPlan], list[str]]:
    step = config.rank_multiple
    out: list[LayerPlan] = []
    budgeted: list[int] = []
    for layer in layers:
        if not layer.factorized:
            out.append(layer)
            continue
        pinned = _pin(layer, config)
        if pinned is not None:
            out.append(_guard(replace(layer, rank=pinned, pinned=True), "pinned by --rank"))
            continue
        match config.policy:
            case RatioPolicy() as policy:
                rank = ratio_rank(layer.geometry, policy)
                out.append(_guard(replace(layer, rank=round_nearest(rank, step) if step > 1 else rank),
                                  "asked for by the latent size"))
            case EnergyPolicy(threshold=t):
                from factorize_cli.policies import rank_for_energy
                rank = round_up(rank_for_energy(_spectrum(layer), t), step)
                out.append(_guard(replace(layer, rank=rank), f"needed to keep {t:g} of the energy"))
            case ErrorPolicy(max_error=e):
                from factorize_cli.policies import rank_for_error
                rank = round_up(rank_for_error(_spectrum(layer), e), step)
                out.append(_guard(replace(layer, rank=rank), f"needed for error <= {e:g}"))
            case BudgetPolicy():
                budgeted.append(len(out))
                out.append(layer)
    notes: list[str] = []
    if budgeted:
        notes.append(_allocate(out, budgeted, config))
    return out, notes


def _guard(layer: LayerPlan, why: str) -> LayerPlan:
    """The break-even guard every policy obeys: a rank that saves nothing is not taken."""
    geo = layer.geometry
    assert layer.rank is not None
    if layer.rank > geo.break_even_rank:
        return layer.skipped(SkipReason.ABOVE_BREAK_EVEN,
                             f"rank {layer.rank} ({why}) saves nothing: break-even rank is {geo.break_even_rank}")
    return layer


def _cost(geo: Geometry, metric: BudgetMetric, rank: int | None) -> int:
    return geo.params(rank) if metric is BudgetMetric.PARAMS else geo.macs(rank)


def _allocate(out: list[LayerPlan], budgeted: list[int], config: FactorizeConfig) -> str:
    """Fill ``out[i]`` for i in ``budgeted`` with ranks from the global greedy allocation."""
    from factorize_cli.policies import BudgetError, BudgetLayer, allocate_budget

    policy = config.policy
    assert isinstance(policy, BudgetPolicy)
    step, metric = config.rank_multiple, policy.metric
    members: list[int] = []
    for i in budgeted:
        layer = out[i]
        ceiling = round_down(layer.geometry.break_even_rank, step)
        if ceiling < step:
            out[i] = replace(layer, rank=step).skipped(
                SkipReason.ABOVE_BREAK_EVEN,
                f"the smallest rank {step} saves nothing: break-even rank is {layer.geometry.break_even_rank}")
        else:
            members.append(i)
    pinned = [layer for layer in out if layer.factorized and layer.pinned]
    before = sum(_cost(out[i].geometry, metric, None) for i in members) + \
        sum(_cost(p.geometry, metric, None) for p in pinned)
    fixed = sum(_cost(p.geometry, metric, p.rank) for p in pinned)
    budget = policy.fraction * before - fixed
    # measured effect on the model output (a live run over data): used when every budgeted layer has one
    weighed = bool(members) and all(out[i].sensitivity is not None for i in members)
    items = []
    for i in members:
        geo = out[i].geometry
        base = _cost(geo, metric, 0)
        items.append(BudgetLayer(out[i].name, _spectrum(out[i]), _cost(geo, metric, 1) - base, base,
                                 round_down(geo.break_even_rank, step), whole_cost=_cost(geo, metric, None),
                                 min_dim=geo.min_dim, weight=out[i].sensitivity if weighed else 1.0))
    try:
        ranks = allocate_budget(items, budget, step)
    except BudgetError as e:
        raise UsageError(f"--rank-policy {metric.value}:{policy.fraction:g} cannot be met: {e}") from None
    whole = 0
    for i, item in zip(members, items):
        rank = ranks[item.name]
        if rank is None:  # None leaves it whole: counted below at its full cost
            whole += 1
            out[i] = out[i].skipped(SkipReason.KEPT_WHOLE, (
                f"the {metric.value} budget does better leaving it whole ({item.whole_cost:,}) than at any rank "
                f"up to {item.max_rank} (break-even rank is {out[i].geometry.break_even_rank})"))
        else:
            out[i] = replace(out[i], rank=rank)
    spent = fixed + sum(_cost(out[i].geometry, metric, out[i].rank) for i in members)
    kept = f", {whole} of them kept whole" if whole else ""
    if not before:
        return f"{metric.value} budget: no layers"
    weights = ("each layer's error weighed by its measured effect on the model output (model-output error per "
               "unit of layer output error, on the first calibration samples)") if weighed else \
        "every layer's squared error counted alike" + (" (whitened: output error)" if any(
            out[i].calibrated for i in members) else " (weight error)")
    return (f"{metric.value} budget: the budgeted layers keep {spent:,} of {before:,} "
            f"({spent / before:.4f}; target {policy.fraction:g}){kept}; {weights}")
