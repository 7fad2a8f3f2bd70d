"""Which weights are candidates, and why a candidate is left alone.

Candidates come from bare state-dict keys (``<prefix>.weight`` of 2 or 4 dims, its
``<prefix>.bias`` alongside) or from live module structure (``nn.Linear``/``nn.Conv2d``
instances). Either way :func:`screen` applies the same rules and returns a reason,
never a bare boolean, so the report can say why a layer was skipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from factorize_cli.config import SelectionConfig
from factorize_cli.formats.base import FLOAT_DTYPES, Checkpoint, TensorInfo
from factorize_cli.geometry import Geometry, LayerKind


class SkipReason(str, Enum):
    KIND_DISABLED = "kind-disabled"
    EXCLUDED = "excluded"
    NOT_INCLUDED = "not-included"
    UNSUPPORTED_DTYPE = "unsupported-dtype"
    TIED = "tied-weight"
    EMBEDDING_LIKE = "embedding-like"
    GROUPED = "grouped-conv"
    NOT_A_CONV = "not-a-conv"
    NOT_REWRITABLE = "not-rewritable"
    TOO_NARROW = "too-narrow"
    ABOVE_BREAK_EVEN = "above-break-even"
    NON_FINITE = "non-finite"


@dataclass(frozen=True)
class Candidate:
    name: str  # the layer's name: the weight key without ".weight"
    weight: TensorInfo
    bias: TensorInfo | None
    geometry: Geometry
    from_structure: bool = False  # True when the module type is known (not guessed from keys)
    groups: int = 1
    tied_with: str | None = None
    unsafe: str | None = None  # why a graph rewrite cannot touch this layer (graph formats)

    @property
    def kind(self) -> LayerKind:
        return self.geometry.kind


@dataclass(frozen=True)
class Screened:
    candidate: Candidate
    reason: SkipReason | None  # None: goes on to planning
    detail: str = ""


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def candidates_from_keys(checkpoint: Checkpoint) -> Iterator[Candidate]:
    """Guess layers from key names and shapes: a 2-D weight is a Linear, 3-D a Conv1d, 4-D a Conv2d."""
    for info in checkpoint.infos:
        if info.key != "weight" and not info.key.endswith(".weight"):
            continue
        kind = LayerKind.from_ndim(len(info.shape))
        if kind is None:
            continue
        name = info.key.removesuffix("weight").removesuffix(".")
        bias = checkpoint.info(_join(name, "bias"))
        if bias is not None and (bias.shape != (info.shape[0],) or not bias.is_float):
            bias = None  # not this layer's bias; it passes through untouched
        yield Candidate(
            name=name, weight=info, bias=bias,
            geometry=Geometry.from_weight_shape(kind, info.shape, has_bias=bias is not None),
            tied_with=checkpoint.tied.get(info.key),
        )


MAX_KERNEL = 64  # a 3-D weight with a longer last dimension is not taken for a Conv1d

_EMBEDDING_NAMES = {"wte", "wpe", "shared", "embed", "embedding", "embeddings"}


def _looks_like_embedding(candidate: Candidate) -> str | None:
    segments = [s.lower() for s in candidate.name.split(".") if s]
    for segment in segments:
        if "embed" in segment or segment in _EMBEDDING_NAMES:
            return f"name part {segment!r} suggests an embedding table"
    rows, cols = candidate.weight.shape[0], candidate.weight.shape[1]
    if candidate.kind is LayerKind.LINEAR and rows >= 16384 and rows >= 8 * cols:
        return f"{rows} x {cols} looks like a vocabulary table"
    return None


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def screen(candidate: Candidate, config: SelectionConfig) -> Screened:
    """Apply the selection rules that need no data and no rank."""
    geo = candidate.geometry
    linear = candidate.kind is LayerKind.LINEAR
    if not (config.factorize_linears if linear else config.factorize_convs):
        flag = "--no-factorize-linears" if linear else "--no-factorize-convs"
        return Screened(candidate, SkipReason.KIND_DISABLED, f"{candidate.kind.value} layers disabled ({flag})")
    if (pattern := _matches(candidate.name, config.exclude)) is not None:
        return Screened(candidate, SkipReason.EXCLUDED, f"matches --exclude {pattern!r}")
    included = _matches(candidate.name, config.include)
    if config.include and included is None:
        return Screened(candidate, SkipReason.NOT_INCLUDED, "matches no --include pattern")
    if candidate.weight.dtype not in FLOAT_DTYPES:
        return Screened(candidate, SkipReason.UNSUPPORTED_DTYPE,
                        f"dtype {candidate.weight.dtype} is not a float16/bfloat16/float32/float64 weight")
    if candidate.tied_with is not None:  # before graph reasons: a tie is why its reads look odd (or absent)
        return Screened(candidate, SkipReason.TIED, f"shares its storage with {candidate.tied_with}")
    if candidate.unsafe is not None:
        return Screened(candidate, SkipReason.NOT_REWRITABLE, candidate.unsafe)
    if not candidate.from_structure and included is None and (why := _looks_like_embedding(candidate)):
        return Screened(candidate, SkipReason.EMBEDDING_LIKE, f"{why}; --include it to factorize anyway")
    if candidate.kind is LayerKind.CONV1D and not candidate.from_structure and candidate.geometry.kernel[0] > MAX_KERNEL:
        return Screened(candidate, SkipReason.NOT_A_CONV,
                        f"a 3-D weight with a last dimension of {candidate.geometry.kernel[0]} is not a Conv1d kernel "
                        "(stacked experts?); --include does not change that")
    if candidate.groups != 1:
        return Screened(candidate, SkipReason.GROUPED, f"grouped convolution (groups={candidate.groups})")
    minimum = config.min_features if linear else config.min_channels
    if geo.min_dim < minimum:
        flag = "--min-features" if linear else "--min-channels"
        what = "features" if linear else "channels"
        return Screened(candidate, SkipReason.TOO_NARROW,
                        f"min(in, out) {what} = {geo.min_dim} is below {flag} {minimum}")
    return Screened(candidate, None)
