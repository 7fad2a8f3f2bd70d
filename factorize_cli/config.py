"""Frozen, validated configuration. Only the CLI parses strings into these."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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

    def __post_init__(self) -> None:
        for name in ("min_features", "min_channels"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        for pattern in self.include + self.exclude:
            if not pattern:
                raise UsageError("empty --include/--exclude pattern")


@dataclass(frozen=True)
class RatioPolicy:
    """Composer's fixed latent size per layer kind."""

    latent_features: Latent = field(default_factory=lambda: Latent(0.25))
    latent_channels: Latent = field(default_factory=lambda: Latent(0.25))


RankPolicy = RatioPolicy  # later policies (energy, error, budgets) join this union


SVD_ENGINES = ("exact",)


@dataclass(frozen=True)
class FactorizeConfig:
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    policy: RankPolicy = field(default_factory=RatioPolicy)
    svd: str = "exact"

    def __post_init__(self) -> None:
        if self.svd not in SVD_ENGINES:
            raise UsageError(f"unknown SVD engine {self.svd!r}; choose one of {', '.join(SVD_ENGINES)}")

    def to_dict(self) -> dict:
        """The resolved settings, as written into the report."""
        out = asdict(self)
        out["policy"] = {"name": "ratio",
                         "latent_features": self.policy.latent_features.value,
                         "latent_channels": self.policy.latent_channels.value}
        out["selection"]["include"] = list(self.selection.include)
        out["selection"]["exclude"] = list(self.selection.exclude)
        return out
