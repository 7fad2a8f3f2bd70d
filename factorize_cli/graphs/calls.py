"""The calls a TorchScript archive or ``.pt2`` program is run on: one format for ``calibrate``,
``apply --data``, ``apply --verify`` and ``evaluate``.

INPUTS is a ``torch.save`` file, loaded with ``weights_only=True``:

- a tensor: one call, ``model(x)``;
- a list of calls: one sequence, run in order (any state the model keeps carries from call to call);
- ``{"sequences": [[call, ...], ...]}``: several sequences, each run in order.

A call is a tensor (the only positional argument), a tuple or list of positional arguments, or
``{"args": (...), "kwargs": {...}}`` (either key may be left out). An argument is a tensor, an int,
float, bool, str or None, or a list, tuple or str-keyed dict of those. The method the calls go to is
``forward`` unless ``--method NAME`` says otherwise; ``--reset METHOD`` calls ``METHOD()`` before each
sequence (silero-vad's ``reset_states``). A ``.pt2`` program exports ``forward`` only, so it takes
neither; its state, if any, lives in buffers its graph mutates and carries over as in TorchScript.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from factorize_cli.errors import InputError, UsageError, describe

_SCALARS = (bool, int, float, str, type(None))
_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
_EXPECTED = "expected a tensor, a list of calls or {'sequences': [[call, ...], ...]}"


@dataclass(frozen=True)
class Entry:
    """How the calls reach the program: the method they call, and the method run before each sequence."""

    method: str = "forward"
    reset: str | None = None

    def __post_init__(self) -> None:
        import re

        for option, name in (("--method", self.method), ("--reset", self.reset)):
            if name is not None and not re.match(_IDENTIFIER, name):
                raise UsageError(f"{option} {name!r} is not a method name")

    @property
    def is_default(self) -> bool:
        return self == Entry()

    def describe(self) -> str:
        reset = f", {self.reset}() before each sequence" if self.reset else ""
        return f"{self.method}{reset}"


@dataclass(frozen=True, eq=False)
class Call:
    """One call: positional and keyword arguments. ``starts``: the first call of a sequence (the reset runs
    before it)."""

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    starts: bool = True

    def to(self, device: str) -> Call:
        return Call(_moved(self.args, device), _moved(self.kwargs, device), self.starts)


@dataclass(frozen=True, eq=False)
class Calls:
    """The sequences of an INPUTS file and how they reach the program."""

    source: str  # for messages
    sequences: tuple[tuple[Call, ...], ...]
    entry: Entry = Entry()
    split: bool = False  # a share of the file's sequences: other processes of a torchrun launch run the rest

    def __iter__(self) -> Iterator[Call]:
        """Every call, in order; a sequence's first one has ``starts``."""
        for sequence in self.sequences:
            yield from sequence

    def __len__(self) -> int:
        return sum(len(s) for s in self.sequences)

    def dealt(self, group: Any) -> Calls:
        """This rank's share under torchrun: whole sequences (a sequence may carry state from call to call),
        dealt by number of calls, ``split`` when other ranks run some; in one process, all of them."""
        if not group.distributed:
            return self
        mine = group.share([float(len(s)) for s in self.sequences])
        return replace(self, sequences=tuple(self.sequences[i] for i in mine), split=len(mine) < len(self.sequences))

    @property
    def stateful(self) -> bool:
        """Whether a call may depend on the ones before it (a run must not stop one early)."""
        return self.entry.reset is not None or any(len(s) > 1 for s in self.sequences)

    def check(self, program: Any, what: str, path: Path | str) -> None:
        """That ``program`` (a loaded TorchScript module or .pt2 module) has the methods the calls need."""
        if isinstance(program, torch.jit.ScriptModule):
            names = program._c._method_names()
            for option, name in (("--method", self.entry.method), ("--reset", self.entry.reset)):
                if name is not None and name not in names:
                    raise InputError(f"{path}: {option} {name}: the {what} has no such method "
                                     f"(it has: {', '.join(sorted(names))})")
        elif self.entry.method != "forward" or self.entry.reset is not None:
            option = "--method" if self.entry.method != "forward" else "--reset"
            raise UsageError(f"{option}: a {what} exports forward only (torch.export saves no other method); "
                             "keep state in buffers its forward updates, and no --method/--reset")

    def torch_save_form(self) -> dict[str, Any]:
        """The calls as plain data (for a child process that cannot import this package)."""
        return {"sequences": [[(c.args, c.kwargs) for c in s] for s in self.sequences],
                "method": self.entry.method, "reset": self.entry.reset}

    def summary(self) -> str:
        return f"{len(self.sequences)} sequence(s), {len(self)} call(s) of {self.entry.describe()}"


def run(program: Any, call: Call, entry: Entry) -> Any:
    """Run one call of ``program`` (its reset first when the call starts a sequence)."""
    if call.starts and entry.reset is not None:
        getattr(program, entry.reset)()
    return getattr(program, entry.method)(*call.args, **call.kwargs)


def load_calls(inputs: str | Path, entry: Entry = Entry(), device: str = "cpu") -> Calls:
    """Load and check an INPUTS file (see the module); every problem is one line naming where it is."""
    try:
        loaded = torch.load(inputs, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{inputs}: no such file") from None
    except Exception as e:
        raise InputError(f"{inputs}: not a torch.save file of input tensors ({describe(e)}); see "
                         "'factorize calibrate --help' for the format") from e
    return calls_from(loaded, str(inputs), entry, device)


def calls_from(loaded: Any, source: str, entry: Entry = Entry(), device: str = "cpu") -> Calls:
    """The :class:`Calls` of a loaded INPUTS object."""
    if isinstance(loaded, dict):
        if set(loaded) != {"sequences"} or not isinstance(loaded["sequences"], (list, tuple)):
            raise InputError(f"{source}: {_EXPECTED}, got a dict with keys {sorted(map(str, loaded))}")
        raw = [(f"sequence {i}, ", s) for i, s in enumerate(loaded["sequences"], 1)]
        for where, sequence in raw:
            if not isinstance(sequence, (list, tuple)):
                raise InputError(f"{source}: {where.rstrip(', ')} is a {type(sequence).__name__}, "
                                 "not a list of calls")
    elif isinstance(loaded, torch.Tensor):
        raw = [("", [loaded])]
    elif isinstance(loaded, (list, tuple)):
        raw = [("", loaded)]
    else:
        raise InputError(f"{source}: {_EXPECTED}, got a {type(loaded).__name__}")
    sequences = tuple(tuple(_call(c, f"{where}call {j}", source, j == 1).to(device)
                            for j, c in enumerate(sequence, 1))
                      for where, sequence in raw)
    if not sequences or any(not s for s in sequences):
        raise InputError(f"{source}: holds no calls" if not sequences else f"{source}: a sequence holds no calls")
    return Calls(source, sequences, entry)


def _call(raw: Any, where: str, source: str, starts: bool) -> Call:
    if isinstance(raw, torch.Tensor):
        return Call((raw,), {}, starts)
    if isinstance(raw, (list, tuple)):
        args, kwargs = tuple(raw), {}
    elif isinstance(raw, dict):
        if not raw or not set(raw) <= {"args", "kwargs"}:
            raise InputError(f"{source}: {where}: a dict call is {{'args': (...), 'kwargs': {{...}}}}, "
                             f"got keys {sorted(map(str, raw))}")
        args, kwargs = raw.get("args", ()), raw.get("kwargs", {})
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) \
                or not all(isinstance(k, str) for k in kwargs):
            raise InputError(f"{source}: {where}: 'args' must be a tuple or list, 'kwargs' a dict with str keys")
        args = tuple(args)
    else:
        raise InputError(f"{source}: {where} is a {type(raw).__name__}; a call is a tensor, a tuple of "
                         "arguments or {'args': ..., 'kwargs': ...}")
    for i, value in enumerate(args, 1):
        _check_argument(value, f"{where}, argument {i}", source)
    for name, value in kwargs.items():
        _check_argument(value, f"{where}, argument {name}=", source)
    return Call(args, dict(kwargs), starts)


def _check_argument(value: Any, where: str, source: str) -> None:
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_argument(item, where, source)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_argument(item, where, source)
        return
    raise InputError(f"{source}: {where}: a {type(value).__name__} is not an argument this format holds "
                     "(tensors, int, float, bool, str, None, and lists, tuples or str-keyed dicts of them)")


def _moved(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value
