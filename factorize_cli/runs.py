"""The runs of a live model over calibration data, for :func:`factorize_cli.api.factorize_`.

What reaches the layer inputs is a :class:`Taps`: forward pre-hooks on an nn.Module's layers
(:class:`ModuleTaps`), or the taps a TorchScript or ``.pt2`` program is instrumented with
(:mod:`factorize_cli.graphs.calibrate`); where the factorized layers go is a :class:`Swaps` (module
pairs) or a :class:`WeightSwaps` (weights replaced in place by their factorized products).

How the statistics are gathered. A probe run on the first batch records the order in which layers are
first called, and which of them read the very same input tensor (q/k/v, gate/up): such a group's
statistics are computed once. For each group in that order and each batch, the model runs twice: with
the original layers put back in place of the pairs installed so far (``X``), then as it now is (``X'``).
The taps on the group's first layer accumulate ``S' = X'^T X'``, ``C = X^T X'`` and each
member's ``||X W^T||^2`` in float64, a block of rows at a time: memory holds the inputs of one batch at
one layer, never a run's activations. A run stops as soon as the hooked layer has been called (when the
probe saw it called once per forward), so early layers cost little. One-shot statistics (whitening, and
whitened spectra for policies that need spectra) take one full run per :data:`STATISTICS_BUDGET` bytes.

Data runs use eval mode under ``torch.no_grad()`` (dropout would make ``X`` and ``X'`` disagree); every
module's training flag is restored afterwards (:func:`eval_mode`). :class:`Swaps` keeps the originals
until the end: an error, or a failed gate, puts every one of them back.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from factorize_cli.calibration import input_rows, padding_mask, run_batch
from factorize_cli.errors import UsageError
from factorize_cli.geometry import Geometry

STATISTICS_BUDGET = 1 << 30  # bytes of float64 one-shot statistics gathered in one run over the data
_ROWS = 4096  # rows per float64 block while accumulating
PLAIN = ": plain SVD"


class Swaps:
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
def eval_mode(model: nn.Module) -> Iterator[None]:
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
class Group:
    """Planned layers that read the very same input tensor, in call order: their statistics are the first's."""

    names: tuple[str, ...]
    once: bool  # the probe saw the first called exactly once per forward: a run may stop right after it

    @property
    def leader(self) -> str:
        return self.names[0]


@dataclass
class Paired:
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


class Taps(Protocol):
    """How the statistics reach a runnable model's layer inputs, whatever the model is (an nn.Module
    here, a TorchScript or ``.pt2`` program in :mod:`factorize_cli.graphs.calibrate`)."""

    holds_inputs: bool  # inputs are handed over once the batch has run: a run holds those of every layer it taps

    def run(self, batch: Any, names: Iterable[str], on_input: Callable[[str, Any], None], *, early: bool,
            values: bool = True) -> None:
        """Run the model on ``batch``, calling ``on_input(name, x)`` on each input of the named layers, in
        call order; with ``early`` it may stop once each has been called. ``values=False``: only the calls
        and the inputs' identities are wanted (``x`` may then be a token standing for the input)."""

    def rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The rows layer ``name``'s weight matrix multiplies, from one of its inputs in the running batch."""

    def rows_key(self, name: str) -> tuple:
        """What decides how the layer cuts its input into rows (layers reading one tensor with equal keys
        have equal rows)."""

    def output(self, batch: Any) -> Any:
        """The model's output on ``batch``."""


class ModuleTaps:
    """:class:`Taps` of an nn.Module: forward pre-hooks on its layer modules."""

    holds_inputs = False

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
        self.model, self.modules = model, modules
        self.keep: torch.Tensor | None = None  # the running batch's real tokens (attention mask)

    def run(self, batch: Any, names: Iterable[str], on_input: Callable[[str, Any], None], *, early: bool,
            values: bool = True) -> None:
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
                self.keep = padding_mask(batch)  # padding rows are left out of every statistic
                run_batch(self.model, batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()

    def rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return input_rows(self.modules[name], x, self.keep)

    def rows_key(self, name: str) -> tuple:
        return _rows_key(self.modules[name])

    def output(self, batch: Any) -> Any:
        return run_batch(self.model, batch)


class WeightSwaps:
    """:class:`Swaps` for a program whose layers cannot be swapped: each factorized layer's weight is
    replaced in place by its product ``second @ first`` (the factorized layer's function, up to float
    rounding), the original kept until the end."""

    def __init__(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.weights = weights
        self.done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (original, product)

    @property
    def names(self) -> set[str]:
        return set(self.done)

    def put(self, name: str, product: torch.Tensor) -> None:
        weight = self.weights[name]
        product = product.to(device=weight.device, dtype=weight.dtype).reshape(weight.shape)
        self.done[name] = (weight.detach().clone(), product)
        with torch.no_grad():
            weight.copy_(product)

    def _set(self, which: int) -> None:
        with torch.no_grad():
            for name, pair in self.done.items():
                self.weights[name].copy_(pair[which])

    @contextmanager
    def originals(self) -> Iterator[None]:
        self._set(0)
        try:
            yield
        finally:
            self._set(1)

    def undo(self) -> None:
        self._set(0)
        self.done.clear()


class Calibration:
    """The model's runs over the data: the probe, one-shot and paired statistics."""

    def __init__(self, taps: Taps, data: Iterable[Any], geometries: dict[str, Geometry], *, group: Any = None,
                 everything: Iterable[Any] | None = None) -> None:
        """``geometries``: the layers to follow (their names are ``taps``'). Under torchrun (``group``)
        ``data`` is this rank's share of ``everything``: each run's sums are added up over the ranks, so
        every rank gets the statistics of all the data; the probes use the leading batches of all of it."""
        from factorize_cli.distributed import SOLO

        self.taps, self.data, self.geometries = taps, data, geometries
        self.group = group or SOLO
        self.everything = everything if everything is not None else data
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

    def _probe(self) -> list[Group]:
        """Call order and shared inputs, from one run on the first batch."""
        missing = object()
        first = next(iter(self.everything), missing)  # the same batch on every rank: the same groups
        if first is missing:
            raise UsageError("data= holds no batches")
        calls = self.calls
        groups: list[list[str]] = []
        inputs: list[tuple[weakref.ref, tuple]] = []  # each group's input (while it lives) and how rows are cut

        def seen(name: str, x: torch.Tensor) -> None:
            calls[name] += 1
            if calls[name] > 1:
                return
            key = self.taps.rows_key(name)
            for members, (ref, cut) in zip(groups, inputs):
                if ref() is x and cut == key:
                    members.append(name)
                    return
            groups.append([name])
            inputs.append((_ref(x), key))

        self.taps.run(first, list(self.geometries), seen, early=False, values=False)
        return [Group(tuple(members), calls[members[0]] == 1) for members in groups]

    def restricted(self, names: Iterable[str]) -> list[Group]:
        """The groups, in call order, with only the named layers (groups left empty are dropped)."""
        wanted = set(names)
        out = []
        for group in self.groups:
            members = tuple(n for n in group.names if n in wanted)
            if members:
                out.append(Group(members, self.calls[members[0]] == 1))
        return out

    def one_shot(self, groups: list[Group], swaps: Swaps | None = None
                 ) -> Iterator[tuple[Group, torch.Tensor, int]]:
        """``(group, mean second moment, rows)`` of each group's inputs in the original model, as many
        groups per run over the data as :data:`STATISTICS_BUDGET` holds (one when the taps hold the
        inputs of a run until it ends)."""
        chunk: list[Group] = []
        size = 0
        for group in groups:
            need = self.geometries[group.leader].fan_in ** 2 * 8
            if chunk and (self.taps.holds_inputs or size + need > STATISTICS_BUDGET):
                yield from self._moments(chunk, swaps)
                chunk, size = [], 0
            chunk.append(group)
            size += need
        if chunk:
            yield from self._moments(chunk, swaps)

    def _moments(self, groups: list[Group], swaps: Swaps | None) -> Iterator[tuple[Group, torch.Tensor, int]]:
        sums: dict[str, Paired] = {g.leader: Paired() for g in groups}

        def add(name: str, x: torch.Tensor) -> None:
            rows = self.taps.rows(name, x)
            sums[name].add(rows, rows, {})

        self.batches = 0
        with self.group.step(), swaps.originals() if swaps is not None else nullcontext():
            for batch in self.data:
                self.taps.run(batch, list(sums), add, early=all(g.once for g in groups))
                self.batches += 1
        self._count_batches()
        for group in groups:
            s = self._summed(sums.pop(group.leader), group.leader, {})
            moment = s.moment / s.count if s.moment is not None and s.count else \
                torch.zeros(self.geometries[group.leader].fan_in, self.geometries[group.leader].fan_in,
                            dtype=torch.float64)
            yield group, moment, s.count

    def paired(self, group: Group, swaps: Swaps, weights: Mapping[str, torch.Tensor]) -> Paired:
        """The group's sums over every batch, ``X`` from the original model and ``X'`` from the model as it
        is; ``weights``: each member's ``out x fan_in`` matrix (float64), for ``||X W^T||^2``."""
        sums = Paired()
        changed = bool(swaps.names & self.called)  # else X' = X: one run per batch
        self.batches = 0
        with self.group.step():
            self._paired_runs(group, swaps, weights, sums, changed)
        self._count_batches()
        return self._summed(sums, group.leader, weights)

    def _paired_runs(self, group: Group, swaps: Swaps, weights: Mapping[str, torch.Tensor], sums: Paired,
                     changed: bool) -> None:
        rows = self.taps.rows
        for batch in self.data:
            before: list[torch.Tensor] = []
            if changed:
                with swaps.originals():
                    self.taps.run(batch, [group.leader], lambda _, x: before.append(x), early=group.once)
            calls = iter(before)

            def add(name: str, x: torch.Tensor) -> None:
                after = rows(name, x)
                if not changed:
                    sums.add(after, after, weights)
                    return
                original = next(calls, None)
                if original is None:
                    raise UsageError(f"{name} is called more often by the factorized model than by the original "
                                     "on the same batch: its inputs cannot be paired; pass sequential=False")
                sums.add(rows(name, original), after, weights)

            self.taps.run(batch, [group.leader], add, early=group.once)
            if next(calls, None) is not None:
                raise UsageError(f"{group.leader} is called less often by the factorized model than by the "
                                 "original on the same batch: its inputs cannot be paired; pass sequential=False")
            self.batches += 1

    def _count_batches(self) -> None:
        if self.group.distributed:
            self.batches = sum(self.group.gather(self.batches))

    def _summed(self, sums: Paired, leader: str, weights: Mapping[str, Any]) -> Paired:
        """Under torchrun: the sums of every rank's share, on every rank (float64, one fixed order)."""
        if not self.group.distributed:
            return sums
        fan_in = self.geometries[leader].fan_in
        device = f"cuda:{self.group.local_rank}" if self.group.backend == "nccl" else "cpu"  # where the others' are
        zeros = torch.zeros(fan_in, fan_in, dtype=torch.float64, device=device)
        moment = sums.moment if sums.moment is not None else zeros
        cross = sums.cross if sums.cross is not None else zeros.clone()
        names = sorted(weights)
        energy = torch.stack([sums.energy[n] for n in names]) if sums.energy is not None and names else \
            torch.zeros(len(names), dtype=torch.float64, device=device)
        count = torch.tensor([sums.count], dtype=torch.int64)
        for tensor in (moment, cross, count, *([energy] if names else [])):
            self.group.all_reduce_(tensor)
        return Paired(moment, cross, {n: energy[i] for i, n in enumerate(names)}, int(count[0]))


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
