"""Frozen, validated configuration. Only the CLI parses strings into these."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum

from factorize_cli.errors import UsageError


@dataclass(frozen=True)
class Latent:
    """Composer's latent size: a fraction of ``min(in, out)`` when < 1, else an absolute rank."""

    value: float

    def __post_init__(self) -> None:
        v = self.value
        if not math.isfinite(v) or v <= 0:
            raise UsageError(f"latent size must be a fraction in (0, 1) or a rank >= 1, got {v!r}")
        if v >= 1 and v != int(v):
            raise UsageError(f"latent size {v!r} is neither a fraction below 1 nor a whole rank")

    @classmethod
    def parse(cls, text: str | float | int) -> Latent:
        try:
            return cls(float(text))
        except ValueError:
            raise UsageError(f"latent size {text!r} is not a number") from None

    @property
    def is_fraction(self) -> bool:
        return self.value < 1

    def rank_for(self, min_dim: int) -> int:
        """The rank this latent size asks for on a layer whose smaller side is ``min_dim``."""
        if self.is_fraction:
            return max(1, int(self.value * min_dim))
        return int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}"


@dataclass(frozen=True)
class SelectionConfig:
    """Which weights are candidates. Names and defaults follow Composer's Factorize."""

    factorize_linears: bool = True
    factorize_convs: bool = True
    min_features: int = 512
    min_channels: int = 512
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()  # 2-D weights stored in x out (transformers Conv1D) when unproven
    not_transposed: tuple[str, ...] = ()  # 2-D weights stored out x in (nn.Linear) when unproven

    def __post_init__(self) -> None:
        for name in ("min_features", "min_channels"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("include", "exclude", "transposed", "not_transposed"):
            if any(not pattern for pattern in getattr(self, name)):
                raise UsageError(f"empty --{name.replace('_', '-')} pattern")
        if both := sorted(set(self.transposed) & set(self.not_transposed)):
            raise UsageError(f"{both[0]!r} is given to both --transposed and --not-transposed")


@dataclass(frozen=True)
class RatioPolicy:
    """``ratio``: Composer's fixed latent size per layer kind."""

    latent_features: Latent = field(default_factory=lambda: Latent(0.25))
    latent_channels: Latent = field(default_factory=lambda: Latent(0.25))

    def describe(self) -> dict:
        return {"name": "ratio", "latent_features": self.latent_features.value,
                "latent_channels": self.latent_channels.value}


@dataclass(frozen=True)
class EnergyPolicy:
    """``energy:T``: per layer, the smallest rank keeping at least fraction T of ||W||_F^2."""

    threshold: float

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise UsageError(f"energy threshold must be in (0, 1], got {self.threshold!r}")

    def describe(self) -> dict:
        return {"name": "energy", "threshold": self.threshold}


@dataclass(frozen=True)
class ErrorPolicy:
    """``error:E``: per layer, the smallest rank whose relative Frobenius error is at most E."""

    max_error: float

    def __post_init__(self) -> None:
        if not 0 <= self.max_error < 1:
            raise UsageError(f"error bound must be in [0, 1), got {self.max_error!r}")

    def describe(self) -> dict:
        return {"name": "error", "max_error": self.max_error}


class BudgetMetric(str, Enum):
    PARAMS = "params"
    MACS = "macs"


@dataclass(frozen=True)
class BudgetPolicy:
    """``params:P`` / ``macs:P``: the factorized layers together keep fraction P of their cost;
    ranks go where they remove the most squared error per unit cost."""

    metric: BudgetMetric
    fraction: float

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise UsageError(f"{self.metric.value} budget must be a fraction in (0, 1), got {self.fraction!r}")

    def describe(self) -> dict:
        return {"name": self.metric.value, "fraction": self.fraction}


RankPolicy = RatioPolicy | EnergyPolicy | ErrorPolicy | BudgetPolicy

POLICY_HELP = "ratio | energy:T | error:E | params:P | macs:P"


def parse_policy(text: str, ratio: RatioPolicy) -> RankPolicy:
    """Parse ``--rank-policy``; ``ratio`` takes its sizes from the latent flags."""
    name, sep, value = text.strip().partition(":")
    if name == "ratio" and not sep:
        return ratio
    if name in ("energy", "error", "params", "macs") and sep:
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--rank-policy {text!r}: {value!r} is not a number") from None
        if name == "energy":
            return EnergyPolicy(number)
        if name == "error":
            return ErrorPolicy(number)
        return BudgetPolicy(BudgetMetric(name), number)
    raise UsageError(f"--rank-policy {text!r} is not one of: {POLICY_HELP}")


@dataclass(frozen=True)
class RankPin:
    """``--rank PATTERN=R``: a fixed rank for the layers whose name matches."""

    pattern: str
    rank: int

    @classmethod
    def parse(cls, text: str) -> RankPin:
        pattern, sep, value = text.rpartition("=")
        if not sep or not pattern or not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--rank {text!r} must look like PATTERN=R with a rank R >= 1")
        return cls(pattern, int(value))


@dataclass(frozen=True)
class Gates:
    """CI gates; ``None`` disables a gate."""

    max_layer_error: float | None = None
    max_total_error: float | None = None
    min_param_reduction: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_layer_error", "max_total_error", "min_param_reduction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a fraction in [0, 1], got {value!r}")

    @property
    def need_errors(self) -> bool:
        return self.max_layer_error is not None or self.max_total_error is not None


SVD_ENGINES = ("auto", "exact", "gram", "randomized")


@dataclass(frozen=True)
class FactorizeConfig:
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    policy: RankPolicy = field(default_factory=RatioPolicy)
    pins: tuple[RankPin, ...] = ()
    rank_multiple: int = 1
    gates: Gates = field(default_factory=Gates)
    svd: str = "auto"
    device: str = "cpu"
    seed: int = 0
    calibration: str | None = None  # activation statistics (safetensors) for data-aware factorization

    def __post_init__(self) -> None:
        if self.svd not in SVD_ENGINES:
            raise UsageError(f"unknown SVD engine {self.svd!r}; choose one of {', '.join(SVD_ENGINES)}")
        if self.rank_multiple < 1:
            raise UsageError(f"--rank-multiple must be >= 1, got {self.rank_multiple}")

    @property
    def needs_spectra(self) -> bool:
        return not isinstance(self.policy, RatioPolicy)

    def to_dict(self) -> dict:
        """The resolved settings, as written into the report."""
        out = asdict(self)
        out["policy"] = self.policy.describe()
        out["pins"] = [{"pattern": p.pattern, "rank": p.rank} for p in self.pins]
        out["selection"]["include"] = list(self.selection.include)
        out["selection"]["exclude"] = list(self.selection.exclude)
        out["selection"]["transposed"] = list(self.selection.transposed)
        out["selection"]["not_transposed"] = list(self.selection.not_transposed)
        return out
