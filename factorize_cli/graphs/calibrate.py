"""Activation statistics for graph formats, where Python hooks cannot reach the layers.

- TorchScript: the root's inlined graphs get, before each layer call, an ``aten::append`` of the
  call's input to a list attribute of the root (in memory only; the archive is never saved). After
  each batch the lists are turned into statistics and emptied, so memory stays bounded.
- .pt2: the program's module runs under an FX interpreter that sees each call's input.
The op's own stride/padding/dilation give the unfolded patches, so padding modes done by an
earlier ``pad`` op are already in the input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from factorize_cli.calibration import ActivationStats, conv_rows, run_batch


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


def calibrate_torchscript(archive, layers: dict[str, tuple[int, ...]], batches: Iterable[Any],
                          device: str = "cpu") -> dict[str, ActivationStats]:
    """Statistics of each layer in ``layers`` ({name: weight shape}) over the batches."""
    from factorize_cli.graphs.torchscript import attribute_path, walk

    root = archive.module
    taps: dict[str, tuple[str, str, tuple]] = {}  # layer -> (attribute, op kind, (stride, padding, dilation))
    for method in root._c._method_names():
        graph = root._c._get_method(method).graph
        self_value = next(graph.inputs())
        for node in list(walk(graph)):
            if not node.kind() in ("aten::linear", "aten::conv1d", "aten::conv2d", "aten::_convolution"):
                continue
            path = attribute_path(node.inputsAt(1))
            layer = path.removesuffix(".weight") if path else None
            if layer not in layers:
                continue
            attribute = "calibration__" + layer.replace(".", "__")
            if layer not in taps:
                root._c._register_attribute(attribute, torch._C.ListType.ofTensors(), [])
                inputs = [_evaluate(root, i) for i in node.inputs()]
                kind = "linear" if node.kind() == "aten::linear" else "conv"
                taps[layer] = (attribute, kind, tuple(inputs[3:6]) if kind == "conv" else ())
            get = graph.create("prim::GetAttr", [self_value])
            get.s_("name", attribute)
            get.output().setType(torch._C.ListType.ofTensors())
            get.insertBefore(node)
            append = graph.create("aten::append", [get.output(), node.inputsAt(0)], 1)
            append.output().setType(torch._C.ListType.ofTensors())
            append.insertBefore(node)
    stats = {layer: ActivationStats.empty(math.prod(shape[1:])) for layer, shape in layers.items() if layer in taps}
    root.to(device)
    with torch.no_grad():
        for batch in batches:
            run_batch(root, batch)
            for layer, (attribute, kind, conv_args) in taps.items():
                for x in root._c.getattr(attribute):
                    stats[layer].add(rows(kind, x.detach(), layers[layer], *conv_args).cpu())
                root._c.setattr(attribute, [])
    return stats


def calibrate_exported(program, layers: dict[str, tuple[int, ...]], batches: Iterable[Any],
                       device: str = "cpu") -> dict[str, ActivationStats]:
    from torch.fx import Interpreter

    module = program.module().to(device)
    wanted = {f"{layer}.weight": layer for layer in layers}
    stats: dict[str, ActivationStats] = {}

    class Tap(Interpreter):
        def run_node(self, n):
            target = getattr(n.target, "overloadpacket", None)
            name = target.__name__ if target is not None else ""
            if n.op == "call_function" and name in ("linear", "conv1d", "conv2d") and len(n.args) > 1 \
                    and getattr(n.args[1], "op", None) == "get_attr" and n.args[1].target in wanted:
                layer = wanted[n.args[1].target]
                x = self.env[n.args[0]]
                args = list(n.args) + [None] * 7
                conv_args = (args[3], args[4], args[5]) if name != "linear" else ()
                kind = "linear" if name == "linear" else "conv"
                shape = layers[layer]
                entry = stats.setdefault(layer, ActivationStats.empty(math.prod(shape[1:])))
                entry.add(rows(kind, x.detach(), shape, *conv_args).cpu())
            return super().run_node(n)

    with torch.no_grad():
        for batch in batches:
            args = batch if isinstance(batch, (tuple, list)) else (batch,)
            Tap(module).run(*args)
    return stats


def load_batches(inputs: str | Path, device: str = "cpu") -> list:
    """Input batches saved with torch.save (a tensor, or a list of tensors or tuples of tensors), on ``device``."""
    from factorize_cli.errors import InputError, describe

    try:
        loaded = torch.load(inputs, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{inputs}: no such file") from None
    except Exception as e:
        raise InputError(f"{inputs}: not a torch.save file of input tensors ({describe(e)})") from e
    if isinstance(loaded, torch.Tensor):
        batches = [loaded]
    elif isinstance(loaded, (list, tuple)) and loaded and all(
            isinstance(b, torch.Tensor) or (isinstance(b, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in b))
            for b in loaded):
        batches = list(loaded)
    else:
        raise InputError(f"{inputs}: expected a tensor or a list of batches (tensors or tuples of tensors)")
    return [tuple(t.to(device) for t in b) if isinstance(b, (list, tuple)) else b.to(device) for b in batches]


def calibrate_checkpoint(model: str | Path, inputs: str | Path, stats: str | Path, *, device: str = "cpu",
                         force: bool = False) -> dict[str, Any]:
    """Run a TorchScript or .pt2 model on saved inputs and write each candidate layer's statistics."""
    from factorize_cli.calibration import save_activation_stats
    from factorize_cli.errors import InputError, describe
    from factorize_cli.formats import open_checkpoint
    from factorize_cli.outputs import check_targets

    stats, model = Path(stats), Path(model)
    check_targets({"statistics": stats}, [model, Path(inputs)], force=force)
    batches = load_batches(inputs, device)
    with open_checkpoint(model) as checkpoint:
        try:
            collected = checkpoint.handler.calibrate(checkpoint, batches, device)
        except RuntimeError as e:
            raise InputError(f"{model}: running the model on {inputs} failed ({describe(e)})") from e
    save_activation_stats(collected, stats, {"model": str(model), "inputs": str(inputs),
                                             "batches": str(len(batches))})
    return {"stats": str(stats), "layers": {name: s.count for name, s in sorted(collected.items())},
            "batches": len(batches)}
