"""The one pipeline every format goes through: open -> select -> plan -> execute -> write -> report."""

from __future__ import annotations

import collections
import json
import math
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from factorize_cli.atomic import write_text_atomic
from factorize_cli.config import FactorizeConfig
from factorize_cli.errors import GateError, InputError, UsageError
from factorize_cli.formats import OutputKind, check_output, open_checkpoint, output_kind, write_checkpoint
from factorize_cli.formats.base import Checkpoint
from factorize_cli.graphs import GRAPH_FORMATS
from factorize_cli.graphs.verify import VerifySpec
from factorize_cli.graphs.verify import verify as run_verify
from factorize_cli.orientation import read_structure
from factorize_cli.outputs import RANKS_METADATA_KEY, check_targets
from factorize_cli.planning import Inspector, LayerPlan, Plan, build_plan
from factorize_cli.report import LayerResult, build_report, dumps
from factorize_cli.rewrite import Placed, Role, output_layout
from factorize_cli.selection import SkipReason, candidates_from_keys, screen
from factorize_cli.whitening import Whitener

if TYPE_CHECKING:  # torch is imported where weights are read: a header-only plan needs none
    import torch

    from factorize_cli.factorization import Factors



class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...
    def advance(self, label: str) -> None: ...
    def stop(self) -> None: ...


class _Silent:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, label: str) -> None:
        pass

    def stop(self) -> None:
        pass


def default_report_path(output: Path) -> Path:
    stem = output.stem if output.suffix else output.name
    return output.parent / f"{stem}.factorize.json"


def _inspector(checkpoint: Checkpoint, config: FactorizeConfig, whitener: Whitener, keys: list[str], *,
               spectra: bool, progress: Progress) -> Inspector:
    """Look at each layer still in the running (their weights, ``keys``, are read ahead in this order):
    refuse non-finite weights, note whether activation statistics cover it, and read its spectrum
    (of ``W S`` when whitened) if asked."""
    from factorize_cli.factorization import all_finite, choose_engine, singular_values

    weights = prefetch(checkpoint, iter(keys))

    def inspect(layer: LayerPlan) -> LayerPlan:
        weight = next(weights)
        try:
            if tuple(weight.shape) != layer.candidate.weight.shape:
                raise RuntimeError(f"internal error: read-ahead out of step at {layer.name}")
            if not all_finite(weight):
                return layer.skipped(SkipReason.NON_FINITE, "weight holds NaN or Inf values")
            if whitener.active:
                why_not = whitener.why_not(layer)
                layer = replace(layer, calibrated=why_not is None, detail=why_not or "")
            if not spectra:
                return layer
            engine = config.svd if config.svd in ("exact", "gram") else choose_engine(layer.geometry)
            if layer.calibrated:
                whitened = whitener.spectrum(weight, layer, engine=engine, device=config.device)
                if not isinstance(whitened, str):
                    return replace(layer, spectrum=whitened)
                layer = replace(layer, calibrated=False, detail=whitened)
            return replace(layer, spectrum=singular_values(weight, layer.geometry, engine=engine,
                                                           device=config.device))
        finally:
            progress.advance(layer.name)

    return inspect


def make_plan(checkpoint: Checkpoint, config: FactorizeConfig, *, spectra: bool, read_weights: bool = True,
              progress: Progress | None = None, whitener: Whitener | None = None) -> Plan:
    """Build the plan. Spectra are read when asked for or when the rank policy needs them;
    with ``read_weights=False`` (and no spectra) only headers are read."""
    progress = progress or _Silent()
    spectra = spectra or config.needs_spectra
    notes: tuple[str, ...] = ()
    if checkpoint.format in GRAPH_FORMATS:
        candidates = GRAPH_FORMATS[checkpoint.format]().candidates(checkpoint.container)
    else:
        structure = read_structure(checkpoint.path) if checkpoint.format != "memory" else None
        found = candidates_from_keys(checkpoint, config.selection, structure)
        candidates, notes = list(found.candidates), found.notes
    own = whitener is None
    whitener = whitener or Whitener(config.calibration)
    try:
        inspected = [c for c in candidates if screen(c, config.selection).reason is None]
        if spectra:
            whitener.begin_planning(c.name for c in inspected)
        inspect = _inspector(checkpoint, config, whitener, [c.weight.key for c in inspected], spectra=spectra,
                             progress=progress) if spectra or read_weights or whitener.active else None
        progress.start("spectra" if spectra else "checking weights", len(candidates) if inspect else 0)
        return build_plan(candidates, config, source=checkpoint.path, fmt=checkpoint.format, inspect=inspect,
                          notes=notes)
    finally:
        progress.stop()
        if own:
            whitener.close()


def _sources(layout: list[Placed]) -> Iterator[str]:
    """The input keys ``execute`` reads, in the order it reads them."""
    for placed in layout:
        if placed.role is Role.COPY:
            yield placed.entry.source
        elif placed.role is Role.FIRST:
            yield placed.layer.candidate.weight.key
        elif placed.role is Role.BIAS and placed.layer.candidate.bias is not None:
            yield placed.layer.candidate.bias.key


def prefetch(checkpoint: Checkpoint, keys: Iterator[str], depth: int = 2) -> Iterator[torch.Tensor]:
    """Read tensors ahead on a background thread while the caller computes (reads release the GIL)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="factorize-read") as pool:
        pending: collections.deque = collections.deque()
        for key in keys:
            pending.append(pool.submit(checkpoint.get, key))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on the order layers are processed in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


def factorize_layer(weight: torch.Tensor, layer: LayerPlan, config: FactorizeConfig,
                    whitener: Whitener | None) -> tuple[Any, LayerResult]:
    """The factors of one planned layer (whitened when calibrated) and what they achieved."""
    from factorize_cli.factorization import factorize_checked, sum_squares

    weight = weight.detach()
    seed = layer_seed(config.seed, layer.name)
    whitened = whitener.factorize(weight, layer, engine=config.svd, seed=seed, device=config.device) \
        if layer.calibrated and whitener is not None else None
    if whitened is None or isinstance(whitened, str):  # not calibrated, or why whitening failed
        outcome, output_error, fallback = factorize_checked(weight, layer.geometry, layer.rank, engine=config.svd,
                                                            seed=seed, device=config.device), None, whitened
    else:
        outcome, output_error, fallback = whitened.outcome, whitened.output_error, None
    factors = outcome.factors
    full = len(factors.sigma) == layer.geometry.max_rank
    return outcome, LayerResult(
        outcome.achieved_error, factors.stats.energy_kept, math.sqrt(sum_squares(weight)), outcome.engine,
        factors.sigma if full else None, output_error, factors.stats.norm if output_error is not None else None,
        fallback)


def execute(checkpoint: Checkpoint, layout: list[Placed], config: FactorizeConfig,
            results: dict[str, LayerResult], progress: Progress,
            whitener: Whitener | None = None) -> Iterator[torch.Tensor]:
    """Yield the output tensors in layout order, factorizing each layer when its first factor is due."""
    import torch

    reads = prefetch(checkpoint, _sources(layout))
    factors: Factors | None = None
    for placed in layout:
        layer = placed.layer
        if placed.role is Role.COPY:
            yield next(reads)
        elif placed.role is Role.FIRST:
            weight = next(reads)
            outcome, results[layer.name] = factorize_layer(weight, layer, config, whitener)
            factors = outcome.factors
            del weight, outcome
            progress.advance(layer.name)
            yield factors.first
        elif placed.role is Role.SECOND:
            yield factors.second
        else:  # Role.BIAS
            bias = layer.candidate.bias
            yield next(reads) if bias else torch.zeros(placed.entry.shape, dtype=getattr(torch, placed.entry.dtype))
            factors = None


def rank_map(plan: Plan) -> dict[str, int]:
    return {layer.name: layer.rank for layer in plan.to_factorize if layer.rank is not None}


def _timing(started: datetime, t0: float) -> dict[str, Any]:
    return {"started_at": started.isoformat(timespec="seconds"), "seconds": round(time.perf_counter() - t0, 3)}


def plan_checkpoint(path: str | Path, config: FactorizeConfig, *, spectra: bool | None = None,
                    unsafe_pickle: bool = False, progress: Progress | None = None,
                    label: str | None = None, report_path: str | Path | None = None,
                    html_path: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Dry run: the report ``apply`` would produce (written to ``report_path``/``html_path`` if given).

    ``spectra=None`` reads singular values only when the policy or an error gate needs them;
    otherwise the plan comes from headers alone (no NaN/Inf check, no predicted error).
    Gates are evaluated on predictions; a failed gate is in the report's ``gates``, and
    :func:`raise_for_gates` raises it after the caller has written the report.
    """
    if config.gates.need_errors and spectra is False:
        raise UsageError("--max-layer-error/--max-total-error need spectra; drop --no-spectra")
    wanted = bool(spectra) or config.gates.need_errors
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    check_targets({"report": report_path, "HTML report": html_path}, _inputs(path, config), force=force)
    with open_checkpoint(path, unsafe_pickle=unsafe_pickle) as checkpoint:
        _check_device(config)
        plan = make_plan(checkpoint, config, spectra=wanted, read_weights=False, progress=progress)
        if checkpoint.format not in GRAPH_FORMATS:
            output_layout(checkpoint, plan)  # the same validation apply does (key collisions)
        notes = [] if wanted or config.needs_spectra else \
            ["headers only: weights were not read (no NaN/Inf check, no predicted error); pass --spectra"]
        report = build_report(command="plan", checkpoint=checkpoint, plan=plan, results={}, output=None,
                              notes=notes, timing=_timing(started, t0))
    if label is not None:
        report["input"]["path"] = label
    write_reports(report, report_path, html_path)
    return report


def _inputs(path: str | Path, config: FactorizeConfig) -> list[Path]:
    """Every file the run reads: nothing it writes may be one of them."""
    return [Path(path)] + ([Path(config.calibration)] if config.calibration else [])


def write_reports(report: dict[str, Any], report_path: str | Path | None, html_path: str | Path | None) -> None:
    if report_path:
        write_text_atomic(Path(report_path), dumps(report))
    if html_path:
        from factorize_cli.html import render_html

        write_text_atomic(Path(html_path), render_html(report))


def resolve_device(requested: str) -> tuple[str, str | None]:
    """The device to compute on, and a note when the request cannot be met (CUDA absent)."""
    if requested == "cpu":
        return "cpu", None
    import torch

    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            return "cpu", f"--device {requested}: CUDA is not available here; computing on the CPU"
        try:
            torch.empty(0, device=requested)
        except (RuntimeError, AssertionError) as e:
            raise UsageError(f"--device {requested}: {e}") from None
        return requested, None
    raise UsageError(f"--device {requested!r}: use cpu, cuda or cuda:N")


def _check_device(config: FactorizeConfig) -> None:
    device, note = resolve_device(config.device)
    if note is not None or device != config.device:
        raise UsageError(note or f"device {config.device} unavailable")


def _resolve_output_kind(checkpoint: Checkpoint, output: Path, kind: OutputKind) -> OutputKind:
    """Graph inputs are written back in their own format; state dicts as tensors (never as a graph)."""
    if checkpoint.format not in GRAPH_FORMATS:
        if kind is OutputKind.TORCH_EXPORT:
            raise UsageError(f"{output}: a .pt2 output needs a .pt2 input; this is a {checkpoint.format} state dict")
        if kind is OutputKind.SHARDED and checkpoint.format == "torch-sharded":
            kind = OutputKind.TORCH_SHARDED  # a folder output keeps the input's shard format
        check_output(checkpoint, kind)
        return kind
    wanted = OutputKind(checkpoint.format)  # graph formats name their own output kind
    accepted, suffix = (OutputKind.TORCH, ".pt or .jit") if wanted is OutputKind.TORCHSCRIPT \
        else (OutputKind.TORCH_EXPORT, ".pt2")
    if kind is not accepted:
        raise UsageError(f"{output}: a {checkpoint.format} input is written back in its own format; "
                         f"give a {suffix} output path")
    return wanted


def raise_for_gates(report: dict[str, Any]) -> None:
    if not report["gates"]["passed"]:
        raise GateError(report["gates"]["violations"], report)


def apply_checkpoint(path: str | Path, output: str | Path, config: FactorizeConfig, *, force: bool = False,
                     report_path: str | Path | None = None, html_path: str | Path | None = None,
                     unsafe_pickle: bool = False,
                     progress: Progress | None = None, label: str | None = None,
                     verify: Sequence[str] = (), verify_tol: float = 0.1) -> dict[str, Any]:
    """Factorize ``path`` into ``output`` and write the JSON report; returns the report.

    When a gate fails the report is written, the output is not, and :class:`GateError` is raised.
    """
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    progress = progress or _Silent()
    source, output = Path(path), Path(output)
    report_path = Path(report_path) if report_path else default_report_path(output)
    kind = output_kind(output)
    check_targets({"output": output, "report": report_path, "HTML report": html_path}, _inputs(source, config),
                  force=force)

    specs = [VerifySpec.parse(text) for text in verify]
    with open_checkpoint(source, unsafe_pickle=unsafe_pickle) as checkpoint, \
            Whitener(config.calibration, keep_for_apply=True) as whitener:
        graph = checkpoint.format in GRAPH_FORMATS
        kind = _resolve_output_kind(checkpoint, output, kind)
        if specs and not graph:
            raise UsageError("--verify runs models: it needs a TorchScript or .pt2 input")
        _check_device(config)
        plan = make_plan(checkpoint, config, spectra=False, progress=progress, whitener=whitener)
        whitener.begin_apply(layer.name for layer in plan.to_factorize if layer.calibrated)
        layout = [] if graph else output_layout(checkpoint, plan)
        destination = {"path": str(output), "format": kind.value, "files": [], "report": str(report_path),
                       "tensors": len(layout) if layout else len(checkpoint.infos), "written": False}

        def report_now(results: dict[str, LayerResult]) -> dict[str, Any]:
            report = build_report(command="apply", checkpoint=checkpoint, plan=plan, results=results,
                                  output=destination, notes=_format_notes(checkpoint, kind),
                                  timing=_timing(started, t0))
            if label is not None:
                report["input"]["path"] = label
            return report

        if config.needs_spectra:  # predictions exist: fail a gate before any SVD work
            early = report_now({})
            if not early["gates"]["passed"]:
                write_reports(early, report_path, html_path)
                raise_for_gates(early)

        results: dict[str, LayerResult] = {}
        final: dict[str, Any] = {}

        def gate(written: Path) -> None:  # runs before the output is renamed into place
            final.update(report_now(results))
            if specs:
                final["verify"] = run_verify(checkpoint.format, source, written, specs, verify_tol)
                if not final["verify"]["passed"]:
                    final["gates"]["passed"] = False
                    final["gates"]["checked"].append("verify")
                    final["gates"]["violations"].append(
                        f"--verify: max relative output difference {final['verify']['max_rel_diff']:.4g} > "
                        f"--verify-tol {verify_tol:g}")
            raise_for_gates(final)

        metadata = {RANKS_METADATA_KEY: json.dumps(rank_map(plan), sort_keys=True)}
        progress.start("factorizing", len(plan.to_factorize))
        try:
            if graph:
                destination["files"] = GRAPH_FORMATS[checkpoint.format]().write_rewritten(
                    checkpoint.container, plan,
                    lambda layer: factorize_layer(checkpoint.get(layer.candidate.weight.key), layer, config,
                                                  whitener),
                    results, progress, output, before_commit=gate)
            else:
                destination["files"] = write_checkpoint(
                    checkpoint, [p.entry for p in layout],
                    execute(checkpoint, layout, config, results, progress, whitener),
                    output, metadata=metadata, before_commit=gate)
            destination["written"] = True
        except GateError:
            write_reports(final, report_path, html_path)
            raise
        finally:
            progress.stop()
        report = final or report_now(results)  # the report the gates saw (verify included)
    write_reports(report, report_path, html_path)
    return report


def _format_notes(checkpoint: Checkpoint, kind: OutputKind) -> list[str]:
    notes = []
    if checkpoint.container_path:
        notes.append(f"state dict found under {'.'.join(checkpoint.container_path)!r}; other entries kept"
                     if kind is OutputKind.TORCH else
                     f"state dict found under {'.'.join(checkpoint.container_path)!r}; the other container "
                     "entries are not written to safetensors")
    return notes


def factorize_state_dict(state_dict: Mapping[str, Any], config: FactorizeConfig | None = None
                         ) -> tuple[collections.OrderedDict, dict[str, Any]]:
    """In-memory API: factorize a state dict; returns the new state dict and the report."""
    from factorize_cli.formats.torchfile import checkpoint_from_mapping

    config = config or FactorizeConfig()
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    if not isinstance(state_dict, Mapping):
        raise InputError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    checkpoint = checkpoint_from_mapping(state_dict)
    with Whitener(config.calibration, keep_for_apply=True) as whitener:
        plan = make_plan(checkpoint, config, spectra=False, whitener=whitener)
        whitener.begin_apply(layer.name for layer in plan.to_factorize if layer.calibrated)
        layout = output_layout(checkpoint, plan)
        results: dict[str, LayerResult] = {}
        tensors = execute(checkpoint, layout, config, results, _Silent(), whitener)
        out = collections.OrderedDict((p.entry.key, t) for p, t in zip(layout, tensors, strict=True))
    out.update(checkpoint.passthrough or {})
    report = build_report(command="apply", checkpoint=checkpoint, plan=plan, results=results, output=None,
                          notes=[], timing=_timing(started, t0))
    return out, report
