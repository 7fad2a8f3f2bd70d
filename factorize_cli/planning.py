"""Planning: a pure decision per candidate, collected into a :class:`Plan` that ``apply`` executes.

The plan is data. ``factorize plan`` prints it; ``factorize apply`` builds the same
object and executes it, so a dry run and a real run cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum

from factorize_cli.config import FactorizeConfig, RatioPolicy
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.selection import Candidate, Screened, SkipReason, screen


class Action(str, Enum):
    FACTORIZE = "factorize"
    SKIP = "skip"


@dataclass(frozen=True)
class LayerPlan:
    candidate: Candidate
    action: Action
    rank: int | None  # the rank the policy asked for (None when skipped before ranking)
    reason: SkipReason | None = None
    detail: str = ""
    predicted_error: float | None = None  # from the spectrum, when planning read one
    energy_kept: float | None = None
    norm: float | None = None

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

    @property
    def to_factorize(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.factorized)

    def layer(self, name: str) -> LayerPlan:
        return next(layer for layer in self.layers if layer.name == name)


def requested_rank(geometry: Geometry, policy: RatioPolicy) -> int:
    match policy:
        case RatioPolicy(latent_features=features, latent_channels=channels):
            latent = features if geometry.kind is LayerKind.LINEAR else channels
            return latent.rank_for(geometry.min_dim)
    raise TypeError(f"unknown rank policy {policy!r}")


def rank_layer(screened: Screened, config: FactorizeConfig) -> LayerPlan:
    """The decision that needs shapes only: skip reasons from selection, then rank vs break-even."""
    candidate = screened.candidate
    if screened.reason is not None:
        return LayerPlan(candidate, Action.SKIP, None, screened.reason, screened.detail)
    geo = candidate.geometry
    rank = requested_rank(geo, config.policy)
    if rank > geo.break_even_rank:
        return LayerPlan(candidate, Action.SKIP, rank, SkipReason.ABOVE_BREAK_EVEN,
                         f"rank {rank} saves nothing: break-even rank is {geo.break_even_rank}")
    return LayerPlan(candidate, Action.FACTORIZE, rank)


Inspector = Callable[[LayerPlan], LayerPlan]


def build_plan(candidates: Iterable[Candidate], config: FactorizeConfig, *, source: str, fmt: str,
               inspect: Inspector | None = None) -> Plan:
    """Screen and rank every candidate; ``inspect`` looks at the data of layers still to factorize."""
    layers = []
    for candidate in candidates:
        layer = rank_layer(screen(candidate, config.selection), config)
        if layer.factorized and inspect is not None:
            layer = inspect(layer)
        layers.append(layer)
    return Plan(source=source, format=fmt, config=config, layers=tuple(layers))

