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

How the statistics are gathered. A probe run on the first batch records the order in which layers are
first called, and which of them read the very same input tensor (q/k/v, gate/up): such a group's
statistics are computed once. For each group in that order and each batch, the model runs twice: with
the original layers put back in place of the pairs installed so far (``X``), then as it now is (``X'``).
A forward pre-hook on the group's first layer accumulates ``S' = X'^T X'``, ``C = X^T X'`` and each
member's ``||X W^T||^2`` in float64, a block of rows at a time: memory holds the inputs of one batch at
one layer, never a run's activations. A run stops as soon as the hooked layer has been called (when the
probe saw it called once per forward), so early layers cost little. One-shot statistics (whitening, and
whitened spectra for policies that need spectra) take one full run per :data:`STATISTICS_BUDGET` bytes.

The originals are kept until the end: an error, or a failed gate, puts every one of them back. Data
runs use eval mode under ``torch.no_grad()`` (dropout would make ``X`` and ``X'`` disagree); every
module's training flag is restored afterwards.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import torch
from torch import nn

from factorize_cli.calibration import input_rows, run_batch
from factorize_cli.config import FactorizeConfig
from factorize_cli.errors import GateError, UsageError, describe
from factorize_cli.formats.base import Checkpoint, TensorInfo, dtype_name, shared_storage
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.orientation import Orientation, module_fact
from factorize_cli.planning import LayerPlan, Plan, build_plan
from factorize_cli.report import LayerResult, build_report
from factorize_cli.selection import Candidate, Refusal, SkipReason, screen

FORMAT = "module"  # the report's input format for a live model
STATISTICS_BUDGET = 1 << 30  # bytes of float64 one-shot statistics gathered in one run over the data
_ROWS = 4096  # rows per float64 block while accumulating
PLAIN = ": plain SVD"


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
    found = _layers(model, checkpoint.tied)
    modules = {c.name: m for c, m in found}
    swaps = _Swaps(model)
    try:
        with _eval_mode(model) if data is not None else nullcontext():
            plan, calibration = _plan(model, [c for c, _ in found], modules, config, data)

            def report_now(results: dict[str, LayerResult], methods: dict[str, Method]) -> dict[str, Any]:
                notes = calibration.notes(sequential) if calibration is not None else []
                report = build_report(command="apply", checkpoint=checkpoint, plan=plan, results=results,
                                      output=None, notes=notes, timing={
                                          "started_at": started.isoformat(timespec="seconds"),
                                          "seconds": round(time.perf_counter() - t0, 3)})
                for entry in report["layers"]:
                    method = methods.get(entry["name"])
                    entry["method"] = method.value if method is not None else None
                return report

            if config.needs_spectra:  # predictions exist: fail a gate before any SVD work
                early = report_now({}, {})
                if not early["gates"]["passed"]:
                    raise GateError(early["gates"]["violations"], early)
            results, methods = _execute(plan, modules, config, calibration, swaps, sequential=sequential)
        report = report_now(results, methods)
        if not report["gates"]["passed"]:
            raise GateError(report["gates"]["violations"], report)
    except BaseException:
        swaps.undo()
        raise
    return report


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


def _layers(model: nn.Module, tied: Mapping[str, str]) -> list[tuple[Candidate, nn.Module]]:
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


def _plan(model: nn.Module, candidates: list[Candidate], modules: dict[str, nn.Module], config: FactorizeConfig,
          data: Iterable[Any] | None) -> tuple[Plan, _Calibration | None]:
    """The CLI's plan for the model's layers; with data, which layers it reaches and (when the policy
    needs spectra) their whitened spectra."""
    from factorize_cli.factorization import all_finite, choose_engine, singular_values, whitened_singular_values

    screened = [c for c in candidates if screen(c, config.selection).reason is None]
    finite = [c for c in screened if all_finite(modules[c.name].weight.detach())]
    calibration = _Calibration(model, data, {c.name: modules[c.name] for c in finite},
                               {c.name: c.geometry for c in finite}) if data is not None else None
    spectra: dict[str, torch.Tensor] = {}
    plain: dict[str, str] = {}  # calibrated layers whose whitening failed, and why
    if config.needs_spectra:
        engines = {c.name: config.svd if config.svd in ("exact", "gram") else choose_engine(c.geometry)
                   for c in finite}
        if calibration is not None:
            for group, moment, _ in calibration.one_shot(calibration.groups):
                pair = _whitening(moment)
                for name in group.names:
                    if isinstance(pair, str):
                        plain[name] = pair
                    else:
                        spectra[name] = whitened_singular_values(
                            modules[name].weight.detach(), calibration.geometries[name], pair[0],
                            engine=engines[name], device=config.device)
        for c in finite:
            if c.name not in spectra:
                spectra[c.name] = singular_values(modules[c.name].weight.detach(), c.geometry,
                                                  engine=engines[c.name], device=config.device)
    names = {c.name for c in finite}

    def inspect(layer: LayerPlan) -> LayerPlan:
        if layer.name not in names:
            return layer.skipped(SkipReason.NON_FINITE, "weight holds NaN or Inf values")
        if calibration is not None:
            why_not = plain.get(layer.name) or calibration.why_not(layer.name)
            layer = replace(layer, calibrated=why_not is None, detail=why_not or "")
        return replace(layer, spectrum=spectra[layer.name]) if config.needs_spectra else layer

    plan = build_plan(candidates, config, source=f"<{type(model).__name__}>", fmt=FORMAT, inspect=inspect)
    return plan, calibration


def _whitening(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | str:
    from factorize_cli.factorization import whitening

    try:
        return whitening(moment)
    except (ValueError, torch.linalg.LinAlgError) as e:
        return f"whitening failed ({describe(e)})" + PLAIN


def _execute(plan: Plan, modules: dict[str, nn.Module], config: FactorizeConfig, calibration: _Calibration | None,
             swaps: _Swaps, *, sequential: bool) -> tuple[dict[str, LayerResult], dict[str, Method]]:
    """Compute every planned layer's factors and swap in its pair: plain layers first, then the
    calibrated ones group by group (in forward order when sequential)."""
    from factorize_cli.compensation import compensated_factors
    from factorize_cli.factorization import as_matrix, factorize_whitened
    from factorize_cli.execution import LayerWork, layer_seed
    from factorize_cli.whitening import Whitener

    work = LayerWork(config, Whitener(None))

    results: dict[str, LayerResult] = {}
    methods: dict[str, Method] = {}
    layers = {layer.name: layer for layer in plan.to_factorize}

    def install(layer: LayerPlan, first: torch.Tensor, second: torch.Tensor) -> None:
        swaps.put(layer.name, _pair(modules[layer.name], layer, first, second))

    def plain(layer: LayerPlan, fallback: str | None = None) -> None:
        outcome, result = work.factorize(replace(layer, calibrated=False), modules[layer.name].weight.detach())
        results[layer.name] = replace(result, fallback=fallback)
        methods[layer.name] = Method.PLAIN
        install(layer, outcome.factors.first, outcome.factors.second)

    for layer in plan.to_factorize:
        if not layer.calibrated:
            plain(layer)
    if calibration is None:
        return results, methods
    groups = calibration.restricted([name for name, layer in layers.items() if layer.calibrated])
    if not sequential:
        for group, moment, _ in calibration.one_shot(groups, swaps):
            pair = _whitening(moment)
            for name in group.names:
                layer = layers[name]
                if isinstance(pair, str):
                    plain(layer, pair)
                    continue
                weight = modules[name].weight.detach()
                try:
                    whitened = factorize_whitened(weight, layer.geometry, layer.rank, *pair, engine=config.svd,
                                                  seed=layer_seed(config.seed, name), device=config.device)
                except torch.linalg.LinAlgError as e:
                    plain(layer, f"the whitened SVD failed ({describe(e)})" + PLAIN)
                    continue
                outcome = whitened.outcome
                results[name] = _result(weight, layer, outcome, whitened.output_error, outcome.factors.stats.norm)
                methods[name] = Method.WHITENED
                install(layer, outcome.factors.first, outcome.factors.second)
        return results, methods
    for group in groups:
        weights = {n: as_matrix(modules[n].weight, layers[n].geometry).to(torch.float64) for n in group.names}
        paired = calibration.paired(group, swaps, weights)
        del weights
        for name in group.names:
            layer = layers[name]
            weight = modules[name].weight.detach()
            try:
                if paired.count == 0:
                    raise ValueError("no input rows")
                done = compensated_factors(weight, layer.geometry, layer.rank, paired.moment / paired.count,
                                           paired.cross / paired.count, float(paired.energy[name]) / paired.count,
                                           engine=config.svd, seed=layer_seed(config.seed, name),
                                           device=config.device)
            except (ValueError, torch.linalg.LinAlgError) as e:
                plain(layer, f"the error-compensating closed form failed ({describe(e)})" + PLAIN)
                continue
            results[name] = _result(weight, layer, done.outcome, done.output_error, done.output_norm)
            methods[name] = Method.SEQUENTIAL
            install(layer, done.outcome.factors.first, done.outcome.factors.second)
        del paired
    return results, methods


def _result(weight: torch.Tensor, layer: LayerPlan, outcome: Any, output_error: float | None,
            output_norm: float | None) -> LayerResult:
    from factorize_cli.factorization import sum_squares

    factors = outcome.factors
    full = len(factors.sigma) == layer.geometry.max_rank
    return LayerResult(outcome.achieved_error, factors.stats.energy_kept, math.sqrt(sum_squares(weight)),
                       outcome.engine, factors.sigma if full else None, output_error, output_norm)


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


class _Swaps:
    """The pairs put into the model and the originals they replaced, kept until the end: ``undo`` puts
    every original back, and ``originals()`` does so for the duration of a run."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.done: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # (parent, attribute, original, pair)
        self.names: set[str] = set()

    def put(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        self.done.append((parent, child, getattr(parent, child), new))
        self.names.add(name)
        setattr(parent, child, new)

    @contextmanager
    def originals(self) -> Iterator[None]:
        for parent, child, original, _ in self.done:
            setattr(parent, child, original)
        try:
            yield
        finally:
            for parent, child, _, new in self.done:
                setattr(parent, child, new)

    def undo(self) -> None:
        for parent, child, original, _ in reversed(self.done):
            setattr(parent, child, original)
        self.done.clear()
        self.names.clear()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the data runs; afterwards each module's training flag as it was, by name (a pair
    swapped in takes the flag of the layer it replaced)."""
    modules = {m: m.training for m in model.modules()}  # originals swapped out again by an undo included
    names = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in modules.items():
            m.training = flag
        for name, m in model.named_modules():
            if m not in modules:
                owner = name
                while owner not in names:
                    owner = owner.rpartition(".")[0]
                m.training = names[owner]


class _Stop(Exception):
    """Raised by a hook to end a run once the layers it watches have seen their inputs."""


@dataclass(frozen=True)
class _Group:
    """Planned layers that read the very same input tensor, in call order: their statistics are the first's."""

    names: tuple[str, ...]
    once: bool  # the probe saw the first called exactly once per forward: a run may stop right after it

    @property
    def leader(self) -> str:
        return self.names[0]


@dataclass
class _Paired:
    """Float64 sums over the rows of one group's inputs: ``S' = X'^T X'``, ``C = X^T X'``, ``||X W^T||^2``."""

    moment: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    energy: dict[str, torch.Tensor] | None = None
    count: int = 0

    def add(self, before: torch.Tensor, after: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> None:
        if before.shape != after.shape:
            raise RuntimeError(f"internal error: inputs of {tuple(before.shape)} and {tuple(after.shape)} paired")
        same = before is after
        for b, a in zip(before.split(_ROWS), after.split(_ROWS)):
            a = a.to(torch.float64)
            b = a if same else b.to(torch.float64)
            if self.moment is None:
                self.moment = a.new_zeros(a.shape[1], a.shape[1])
                self.cross = a.new_zeros(a.shape[1], a.shape[1])
                self.energy = {name: a.new_zeros(()) for name in weights}
            square = a.T @ a
            self.moment += square
            self.cross += square if same else b.T @ a
            for name, w in weights.items():
                self.energy[name] += (b @ w.to(b.device).T).square().sum()
        self.count += before.shape[0]


class _Calibration:
    """The model's runs over the data: the probe, one-shot and paired statistics."""

    def __init__(self, model: nn.Module, data: Iterable[Any], modules: dict[str, nn.Module],
                 geometries: dict[str, Geometry]) -> None:
        self.model, self.data, self.modules, self.geometries = model, data, modules, geometries
        self.batches = 0
        self.calls: Counter[str] = Counter()  # calls per forward on the probe batch
        self.groups = self._probe()
        self.called = {name for group in self.groups for name in group.names}

    def why_not(self, name: str) -> str | None:
        return None if name in self.called else "not called on the calibration data" + PLAIN

    def notes(self, sequential: bool) -> list[str]:
        how = ("sequential: each layer's factors compensate the error of the layers factorized before it, "
               "from its inputs in the original and in the partly factorized model") if sequential else \
            "whitened: each layer's factors from its inputs in the original model"
        return [f"calibrated on {self.batches} batch(es) in eval mode; {len(self.groups)} distinct layer input(s); "
                + how]

    def _run(self, batch: Any, names: Iterable[str], on_input: Callable[[str, torch.Tensor], None], *,
             early: bool) -> None:
        """Run the model on ``batch`` with ``on_input(name, x)`` called on each input of the named layers;
        with ``early``, stop once each of them has been called."""
        pending = set(names)

        def hook(module: nn.Module, args: tuple, kwargs: dict, *, name: str) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            on_input(name, x)  # the very tensor passed: the probe compares identities
            if early:
                pending.discard(name)
                if not pending:
                    raise _Stop

        handles = [self.modules[n].register_forward_pre_hook(
            lambda m, a, k, n=n: hook(m, a, k, name=n), with_kwargs=True) for n in pending]
        try:
            with torch.no_grad():
                run_batch(self.model, batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()

    def _probe(self) -> list[_Group]:
        """Call order and shared inputs, from one run on the first batch."""
        missing = object()
        first = next(iter(self.data), missing)
        if first is missing:
            raise UsageError("data= holds no batches")
        calls = self.calls
        groups: list[list[str]] = []
        inputs: list[tuple[weakref.ref, tuple]] = []  # each group's input (while it lives) and how rows are cut

        def seen(name: str, x: torch.Tensor) -> None:
            calls[name] += 1
            if calls[name] > 1:
                return
            key = _rows_key(self.modules[name])
            for members, (ref, cut) in zip(groups, inputs):
                if ref() is x and cut == key:
                    members.append(name)
                    return
            groups.append([name])
            inputs.append((_ref(x), key))

        self._run(first, list(self.modules), seen, early=False)
        return [_Group(tuple(members), calls[members[0]] == 1) for members in groups]

    def restricted(self, names: Iterable[str]) -> list[_Group]:
        """The groups, in call order, with only the named layers (groups left empty are dropped)."""
        wanted = set(names)
        out = []
        for group in self.groups:
            members = tuple(n for n in group.names if n in wanted)
            if members:
                out.append(_Group(members, self.calls[members[0]] == 1))
        return out

    def one_shot(self, groups: list[_Group], swaps: _Swaps | None = None
                 ) -> Iterator[tuple[_Group, torch.Tensor, int]]:
        """``(group, mean second moment, rows)`` of each group's inputs in the original model, as many
        groups per run over the data as :data:`STATISTICS_BUDGET` holds."""
        chunk: list[_Group] = []
        size = 0
        for group in groups:
            need = self.geometries[group.leader].fan_in ** 2 * 8
            if chunk and size + need > STATISTICS_BUDGET:
                yield from self._moments(chunk, swaps)
                chunk, size = [], 0
            chunk.append(group)
            size += need
        if chunk:
            yield from self._moments(chunk, swaps)

    def _moments(self, groups: list[_Group], swaps: _Swaps | None) -> Iterator[tuple[_Group, torch.Tensor, int]]:
        sums: dict[str, _Paired] = {g.leader: _Paired() for g in groups}

        def add(name: str, x: torch.Tensor) -> None:
            rows = input_rows(self.modules[name], x)
            sums[name].add(rows, rows, {})

        self.batches = 0
        with swaps.originals() if swaps is not None else nullcontext():
            for batch in self.data:
                self._run(batch, list(sums), add, early=all(g.once for g in groups))
                self.batches += 1
        for group in groups:
            s = sums.pop(group.leader)
            moment = s.moment / s.count if s.moment is not None and s.count else \
                torch.zeros(self.geometries[group.leader].fan_in, self.geometries[group.leader].fan_in,
                            dtype=torch.float64)
            yield group, moment, s.count

    def paired(self, group: _Group, swaps: _Swaps, weights: Mapping[str, torch.Tensor]) -> _Paired:
        """The group's sums over every batch, ``X`` from the original model and ``X'`` from the model as it
        is; ``weights``: each member's ``out x fan_in`` matrix (float64), for ``||X W^T||^2``."""
        layer = self.modules[group.leader]
        sums = _Paired()
        changed = bool(swaps.names & self.called)  # else X' = X: one run per batch
        self.batches = 0
        for batch in self.data:
            before: list[torch.Tensor] = []
            if changed:
                with swaps.originals():
                    self._run(batch, [group.leader], lambda _, x: before.append(x), early=group.once)
            calls = iter(before)

            def add(name: str, x: torch.Tensor) -> None:
                after = input_rows(layer, x)
                if not changed:
                    sums.add(after, after, weights)
                    return
                original = next(calls, None)
                if original is None:
                    raise UsageError(f"{name} is called more often by the factorized model than by the original "
                                     "on the same batch: its inputs cannot be paired; pass sequential=False")
                sums.add(input_rows(layer, original), after, weights)

            self._run(batch, [group.leader], add, early=group.once)
            if next(calls, None) is not None:
                raise UsageError(f"{group.leader} is called less often by the factorized model than by the "
                                 "original on the same batch: its inputs cannot be paired; pass sequential=False")
            self.batches += 1
        return sums


def _ref(x: torch.Tensor) -> Callable[[], torch.Tensor | None]:
    try:
        return weakref.ref(x)
    except TypeError:  # not weak-referenceable: never shared
        return lambda: None


def _rows_key(module: nn.Module) -> tuple:
    """What decides how a layer cuts its input into rows: layers with equal keys reading the same tensor
    have the same rows."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (type(module).__name__, module.kernel_size, module.stride, module.padding, module.dilation,
                module.padding_mode)
    return ("rows",)
