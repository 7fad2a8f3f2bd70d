"""``factorize_(model, config, data)``: factorize a live model in place, the way torchao's ``quantize_`` does.

Candidates come from module structure (exactly ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` with ``groups ==
1``, and transformers ``Conv1D``); the planner, its rank policies and the selection rules are the CLI's;
each selected layer is swapped for its factorized pair (:class:`~factorize_cli.modules.FactorizedLinear`,
...) holding the factors in the layer's dtype, on its device. The report's ``method`` says per layer how
its factors were computed:

- ``plain`` (no data): truncated SVD, the very factors :func:`factorize_state_dict` computes.
- ``whitened`` (data, ``sequential=False``): each layer whitened by the second moment of its inputs in
  the original model (SVD-LLM).
- ``sequential`` (data, the default): layer by layer in forward order, the closed form of
  :mod:`factorize_cli.compensation` from the inputs ``X'`` a layer sees once the layers before it are
  factorized and its inputs ``X`` in the original model: each layer makes up for the error before it.

How the data runs work (probe, paired statistics, memory): :mod:`factorize_cli.runs`.

The originals are kept until the end: an error, or a failed gate, puts every one of them back. Data
runs use eval mode under ``torch.no_grad()`` (dropout would make ``X`` and ``X'`` disagree); every
module's training flag is restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import torch
from torch import nn

from factorize_cli.runs import PLAIN, Calibration, ModuleTaps, Swaps, Taps, eval_mode
from factorize_cli.config import BudgetPolicy, FactorizeConfig
from factorize_cli.distributed import SOLO, Group
from factorize_cli.errors import GateError, UsageError, describe
from factorize_cli.formats.base import Checkpoint, TensorInfo, dtype_name, shared_storage
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.orientation import Orientation, module_fact
from factorize_cli.planning import LayerPlan, Plan, build_plan
from factorize_cli.progress import Progress, Silent
from factorize_cli.report import LayerResult, build_report
from factorize_cli.selection import Candidate, Refusal, SkipReason, screen

FORMAT = "module"  # the report's input format for a live model


class Method(str, Enum):
    """How a layer's factors were computed (the report's ``method``)."""

    PLAIN = "plain"
    WHITENED = "whitened"
    SEQUENTIAL = "sequential"


def factorize_(model: nn.Module, config: FactorizeConfig | None = None, data: Iterable[Any] | None = None, *,
               sequential: bool = True) -> dict[str, Any]:
    """Factorize ``model``'s layers in place; returns the report (the CLI's JSON report, with ``method``).

    ``data`` is an iterable of batches, each a tensor, a tuple of positional inputs or a dict of keyword
    inputs (as ``model(batch)``, ``model(*batch)``, ``model(**batch)``); it is iterated several times, so
    give a list or a DataLoader, not a generator. Without it the factors are plain truncated SVD. With it
    they are whitened by each layer's inputs; ``sequential`` (the default) also compensates, layer by
    layer, the error of the layers factorized before (it only matters with data). Layers that the data
    never reaches get plain SVD, and the report says so. Ranks are planned once, up front, with the CLI's
    policies (spectra whitened by one-shot statistics when the policy needs spectra).

    Raises :class:`~factorize_cli.errors.UsageError` for arguments it cannot use and
    :class:`~factorize_cli.errors.GateError` (the model left as it was) when a gate of ``config`` fails.
    """
    config = config if config is not None else FactorizeConfig()
    _check_arguments(model, config, data)
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    checkpoint = _view(model)

    def report(run: LiveRun) -> dict[str, Any]:
        return run.report(checkpoint, timing=timing(started, t0))

    def gate(run: LiveRun) -> None:  # predictions exist: fail a gate before any SVD work
        if config.needs_spectra and not (early := report(run))["gates"]["passed"]:
            raise GateError(early["gates"]["violations"], early)

    swaps = Swaps(model)
    try:
        final = report(run_live(model, config, data, swaps, sequential=sequential, before_work=gate))
        if not final["gates"]["passed"]:
            raise GateError(final["gates"]["violations"], final)
    except BaseException:
        swaps.undo()
        raise
    return final


def timing(started: datetime, t0: float) -> dict[str, Any]:
    return {"started_at": started.isoformat(timespec="seconds"), "seconds": round(time.perf_counter() - t0, 3)}


@dataclass
class LiveRun:
    """A live model's plan and what executing it did: results and method by layer name."""

    plan: Plan
    notes: list[str]
    results: dict[str, LayerResult] = field(default_factory=dict)
    methods: dict[str, Method] = field(default_factory=dict)

    def report(self, checkpoint: Checkpoint, *, output: dict | None = None, timing: dict[str, Any]) -> dict[str, Any]:
        report = build_report(command="apply", checkpoint=checkpoint, plan=self.plan, results=self.results,
                              output=output, notes=self.notes, timing=timing)
        for entry in report["layers"]:
            method = self.methods.get(entry["name"])
            entry["method"] = method.value if method is not None else None
        return report


@dataclass(frozen=True)
class Subject:
    """What a live run plans and factorizes, whatever runs: the candidates, their live weights (by layer
    name; the sensitivity probe changes one at a time and restores it), the taps that reach the layers'
    inputs, and ``install(layer, first, second)``, which puts a layer's factors into the model."""

    candidates: tuple[Candidate, ...]
    weights: Mapping[str, torch.Tensor]
    taps: Taps
    install: Callable[[LayerPlan, torch.Tensor, torch.Tensor], None]
    source: str
    fmt: str
    notes: tuple[str, ...] = ()


def run_live(model: nn.Module, config: FactorizeConfig, data: Iterable[Any] | None, swaps: Swaps, *,
             sequential: bool, before_work: Callable[[LiveRun], None] = lambda run: None,
             progress: Progress | None = None, group: Group = SOLO, everything: Iterable[Any] | None = None
             ) -> LiveRun:
    """Plan ``model``'s layers, call ``before_work`` with the plan, then factorize them into ``swaps``
    (the caller undoes the swaps when it fails)."""
    found = model_layers(model, shared_storage(model.state_dict()))
    modules = {c.name: m for c, m in found}

    def install(layer: LayerPlan, first: torch.Tensor, second: torch.Tensor) -> None:
        swaps.put(layer.name, _pair(modules[layer.name], layer, first, second))

    subject = Subject(tuple(c for c, _ in found), {n: m.weight for n, m in modules.items()},
                      ModuleTaps(model, modules), install, f"<{type(model).__name__}>", FORMAT)
    with eval_mode(model) if data is not None else nullcontext():
        return run_subject(subject, config, data, swaps, sequential=sequential, before_work=before_work,
                           progress=progress, group=group, everything=everything)


def run_subject(subject: Subject, config: FactorizeConfig, data: Iterable[Any] | None, swaps: Any, *,
                sequential: bool, before_work: Callable[[LiveRun], None] = lambda run: None,
                progress: Progress | None = None, group: Group = SOLO, everything: Iterable[Any] | None = None
                ) -> LiveRun:
    """Plan the subject's layers, call ``before_work`` with the plan, then factorize them, each installed
    by the subject (``swaps``: where installed layers are undone for the original model's runs).

    Under torchrun (``group``) ``data`` is this rank's share of ``everything``: the data runs' sums are
    added up over the ranks, each layer's spectrum, sensitivity and factors are computed by one rank and
    given to all (every rank installs every layer, in the same order, before the next layers' runs)."""
    progress = progress or Silent()
    plan, calibration = _plan(subject, config, data, progress, group, everything)
    run = LiveRun(plan, calibration.notes(sequential) if calibration is not None else [])
    before_work(run)
    progress.start("sequential factors" if sequential and calibration else "factors", len(plan.to_factorize))
    try:
        run.results, run.methods = _execute(plan, subject, config, calibration, swaps, sequential=sequential,
                                            progress=progress, group=group)
    finally:
        progress.stop()
    if calibration is not None:  # the batches counted by the runs that were made
        run.notes = calibration.notes(sequential)
    return run


def _check_arguments(model: Any, config: Any, data: Any) -> None:
    if not isinstance(model, nn.Module):
        raise UsageError(f"factorize_ takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError("factorize_ cannot swap the submodules of a TorchScript module; save it and run "
                         "`factorize apply model.pt out.pt` on the archive instead")
    if not isinstance(config, FactorizeConfig):
        raise UsageError(f"config must be a FactorizeConfig, got {type(config).__name__}")
    if config.calibration is not None:
        raise UsageError("config.calibration names a statistics file for the state-dict path; factorize_ takes "
                         "its calibration batches as data=")
    from factorize_cli.devices import check_device

    check_device(config.device)
    if data is None:
        return
    if isinstance(data, (torch.Tensor, Mapping, str, bytes)):
        raise UsageError(f"data= is an iterable of batches, not a single {type(data).__name__}; wrap one batch "
                         "in a list: data=[batch]")
    try:
        iterator = iter(data)
    except TypeError:
        raise UsageError(f"data= must be an iterable of batches, got {type(data).__name__}") from None
    if iterator is data:
        raise UsageError("data= is an iterator, which the first run would exhaust: factorize_ runs over the data "
                         "several times; give a list (or a DataLoader)")


def _view(model: nn.Module) -> Checkpoint:
    """The model's state dict as the report sees a checkpoint (its tensors, and which share storage)."""
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return Checkpoint(path=f"<{type(model).__name__}>", format=FORMAT, reader=None,
                      infos=[TensorInfo(k, tuple(t.shape), dtype_name(t.dtype)) for k, t in tensors.items()],
                      tied=shared_storage(tensors))


_LAYER_TYPES = ((nn.Linear, LayerKind.LINEAR), (nn.Conv1d, LayerKind.CONV1D), (nn.Conv2d, LayerKind.CONV2D))


def model_layers(model: nn.Module, tied: Mapping[str, str]) -> list[tuple[Candidate, nn.Module]]:
    """Candidates from module structure: the layers factorize_ swaps, and subclasses of them (refused,
    so that the report says why they are left alone)."""
    from factorize_cli.modules import FACTORIZED

    pairs = [f"{n}." for n, m in model.named_modules() if isinstance(m, tuple(FACTORIZED.values()))]
    found = []
    for name, module in model.named_modules():
        fact = module_fact(module)
        kind = fact.kind or next((k for t, k in _LAYER_TYPES if isinstance(module, t)), None)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, torch.Tensor):
            continue
        refusal, unsafe = None, None
        if fact.kind is None:
            refusal = Refusal(SkipReason.MODULE_TYPE, f"a {type(module).__name__}: only exactly nn.Linear/nn.Conv1d/"
                                                      "nn.Conv2d and transformers Conv1D modules are factorized")
        elif not name:
            unsafe = "the model itself is the layer: factorize_ swaps submodules; wrap it in an nn.Sequential"
        elif owner := next((p for p in pairs if name.startswith(p)), None):
            unsafe = f"a factor of {owner[:-1]}, which is factorized already"
        prefix = f"{name}." if name else ""
        bias = getattr(module, "bias", None)
        bias_info = TensorInfo(f"{prefix}bias", tuple(bias.shape), dtype_name(bias.dtype)) \
            if isinstance(bias, torch.Tensor) else None
        shape = tuple(weight.shape)
        if len(shape) != {LayerKind.LINEAR: 2, LayerKind.CONV1D: 3, LayerKind.CONV2D: 4}[kind]:
            continue
        geometry = Geometry.from_weight_shape(kind, shape, bias_info is not None,
                                              transposed=fact.orientation is Orientation.IN_OUT)
        key = f"{prefix}weight"
        found.append((Candidate(name=name, weight=TensorInfo(key, shape, dtype_name(weight.dtype)), bias=bias_info,
                                geometry=geometry, from_structure=True, groups=int(getattr(module, "groups", 1)),
                                tied_with=tied.get(key), unsafe=unsafe, refusal=refusal), module))
    return found


def _plan(subject: Subject, config: FactorizeConfig, data: Iterable[Any] | None, progress: Progress,
          group: Group = SOLO, everything: Iterable[Any] | None = None) -> tuple[Plan, Calibration | None]:
    """The CLI's plan for the model's layers; with data, which layers it reaches and (when the policy
    needs spectra) their whitened spectra and, for a budget, each layer's measured output sensitivity."""
    from factorize_cli.factorization import all_finite, choose_engine, singular_values

    weights = subject.weights
    screened = [c for c in subject.candidates if screen(c, config.selection).reason is None]
    finite = [c for c in screened if all_finite(weights[c.name].detach())]
    calibration = Calibration(subject.taps, data, {c.name: c.geometry for c in finite}, group=group,
                              everything=everything) if data is not None else None
    measured = _Measured()
    if config.needs_spectra:
        engines = {c.name: config.svd if config.svd in ("exact", "gram") else choose_engine(c.geometry)
                   for c in finite}
        if calibration is not None:
            progress.start("whitened spectra and sensitivities" if isinstance(config.policy, BudgetPolicy)
                           else "whitened spectra", len(calibration.called))
            try:
                measured = _calibrated_spectra(subject, calibration, config, engines, progress)
            finally:
                progress.stop()
        plain = {c.name: (c.geometry.cost, lambda c=c: singular_values(weights[c.name].detach(), c.geometry,
                                                                       engine=engines[c.name], device=config.device))
                 for c in finite if c.name not in measured.spectra}
        measured.spectra.update(group.shared(plain))
    names = {c.name for c in finite}

    def inspect(layer: LayerPlan) -> LayerPlan:
        if layer.name not in names:
            return layer.skipped(SkipReason.NON_FINITE, "weight holds NaN or Inf values")
        if calibration is not None:
            why_not = measured.plain.get(layer.name) or calibration.why_not(layer.name)
            layer = replace(layer, calibrated=why_not is None, detail=why_not or "")
        if not config.needs_spectra:
            return layer
        return replace(layer, spectrum=measured.spectra[layer.name], sensitivity=measured.sensitivity.get(layer.name))

    plan = build_plan(list(subject.candidates), config, source=subject.source, fmt=subject.fmt, inspect=inspect,
                      notes=subject.notes)
    return plan, calibration


@dataclass
class _Measured:
    """What the data runs measured for planning, by layer name."""

    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    plain: dict[str, str] = field(default_factory=dict)  # calibrated layers whose whitening failed, and why
    sensitivity: dict[str, float] = field(default_factory=dict)  # see factorize_cli.sensitivity


def _calibrated_spectra(subject: Subject, calibration: Calibration, config: FactorizeConfig,
                        engines: Mapping[str, str], progress: Progress) -> _Measured:
    """Whitened spectra of the layers the data reaches; under a budget, also their output sensitivity
    (one run of the first calibration batches per layer, with the layer at its reference rank)."""
    from factorize_cli.execution import layer_seed
    from factorize_cli.factorization import whitened_singular_values
    from factorize_cli.sensitivity import OutputProbe, first_samples, layer_sensitivity

    measured = _Measured()
    budget = config.policy if isinstance(config.policy, BudgetPolicy) else None
    probe = OutputProbe(subject.taps.output, first_samples(calibration.everything)) if budget is not None else None

    def measure(name: str, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, float | None]:
        live, geometry = subject.weights[name], calibration.geometries[name]
        spectrum = whitened_singular_values(live.detach(), geometry, pair[0], engine=engines[name],
                                            device=config.device)
        value = layer_sensitivity(probe, live, geometry, pair, budget.fraction, engine=config.svd,
                                  seed=layer_seed(config.seed, name), device=config.device) if probe else None
        return spectrum, value

    for group, moment, _ in calibration.one_shot(calibration.groups):
        pair = _whitening(moment)
        if isinstance(pair, str):
            measured.plain.update(dict.fromkeys(group.names, pair))
        else:
            tasks = {name: (calibration.geometries[name].cost, lambda name=name: measure(name, pair))
                     for name in group.names}
            for name, (spectrum, value) in calibration.group.shared(tasks).items():
                measured.spectra[name] = spectrum
                if value is not None:
                    measured.sensitivity[name] = value
        for name in group.names:
            progress.advance(name)
    return measured


def _whitening(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | str:
    from factorize_cli.factorization import whitening

    try:
        return whitening(moment)
    except (ValueError, torch.linalg.LinAlgError) as e:
        return f"whitening failed ({describe(e)})" + PLAIN


def _execute(plan: Plan, subject: Subject, config: FactorizeConfig, calibration: Calibration | None,
             swaps: Any, *, sequential: bool, progress: Progress, group: Group = SOLO
             ) -> tuple[dict[str, LayerResult], dict[str, Method]]:
    """Compute every planned layer's factors and swap in its pair: plain layers first, then the
    calibrated ones group by group (in forward order when sequential). Each layer's factors are computed
    by one rank (:meth:`Group.shared`) and installed by all, in plan order."""
    from factorize_cli.compensation import compensated_factors
    from factorize_cli.factorization import as_matrix, factorize_whitened
    from factorize_cli.execution import LayerWork, layer_seed
    from factorize_cli.whitening import Whitener

    work = LayerWork(config, Whitener(None))
    results: dict[str, LayerResult] = {}
    methods: dict[str, Method] = {}
    layers = {layer.name: layer for layer in plan.to_factorize}
    weights = subject.weights

    def plain(layer: LayerPlan, fallback: str | None = None) -> _Done:
        outcome, result = work.factorize(replace(layer, calibrated=False), weights[layer.name].detach())
        return _Done(outcome.factors.first, outcome.factors.second, replace(result, fallback=fallback), Method.PLAIN)

    def finish(tasks: Mapping[str, Callable[[], _Done]]) -> None:
        done = group.shared({name: (layers[name].geometry.cost, task) for name, task in tasks.items()})
        for name, value in done.items():
            results[name], methods[name] = value.result, value.method
            subject.install(layers[name], value.first, value.second)
            progress.advance(name)

    finish({layer.name: lambda layer=layer: plain(layer) for layer in plan.to_factorize if not layer.calibrated})
    if calibration is None:
        return results, methods
    groups = calibration.restricted([name for name, layer in layers.items() if layer.calibrated])
    if not sequential:
        def whitened(layer: LayerPlan, pair: tuple[torch.Tensor, torch.Tensor] | str) -> _Done:
            if isinstance(pair, str):
                return plain(layer, pair)
            weight = weights[layer.name].detach()
            try:
                done = factorize_whitened(weight, layer.geometry, layer.rank, *pair, engine=config.svd,
                                          seed=layer_seed(config.seed, layer.name), device=config.device)
            except torch.linalg.LinAlgError as e:
                return plain(layer, f"the whitened SVD failed ({describe(e)})" + PLAIN)
            outcome = done.outcome
            return _Done(outcome.factors.first, outcome.factors.second,
                         _result(layer, outcome, done.output_error, outcome.factors.stats.norm),
                         Method.WHITENED)

        for members, moment, _ in calibration.one_shot(groups, swaps):
            pair = _whitening(moment)
            finish({name: lambda name=name: whitened(layers[name], pair) for name in members.names})
        return results, methods

    def compensated(layer: LayerPlan, paired: Any) -> _Done:
        weight = weights[layer.name].detach()
        try:
            if paired.count == 0:
                raise ValueError("no input rows")
            done = compensated_factors(weight, layer.geometry, layer.rank, paired.moment / paired.count,
                                       paired.cross / paired.count, float(paired.energy[layer.name]) / paired.count,
                                       engine=config.svd, seed=layer_seed(config.seed, layer.name),
                                       device=config.device)
        except (ValueError, torch.linalg.LinAlgError) as e:
            return plain(layer, f"the error-compensating closed form failed ({describe(e)})" + PLAIN)
        return _Done(done.outcome.factors.first, done.outcome.factors.second,
                     _result(layer, done.outcome, done.output_error, done.output_norm), Method.SEQUENTIAL)

    for members in groups:
        matrices = {n: as_matrix(weights[n], layers[n].geometry).to(torch.float64) for n in members.names}
        paired = calibration.paired(members, swaps, matrices)
        del matrices
        finish({name: lambda name=name, paired=paired: compensated(layers[name], paired) for name in members.names})
        del paired
    return results, methods


@dataclass(frozen=True)
class _Done:
    """One layer's factors, result and method (what a rank computes and every rank installs)."""

    first: torch.Tensor
    second: torch.Tensor
    result: LayerResult
    method: Method


def _result(layer: LayerPlan, outcome: Any, output_error: float | None, output_norm: float | None) -> LayerResult:
    factors = outcome.factors
    full = len(factors.sigma) == layer.geometry.max_rank
    return LayerResult(outcome.achieved_error, factors.stats.energy_kept, outcome.norm, outcome.engine,
                       factors.sigma if full else None, output_error, output_norm)


def _pair(module: nn.Module, layer: LayerPlan, first: torch.Tensor, second: torch.Tensor) -> nn.Module:
    """The factorized pair replacing ``module``: its dtype, device, training flag and ``requires_grad``."""
    from factorize_cli.modules import FACTORIZED, FactorizedLinear, set_factors

    assert layer.rank is not None
    if layer.geometry.transposed:  # transformers Conv1D
        new = FactorizedLinear.from_conv1d(module, layer.rank, from_weights=False)
    elif type(module) is nn.Linear:
        new = FactorizedLinear.from_linear(module, layer.rank, from_weights=False)
    else:
        new = FACTORIZED[type(module)].from_conv(module, layer.rank, from_weights=False)
    set_factors(new, first, second, module.bias)
    new.requires_grad_(module.weight.requires_grad)
    return new.train(module.training)


