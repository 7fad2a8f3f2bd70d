"""The one pipeline every format goes through: open -> select -> plan -> execute -> write -> report.

The pipeline never asks which format it holds: the opened checkpoint's ``handler`` (state dicts,
TorchScript, ``.pt2``) gives the candidates, resolves the output kind and writes the planned result.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from factorize_cli.config import FactorizeConfig
from factorize_cli.devices import check_device
from factorize_cli.distributed import SOLO, Group
from factorize_cli.errors import GateError, InputError, UsageError
from factorize_cli.execution import LayerWork, NonFiniteWeight, inspect_all, looker
from factorize_cli.formats import open_checkpoint
from factorize_cli.formats.base import Checkpoint
from factorize_cli.outputs import RANKS_METADATA_KEY, check_targets, default_report_path
from factorize_cli.planning import Action, LayerPlan, Plan, build_plan
from factorize_cli.progress import Progress, Silent
from factorize_cli.report import build_report, raise_for_gates, write_reports
from factorize_cli.selection import screen
from factorize_cli.whitening import Whitener

HEADERS_ONLY = "headers only: weights were not read (no NaN/Inf check, no predicted error); pass --spectra"


def make_plan(checkpoint: Checkpoint, config: FactorizeConfig, *, spectra: bool, read_weights: bool = True,
              progress: Progress | None = None, whitener: Whitener | None = None,
              non_finite: frozenset[str] = frozenset(), group: Group = SOLO) -> Plan:
    """Build the plan. Spectra are read when asked for or when the rank policy needs them;
    with ``read_weights=False`` (and no spectra) only headers are read. ``non_finite``: layers whose
    weights an earlier read found NaN or Inf in. Under torchrun (``group``) each rank reads its share of
    the weights and the inspected layers are exchanged: every rank gets the same plan."""
    progress = progress or Silent()
    spectra = spectra or config.needs_spectra
    candidates, notes = checkpoint.handler.candidates(checkpoint, config.selection)
    own = whitener is None
    whitener = whitener or Whitener(config.calibration)
    try:
        inspected = [c for c in candidates if screen(c, config.selection).reason is None]
        look = looker(config, whitener, spectra=spectra, non_finite=non_finite)
        inspect = None
        if spectra or read_weights:  # weights are read: each layer on the threads factorizing would give it
            mine = [LayerPlan(c, Action.FACTORIZE, None) for c in inspected]
            if group.distributed:
                mine = [mine[i] for i in group.share([layer.geometry.cost for layer in mine])]
            if spectra:
                whitener.begin_planning(layer.name for layer in mine)
            share = f" (rank 0 of {group.world})" if group.distributed else ""
            progress.start(("spectra" if spectra else "checking weights") + share, len(mine))
            with group.step():
                found = inspect_all(checkpoint, mine, look, LayerWork(config, whitener), progress)
            progress.stop()
            every = {name: layer for part in group.gather(found) for name, layer in part.items()} \
                if group.distributed else found
            inspect = lambda layer: every[layer.name]  # noqa: E731
        elif whitener.active or non_finite:
            inspect = lambda layer: look(layer, None)  # noqa: E731
        return build_plan(candidates, config, source=checkpoint.path, fmt=checkpoint.format, inspect=inspect,
                          notes=notes)
    finally:
        progress.stop()
        if own:
            whitener.close()


def rank_map(plan: Plan) -> dict[str, int]:
    return {layer.name: layer.rank for layer in plan.to_factorize if layer.rank is not None}


def output_metadata(plan: Plan) -> dict[str, str]:
    """What every output carries beside its tensors: the rank map (for loading it back)."""
    return {RANKS_METADATA_KEY: json.dumps(rank_map(plan), sort_keys=True)}


def _timing(started: datetime, t0: float) -> dict[str, Any]:
    return {"started_at": started.isoformat(timespec="seconds"), "seconds": round(time.perf_counter() - t0, 3)}


def _inputs(path: str | Path, config: FactorizeConfig) -> list[Path]:
    """Every file the run reads: nothing it writes may be one of them."""
    return [Path(path)] + ([Path(config.calibration)] if config.calibration else [])


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
    from factorize_cli import distributed

    wanted = bool(spectra) or config.gates.need_errors
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    group = distributed.current(config.device)
    config = replace(config, device=group.device(config.device))

    def refusals() -> None:
        check_targets({"report": report_path, "HTML report": html_path}, _inputs(path, config), force=force)
        check_device(config.device)

    _, checkpoint = _together(group, refusals, path, unsafe_pickle)
    with checkpoint:
        plan = make_plan(checkpoint, config, spectra=wanted, read_weights=False, progress=progress, group=group)
        checkpoint.handler.output_tensors(checkpoint, plan)  # the same validation apply does (key collisions)
        notes = [] if wanted or config.needs_spectra else [HEADERS_ONLY]
        report = build_report(command="plan", checkpoint=checkpoint, plan=plan, results={}, output=None,
                              notes=notes, timing=_timing(started, t0))
    if label is not None:
        report["input"]["path"] = label
    if group.lead:  # every rank has the plan; rank 0 writes it
        write_reports(report, report_path, html_path)
    return report


@dataclass
class ApplyRun:
    """One apply run's state, stage by stage: prepare, gate early, write (gating before commit), report."""

    source: Path
    output: Path
    config: FactorizeConfig
    report_path: Path
    html_path: Path | None
    label: str | None
    specs: Any  # --verify's inputs (graphs.verify.VerifyInputs), None without it
    verify_tol: float
    progress: Progress
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    t0: float = field(default_factory=time.perf_counter)
    final: dict[str, Any] = field(default_factory=dict)
    group: Group = SOLO  # the processes of a torchrun launch (factorize_cli.scaleout)
    non_finite: set[str] = field(default_factory=set)  # layers found NaN/Inf while factorizing: planned again

    def run(self, checkpoint: Checkpoint, whitener: Whitener) -> dict[str, Any]:
        """Plan from headers, then write; each weight is read once, by the writer (checked there). A
        weight found NaN/Inf abandons the partial output and plans again without that layer."""
        with self.group.step():  # refused alike on every rank: one line, from rank 0
            self.kind = self.check(checkpoint)
        while True:
            try:
                return self._run(checkpoint, whitener)
            except NonFiniteWeight as e:
                if e.names <= self.non_finite:
                    raise
                self.non_finite |= e.names
                self.final = {}

    def check(self, checkpoint: Checkpoint) -> Any:
        """Refuse, before any work, what cannot be done; the output's kind."""
        handler = checkpoint.handler
        kind = handler.output_kind(checkpoint, self.output)
        self.verifier = handler.verifier(checkpoint, self.source) if self.specs else None
        check_device(self.config.device)
        return kind

    def _run(self, checkpoint: Checkpoint, whitener: Whitener) -> dict[str, Any] | None:
        handler, kind = checkpoint.handler, self.kind
        plan, work = self.prepare(checkpoint, whitener)
        self.destination = {"path": str(self.output), "format": kind.value, "files": [],
                            "report": str(self.report_path), "tensors": handler.output_tensors(checkpoint, plan),
                            "written": False}
        self.checkpoint, self.plan, self.notes = checkpoint, plan, handler.notes(checkpoint, kind)
        if self.config.needs_spectra:  # predictions exist: fail a gate before any SVD work
            self._gate(self.report_now({}))
        work = self.compute(checkpoint, plan, work)
        if work is None:  # another process writes the output
            return None
        self.progress.start("factorizing", len(plan.to_factorize))
        try:
            self.destination["files"] = handler.write(
                checkpoint, plan, work, self.output, before_commit=lambda written: self._commit(written, work),
                metadata=output_metadata(plan))
            self.destination["written"] = True
        except GateError:
            write_reports(self.final, self.report_path, self.html_path)
            raise
        finally:
            self.progress.stop()
        return self.final or self.report_now(work.results)  # the report the gates saw (verify included)

    def prepare(self, checkpoint: Checkpoint, whitener: Whitener) -> tuple[Plan, LayerWork]:
        """The plan, and the work that computes each planned layer's factors as the writer asks."""
        plan = make_plan(checkpoint, self.config, spectra=False, read_weights=False, progress=self.progress,
                         whitener=whitener, non_finite=frozenset(self.non_finite), group=self.group)
        whitener.begin_apply(layer.name for layer in plan.to_factorize if layer.calibrated)
        return plan, LayerWork(self.config, whitener, self.progress, check_finite=True)

    def compute(self, checkpoint: Checkpoint, plan: Plan, work: LayerWork) -> Any:
        """Work done before writing (a distributed or resumable run's, :mod:`factorize_cli.scaleout`); the
        work the writer then asks for each layer's factors, or None where another process writes (under
        torchrun, rank 0 writes). Here nothing: the writer factorizes each layer as it reads it."""
        return work if self.group.lead else None

    def decorate(self, report: dict[str, Any]) -> dict[str, Any]:
        """What a variant adds to the report (a live run's per-layer method)."""
        return report

    def report_now(self, results: dict) -> dict[str, Any]:
        report = build_report(command="apply", checkpoint=self.checkpoint, plan=self.plan, results=results,
                              output=self.destination, notes=self.notes, timing=_timing(self.started, self.t0))
        if self.label is not None:
            report["input"]["path"] = self.label
        return self.decorate(report)

    def _gate(self, report: dict[str, Any]) -> None:
        if not report["gates"]["passed"]:
            if self.group.lead:  # under torchrun every rank knows the gates failed; rank 0 writes the report
                write_reports(report, self.report_path, self.html_path)
            raise_for_gates(report)

    def _commit(self, written: Path, work: LayerWork) -> None:
        """Runs once the output is complete, before it is renamed into place: the gates, --verify."""
        self.final.update(self.report_now(work.results))
        if self.verifier is not None:
            verdict = self.final["verify"] = self.verifier(written, self.specs, self.verify_tol)
            if not verdict["passed"]:
                gates = self.final["gates"]
                gates["passed"] = False
                gates["checked"].append("verify")
                gates["violations"].append(f"--verify: max relative output difference {verdict['max_rel_diff']:.4g}"
                                           f" > --verify-tol {self.verify_tol:g}")
        raise_for_gates(self.final)


def apply_checkpoint(path: str | Path, output: str | Path, config: FactorizeConfig, *, force: bool = False,
                     report_path: str | Path | None = None, html_path: str | Path | None = None,
                     unsafe_pickle: bool = False, progress: Progress | None = None, label: str | None = None,
                     verify: Sequence[str] = (), verify_tol: float = 0.1, data: str | Path | None = None,
                     text: Any = None, sequential: bool = True, entry: Any = None,
                     resume: bool = False) -> dict[str, Any] | None:
    """Factorize ``path`` into ``output`` and write the JSON report; returns the report.

    With ``data`` (text samples for a Hugging Face folder, input batches for a TorchScript or ``.pt2``
    program) the model is run on them: calibrated and factorized in one go (:mod:`factorize_cli.datarun`),
    ``text`` a TextDataConfig; ``entry`` a program's --method/--reset (:class:`~factorize_cli.graphs.calls.Entry`)
    for ``data`` and ``verify``.
    When a gate fails the report is written, the output is not, and :class:`GateError` is raised.

    Launched by torchrun, or with ``resume``, the layers are computed into a journal beside the output
    first (:mod:`factorize_cli.scaleout`); then rank 0 writes, and the other ranks return None.
    """
    from factorize_cli import distributed
    from factorize_cli.graphs.calls import Entry
    from factorize_cli.graphs.verify import VerifyInputs

    source, output = Path(path), Path(output)
    group = distributed.current(config.device)
    config = replace(config, device=group.device(config.device))

    def refusals() -> ApplyRun:
        args = (source, output, config, Path(report_path) if report_path else default_report_path(output),
                Path(html_path) if html_path else None, label, VerifyInputs.parse(verify, entry or Entry()),
                verify_tol, progress or Silent())
        if data is None and (group.distributed or resume):
            from factorize_cli.scaleout import SharedApply

            run: ApplyRun = SharedApply(*args, group=group, resume=resume)
        elif data is None:
            run = ApplyRun(*args)
        else:
            if resume:
                raise UsageError("--data is not resumable: its layers are refit one after another on the model "
                                 "as it runs; drop --resume")
            from factorize_cli.datarun import ApplyWithData
            from factorize_cli.textdata import TextDataConfig

            if config.calibration:
                raise UsageError("--data calibrates as it goes: drop --calibration")
            run = ApplyWithData(*args, data=Path(data), text=text or TextDataConfig(), sequential=sequential,
                                entry=entry, group=group)
        read = _inputs(source, config) + ([Path(data)] if data is not None else [])
        if run.specs is not None and not run.specs.specs:  # --verify FILE: an input too
            read.append(Path(run.specs.calls.source))
        check_targets({"output": output, "report": run.report_path, "HTML report": run.html_path}, read,
                      force=force)
        return run

    run, checkpoint = _together(group, refusals, source, unsafe_pickle)
    with checkpoint, Whitener(config.calibration, keep_for_apply=True) as whitener:
        report = run.run(checkpoint, whitener)
    if report is not None:
        write_reports(report, run.report_path, run.html_path)
    return report


def _together(group: Group, refusals: Callable[[], Any], source: str | Path, unsafe_pickle: bool
              ) -> tuple[Any, Checkpoint]:
    """The up-front refusals, then the input opened, as one stage of the ranks (:meth:`Group.step`): a
    refusal every rank meets alike (the output exists, the input is the output) is printed once, by rank 0,
    and one rank's unreadable input stops them all. ``refusals()``'s value, and the opened checkpoint."""
    checkpoint = None
    try:
        with group.step():
            value = refusals()
            checkpoint = open_checkpoint(source, unsafe_pickle=unsafe_pickle)
    except BaseException:
        if checkpoint is not None:  # another rank failed
            checkpoint.close()
        raise
    return value, checkpoint


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
        work = LayerWork(config, whitener)
        out = checkpoint.handler.state_dict(checkpoint, plan, work)
    report = build_report(command="apply", checkpoint=checkpoint, plan=plan, results=work.results, output=None,
                          notes=[], timing=_timing(started, t0))
    return out, report
