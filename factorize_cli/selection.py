"""Which weights are candidates, and why a candidate is left alone.

Candidates come from state-dict keys (``<prefix>.weight`` of 2 to 4 dims, its ``<prefix>.bias``
alongside), read as the checkpoint says they are stored: module types from a config.json beside it
(:mod:`factorize_cli.orientation`), else what the biases prove (a bias as long as ``shape[1]`` marks
an ``in x out`` transformers Conv1D, or a transposed conv), else ``--transposed``/``--not-transposed``.
Graph formats find them in live module structure. Either way :func:`screen` applies the same rules
and returns a reason, never a bare boolean, so the report can say why a layer was skipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from enum import Enum

from factorize_cli.config import SelectionConfig
from factorize_cli.errors import UsageError
from factorize_cli.formats.base import FLOAT_DTYPES, Checkpoint, TensorInfo
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.orientation import ModuleFact, Orientation, Structure


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
    KEPT_WHOLE = "kept-whole"  # a global budget does better leaving this layer whole
    NON_FINITE = "non-finite"
    MODULE_TYPE = "module-type"
    ATTENTION_OUT_PROJ = "attention-out-proj"
    TRANSPOSED_CONV = "transposed-conv"
    ORIENTATION_UNKNOWN = "orientation-unknown"


@dataclass(frozen=True)
class Refusal:
    """A reason known as soon as the candidate is found: its module type, how it is stored."""

    reason: SkipReason
    detail: str


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
    refusal: Refusal | None = None

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


@dataclass(frozen=True)
class Found:
    """The candidates of a state dict, and what the report should say about how they were read."""

    candidates: tuple[Candidate, ...]
    notes: tuple[str, ...] = ()


def candidates_from_keys(checkpoint: Checkpoint, selection: SelectionConfig | None = None,
                         structure: Structure | None = None) -> Found:
    """Layers from key names and shapes (a 2-D weight is a Linear, 3-D a Conv1d, 4-D a Conv2d),
    stored as ``structure`` (module types from a config.json) says, else as the biases prove, else
    as ``--transposed``/``--not-transposed`` say."""
    selection = selection or SelectionConfig()
    structure = structure or Structure()
    read: list[_Reading] = []
    mismatched: list[str] = []
    for info in checkpoint.infos:
        if info.key != "weight" and not info.key.endswith(".weight"):
            continue
        kind = LayerKind.from_ndim(len(info.shape))
        if kind is None:
            continue
        name = info.key.removesuffix("weight").removesuffix(".")
        fact = structure.module(name)
        if fact is not None and fact.weight_shape != info.shape:
            mismatched.append(name)
            fact = None
        read.append(_reading(checkpoint, info, kind, name, fact, structure.source))
    example = next((r for r in read if r.transposed), None)
    used: set[str] = set()
    found = tuple(_candidate(checkpoint, r, selection, example, used) for r in read)
    notes = [structure.note] if structure.note else []
    if mismatched:
        notes.append(f"{structure.source} does not match {len(mismatched)} weight(s) of the checkpoint (e.g. "
                     f"{mismatched[0]}): their orientation read from keys and biases")
    for flag, patterns in (("--transposed", selection.transposed), ("--not-transposed", selection.not_transposed)):
        notes += [f"{flag} {p!r} matched no 2-D weight" for p in patterns if p not in used]
    return Found(found, tuple(notes))


@dataclass(frozen=True)
class _Reading:
    """What the checkpoint says about one weight before overrides."""

    info: TensorInfo
    kind: LayerKind
    name: str
    transposed: bool | None  # None: not proven either way
    proof: str  # what proves it, or why nothing does
    refusal: Refusal | None = None
    from_structure: bool = False
    groups: int = 1


def _float_vector(info: TensorInfo | None) -> TensorInfo | None:
    return info if info is not None and info.is_float and len(info.shape) == 1 else None


def _reading(checkpoint: Checkpoint, info: TensorInfo, kind: LayerKind, name: str, fact: ModuleFact | None,
             source: str) -> _Reading:
    if fact is not None:
        what = f"{fact.type_name} module in {source}"
        if fact.kind is None:
            return _Reading(info, kind, name, None, what, Refusal(
                SkipReason.MODULE_TYPE, f"{what}: only nn.Linear/nn.Conv1d/nn.Conv2d and transformers Conv1D "
                                        "modules are factorized"))
        return _Reading(info, kind, name, fact.orientation is Orientation.IN_OUT, what, from_structure=True,
                        groups=fact.groups)
    parent, _, leaf = name.rpartition(".")
    if kind is LayerKind.LINEAR and leaf == "out_proj" and any(
            checkpoint.info(_join(parent, k)) for k in ("in_proj_weight", "q_proj_weight")):
        return _Reading(info, kind, name, None, "", Refusal(
            SkipReason.ATTENTION_OUT_PROJ, f"nn.MultiheadAttention reads out_proj.weight directly (beside "
                                           f"{_join(parent, 'in_proj_weight')}): a factorized pair would not be used"))
    rows, cols = info.shape[0], info.shape[1]
    bias = _float_vector(checkpoint.info(_join(name, "bias")))
    length = bias.shape[0] if bias is not None else None
    if length == cols != rows:
        if kind is LayerKind.LINEAR:
            return _Reading(info, kind, name, True, f"its bias of {cols} matches shape[1]")
        return _Reading(info, kind, name, None, "", Refusal(
            SkipReason.TRANSPOSED_CONV, f"its bias of {cols} matches shape[1], not shape[0] = {rows}: a transposed "
                                        "convolution (weight in x out x k), which is not factorized"))
    if length == rows != cols:
        return _Reading(info, kind, name, False, f"its bias of {rows} matches shape[0]")
    return _Reading(info, kind, name, None, "square, with a bias" if length == rows else "no bias of its own")


def _override(reading: _Reading, selection: SelectionConfig, used: set[str]) -> bool | None:
    """``--transposed``/``--not-transposed`` for this weight: True, False or None (neither matches)."""
    stored_in_out = _matches(reading.name, selection.transposed)
    stored_out_in = _matches(reading.name, selection.not_transposed)
    used.update(p for p in (stored_in_out, stored_out_in) if p is not None)
    if stored_in_out is not None and stored_out_in is not None:
        raise UsageError(f"{reading.name} matches both --transposed {stored_in_out!r} and --not-transposed "
                         f"{stored_out_in!r}")
    if stored_in_out is None and stored_out_in is None:
        return None
    wanted = stored_in_out is not None
    if reading.transposed is not None and reading.transposed != wanted:
        flag = f"--transposed {stored_in_out!r}" if wanted else f"--not-transposed {stored_out_in!r}"
        stored = "in x out" if reading.transposed else "out x in"
        raise UsageError(f"{reading.name}: {flag} contradicts the checkpoint, which stores it {stored} "
                         f"({reading.proof}); narrow the pattern")
    return wanted


def _candidate(checkpoint: Checkpoint, r: _Reading, selection: SelectionConfig, example: _Reading | None,
               used: set[str]) -> Candidate:
    transposed, refusal = r.transposed, r.refusal
    if r.kind is LayerKind.LINEAR and refusal is None:
        override = _override(r, selection, used)
        if override is not None:
            transposed = override
        elif transposed is None and example is not None:
            refusal = Refusal(SkipReason.ORIENTATION_UNKNOWN, (
                f"{'x'.join(map(str, r.info.shape))}, {r.proof}: its orientation is not proven, and this "
                f"checkpoint stores {example.name} in x out ({example.proof}); include it with --transposed GLOB "
                "(stored in x out, like transformers Conv1D) or --not-transposed GLOB (stored out x in, nn.Linear)"))
    geometry = Geometry.from_weight_shape(r.kind, r.info.shape, has_bias=False, transposed=bool(transposed))
    bias = _float_vector(checkpoint.info(_join(r.name, "bias")))
    if bias is not None and bias.shape != (geometry.out_features,):
        bias = None  # not this layer's bias; it passes through untouched
    return Candidate(name=r.name, weight=r.info, bias=bias, geometry=replace(geometry, has_bias=bias is not None),
                     from_structure=r.from_structure, groups=r.groups, tied_with=checkpoint.tied.get(r.info.key),
                     refusal=refusal)


MAX_KERNEL = 64  # a 3-D weight with a longer last dimension is not taken for a Conv1d

_EMBEDDING_NAMES = {"wte", "wpe", "shared", "embed", "embedding", "embeddings"}


def _looks_like_embedding(candidate: Candidate) -> str | None:
    segments = [s.lower() for s in candidate.name.split(".") if s]
    for segment in segments:
        if "embed" in segment or segment in _EMBEDDING_NAMES:
            return f"name part {segment!r} suggests an embedding table"
    rows, cols = candidate.geometry.out_features, candidate.geometry.in_features
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
    refusal = candidate.refusal
    if refusal is not None and refusal.reason is not SkipReason.ORIENTATION_UNKNOWN:
        return Screened(candidate, refusal.reason, refusal.detail)
    if not candidate.from_structure and included is None and (why := _looks_like_embedding(candidate)):
        return Screened(candidate, SkipReason.EMBEDDING_LIKE, f"{why}; --include it to factorize anyway")
    if refusal is not None:  # an unproven orientation: after the embedding rule, which says more
        return Screened(candidate, refusal.reason, refusal.detail)
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
