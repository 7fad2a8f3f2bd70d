"""Activation statistics for graph formats, where Python hooks cannot reach the layers.

- TorchScript (:class:`TorchScriptTaps`): the root's inlined graphs get, before each layer call, an
  ``aten::append`` of the call's input to a list attribute of the root (in memory only; the
  instrumented archive is never saved). After each batch the lists are handed over and emptied.
- .pt2 (:class:`ExportTaps`): the program's module runs under an FX interpreter that sees each call's input.
Both are the :class:`~factorize_cli.runs.Taps` of a live run (``apply --data``) as well.
The op's own stride/padding/dilation give the unfolded patches, so padding modes done by an
earlier ``pad`` op are already in the input.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from factorize_cli.calibration import ActivationStats, conv_rows
from factorize_cli.errors import InputError
from factorize_cli.graphs.calls import Call, Calls, Entry, load_calls, run


def rows(kind: str, x: torch.Tensor, weight_shape: tuple[int, ...], stride=None, padding=None,
         dilation=None) -> torch.Tensor:
    """The rows a layer's weight matrix multiplies, from the call's arguments (None: the op's default)."""
    if kind == "linear":
        return x.reshape(-1, x.shape[-1])
    kernel = tuple(weight_shape[2:])
    dims = len(kernel)
    return conv_rows(x, kernel, stride=_tuple(stride, dims, 1), dilation=_tuple(dilation, dims, 1),
                     padding=padding if isinstance(padding, str) else _tuple(padding, dims, 0))


def _evaluate(root, value):
    """A call argument's value when it is static: a constant, a list of constants, or a module attribute."""
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        items = [_evaluate(root, v) for v in node.inputs()]
        return None if any(i is None for i in items) else items
    if node.kind() == "prim::GetAttr":
        names = []
        while node.kind() == "prim::GetAttr":
            names.append(node.s("name"))
            node = node.inputsAt(0).node()
        if node.kind() != "prim::Param":
            return None
        target = root._c
        for name in reversed(names):
            target = target.getattr(name)
        return target if isinstance(target, (int, str, list, tuple)) else None
    return None


def _tuple(value, dims: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * dims
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    return value * dims if len(value) == 1 and dims > 1 else value


_BIG = 1 << 62  # a gate's "all rows"
_BLOCK = 4096  # rows a layer's statistics take at once
# what torch raises when a program cannot run on a batch (.pt2 input guards fail with AssertionError)
_RUN_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError)


class _Taps:
    """What both programs' taps share: the layers ({name: weight shape}), each one's op and conv
    arguments, and the one-line error when the program cannot run on a batch."""

    def __init__(self, layers: dict[str, tuple[int, ...]], calls: Calls, label: str) -> None:
        self.layers, self.label = layers, label
        self.entry, self.stateful = calls.entry, calls.stateful
        self.ops: dict[str, tuple[str, tuple]] = {}  # layer -> (op kind, (stride, padding, dilation))
        self.weights: dict[str, torch.Tensor] = {}  # the live weight of each tapped layer

    def rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        kind, conv_args = self.ops[name]
        return rows(kind, x.detach(), self.layers[name], *conv_args)

    def rows_key(self, name: str) -> tuple:
        return self.ops[name]

    def _failed(self, e: Exception) -> InputError:
        from factorize_cli.graphs.torchscript import torch_message

        return InputError(f"{self.label} failed ({torch_message(e)})")


class TorchScriptTaps(_Taps):
    """:class:`~factorize_cli.runs.Taps` of a TorchScript archive (an instrumented copy: load it for this).

    Before each call of a tapped layer the root's inlined graphs append the call's input, and the
    layer's index, to two list attributes of the root; a gate per layer (an int attribute, the rows
    kept) makes the input an empty copy unless the layer is wanted, so a run keeps only the wanted
    layers' inputs. They are handed over, in call order, once the batch has run. Inputs are copies:
    layers reading one tensor are not recognised as such (each gets its own statistics)."""

    holds_inputs = True

    def __init__(self, archive, layers: dict[str, tuple[int, ...]], calls: Calls, device: str = "cpu",
                 label: str = "running the program") -> None:
        from factorize_cli.graphs.torchscript import attribute_path, walk

        super().__init__(layers, calls, label)
        self.root = root = archive.module
        self.names: list[str] = []
        root._c._register_attribute("calibration__inputs", torch._C.ListType.ofTensors(), [])
        root._c._register_attribute("calibration__calls", torch._C.ListType.ofInts(), [])
        for method in root._c._method_names():
            graph = root._c._get_method(method).graph
            for node in list(walk(graph)):
                if node.kind() not in ("aten::linear", "aten::conv1d", "aten::conv2d", "aten::_convolution"):
                    continue
                path = attribute_path(node.inputsAt(1))
                layer = path.removesuffix(".weight") if path else None
                if layer not in layers:
                    continue
                if layer not in self.ops:
                    root._c._register_attribute(f"calibration__gate{len(self.names)}", torch._C.IntType.get(), 0)
                    self.names.append(layer)
                    inputs = [_evaluate(root, i) for i in node.inputs()]
                    kind = "linear" if node.kind() == "aten::linear" else "conv"
                    self.ops[layer] = (kind, tuple(inputs[3:6]) if kind == "conv" else ())
                _tap(graph, node, self.names.index(layer))
        # run a fresh load of the instrumented code: torch may already hold an executor made from a method's
        # graph as loaded (silero-vad's archive does), which would run it without the taps
        buffer = io.BytesIO()
        torch.jit.save(root, buffer)
        buffer.seek(0)
        self.root = root = torch.jit.load(buffer, map_location="cpu")
        state = root.state_dict()
        self.weights = {name: state[f"{name}.weight"] for name in self.names}
        root.eval()
        root.to(device)

    def _gates(self, names: Iterable[str], value: int) -> None:
        for name in names:
            self.root._c.setattr(f"calibration__gate{self.names.index(name)}", value)

    def _call(self, call: Call) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
        try:
            with torch.no_grad():
                out = run(self.root, call, self.entry)
            calls = list(zip(self.root._c.getattr("calibration__calls"), self.root._c.getattr("calibration__inputs")))
        except _RUN_ERRORS as e:
            raise self._failed(e) from e
        finally:
            self.root._c.setattr("calibration__inputs", [])
            self.root._c.setattr("calibration__calls", [])
        return out, [(self.names[i], x) for i, x in calls]

    def run(self, call: Call, names: Iterable[str], on_input, *, early: bool, values: bool = True) -> None:
        wanted = set(names) & set(self.names)
        self._gates(wanted if values else (), _BIG)
        try:
            _, calls = self._call(call)
        finally:
            self._gates(wanted, 0)
        for name, x in calls:
            if name in wanted:
                on_input(name, x if values else object())

    def output(self, call: Call) -> Any:
        return self._call(call)[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {name: b.detach().clone() for name, b in self.root.named_buffers()}


def _tap(graph, node, index: int) -> None:
    """Before ``node``: ``inputs.append(x[:gate].clone()); calls.append(index)`` on the method's self."""
    self_value = next(graph.inputs())

    def add(kind: str, inputs: list, type_) -> Any:
        new = graph.create(kind, inputs, 1)
        new.output().setType(type_)
        new.insertBefore(node)
        return new

    def attribute(name: str, type_) -> Any:
        get = add("prim::GetAttr", [self_value], type_)
        get.s_("name", name)
        return get.output()

    def constant(value) -> Any:
        c = graph.insertConstant(value)
        c.node().moveBefore(node)
        return c

    tensor, tensors, ints = torch._C.TensorType.get(), torch._C.ListType.ofTensors(), torch._C.ListType.ofInts()
    gate = attribute(f"calibration__gate{index}", torch._C.IntType.get())
    kept = add("aten::slice", [node.inputsAt(0), constant(0), constant(0), gate, constant(1)], tensor).output()
    copy = add("aten::clone", [kept, constant(None)], tensor).output()
    add("aten::append", [attribute("calibration__inputs", tensors), copy], tensors)
    add("aten::append", [attribute("calibration__calls", ints), constant(index)], ints)


class ExportTaps(_Taps):
    """:class:`~factorize_cli.runs.Taps` of a ``.pt2`` program: its module (a copy, never saved) gets a call
    of a tap submodule before each tapped layer call, which hands the input over (and stops the run early
    when asked, unless the calls carry state: a stopped call would not update it). The module's own
    forward runs, so its argument handling and buffer updates are the program's."""

    holds_inputs = False

    def __init__(self, program, layers: dict[str, tuple[int, ...]], calls: Calls, device: str = "cpu",
                 label: str = "running the program") -> None:
        super().__init__(layers, calls, label)
        self.module = program.module().to(device)
        self.tap = _Tap()
        self.module.add_submodule("calibration__tap", self.tap)
        graph = self.module.graph
        for n in list(graph.nodes):
            target = getattr(n.target, "overloadpacket", None)
            name = target.__name__ if target is not None else ""
            if n.op == "call_function" and name in ("linear", "conv1d", "conv2d") and len(n.args) > 1 \
                    and getattr(n.args[1], "op", None) == "get_attr" and n.args[1].target.endswith(".weight") \
                    and (layer := n.args[1].target.removesuffix(".weight")) in layers:
                args = list(n.args) + [None] * 7
                kind = "linear" if name == "linear" else "conv"
                self.ops.setdefault(layer, (kind, (args[3], args[4], args[5]) if kind == "conv" else ()))
                with graph.inserting_before(n):
                    graph.call_module("calibration__tap", (layer, n.args[0]))
        self.module.recompile()
        self.weights = {layer: self.module.get_parameter(f"{layer}.weight") for layer in self.ops}

    def run(self, call: Call, names: Iterable[str], on_input, *, early: bool, values: bool = True) -> None:
        from factorize_cli.runs import _Stop

        self.tap.arm(set(names), on_input, early and not self.stateful)
        try:
            self.output(call)
        except _Stop:
            pass
        finally:
            self.tap.arm(set(), None, False)

    def output(self, call: Call) -> Any:
        try:
            with torch.no_grad():
                return run(self.module, call, self.entry)
        except _RUN_ERRORS as e:
            raise self._failed(e) from e

    def state(self) -> dict[str, torch.Tensor]:
        return {name: b.detach().clone() for name, b in self.module.named_buffers()}


class _Tap(torch.nn.Module):
    """Called with (layer, input) before each tapped layer call of a .pt2 module."""

    def __init__(self) -> None:
        super().__init__()
        self.arm(set(), None, False)

    def arm(self, wanted: set[str], on_input, early: bool) -> None:
        self.wanted, self.on_input, self.early, self.pending = wanted, on_input, early, set(wanted)

    def forward(self, layer: str, x: torch.Tensor) -> None:
        from factorize_cli.runs import _Stop

        if layer in self.wanted:
            self.on_input(layer, x)
            self.pending.discard(layer)
            if self.early and not self.pending:
                raise _Stop


def collect(taps: Any, calls: Calls) -> dict[str, ActivationStats]:
    """Each tapped layer's statistics over the calls. Rows are added a block at a time: a streaming call
    gives a layer a few rows, and each addition costs a full ``fan_in x fan_in`` update."""
    stats = {name: ActivationStats.empty(math.prod(taps.layers[name][1:])) for name in taps.ops}
    pending: dict[str, list[torch.Tensor]] = {name: [] for name in stats}
    held = dict.fromkeys(stats, 0)  # rows pending

    def flush(name: str) -> None:
        if pending[name]:
            stats[name].add(torch.cat(pending[name]))
            pending[name], held[name] = [], 0

    def add(name: str, x: torch.Tensor) -> None:
        pending[name].append(taps.rows(name, x).cpu())
        held[name] += len(pending[name][-1])
        if held[name] >= _BLOCK:
            flush(name)

    before = taps.state() if calls.split and calls.entry.reset is None else None
    for call in calls:
        taps.run(call, list(taps.ops), add, early=False)
    for name in stats:
        flush(name)
    if before is not None:
        _check_independent(before, taps.state(), calls)
    return stats


def _check_independent(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], calls: Calls) -> None:
    """Refuse a share of the sequences when the program carries state from one sequence into the next: one
    process runs each sequence from where the one before left the buffers (no --reset clears them), while a
    rank starts its share from the program as loaded, so the statistics would differ with the process count."""
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    if changed:
        from factorize_cli.errors import UsageError

        raise UsageError(f"{calls.source}: the program keeps state in {', '.join(changed[:3])} and no --reset clears "
                         "it between sequences, so each sequence starts where the one before ended and they cannot "
                         "be dealt to several processes; give --reset METHOD (TorchScript) or calibrate in one "
                         "process")


def calibrate_checkpoint(model: str | Path, inputs: str | Path, stats: str | Path, *, entry: Entry = Entry(),
                         device: str = "cpu", force: bool = False) -> dict[str, Any] | None:
    """Run a TorchScript or .pt2 model on the calls of INPUTS (:mod:`~factorize_cli.graphs.calls`) and write
    each candidate layer's statistics.

    Launched by torchrun, each rank runs whole sequences (a sequence's calls may carry state from one to
    the next, so it is never split), dealt by number of calls; the statistics are summed over the ranks,
    rank 0 writes them and returns the summary, the other ranks return None. A program whose state also
    carries from one sequence into the next (no --reset) is refused: its shares would not add up to the
    one-process run."""
    from factorize_cli import distributed
    from factorize_cli.calibration import reduce_stats, save_activation_stats
    from factorize_cli.errors import describe
    from factorize_cli.formats import open_checkpoint
    from factorize_cli.outputs import check_targets

    stats, model = Path(stats), Path(model)
    group = distributed.current(device)
    device = group.device(device)
    with group.step():  # every rank reads the whole file: a failure on one stops them all
        check_targets({"statistics": stats}, [model, Path(inputs)], force=force)
        calls = load_calls(inputs, entry, device)
    mine = calls.dealt(group)
    per = group.gather(len(mine.sequences))
    with group.step(), open_checkpoint(model) as checkpoint:
        try:
            collected = checkpoint.handler.calibrate(checkpoint, mine, device)
        except RuntimeError as e:
            raise InputError(f"{model}: running the model on {inputs} failed ({describe(e)})") from e
    reduce_stats(collected, group)
    with group.step():  # a refused write on rank 0 fails every rank, not only rank 0
        if group.lead:
            save_activation_stats(collected, stats, {"model": str(model), "inputs": str(inputs),
                                                     "batches": str(len(calls)), "calls": calls.summary(),
                                                     "processes": str(group.world)})
    if not group.lead:
        return None
    summary = {"stats": str(stats), "layers": {name: s.count for name, s in sorted(collected.items())},
               "batches": len(calls), "sequences": len(calls.sequences), "processes": group.world}
    if group.distributed:
        summary["sequences_per_process"] = per
        if idle := [rank for rank, n in enumerate(per) if n == 0]:
            summary["note"] = (f"{len(calls.sequences)} sequence(s) for {group.world} processes: rank(s) "
                               f"{', '.join(map(str, idle))} ran none (a sequence's calls may carry state, so it "
                               "stays whole on one rank)")
    return summary
