"""TorchScript archives: find torch's own Linear/Conv layers, and rewrite their calls into factor pairs.

Swapping a submodule for one of another type is fragile in TorchScript (a parent's class type fixes
its fields' types, and instances of one class share their type). This pass avoids retyping modules:
it inlines every method of the root module, so each layer call becomes an ``aten::linear`` /
``aten::conv1d|conv2d|_convolution`` node whose weight is read through a ``prim::GetAttr`` chain;
registers new submodules holding the two factor weights (on the layer itself when its class type is
its own, else on the root: see :class:`FactorPairs`); and replaces each call by two calls of the same
op: the original arguments with the first factor and no bias, then a pointwise op with the second
factor and the original bias. The original weight is emptied: the layer's class type declares it and
the layer's own methods, still in the archive, read it. A layer whose weight is read anywhere else
(direct use, grouped or transposed convs) is reported and left alone, and so is one whose weight
shares its storage with another attribute (an output head tied to the embedding): emptying one name
of a shared tensor leaves the other's full copy in the archive, beside the new factors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from factorize_cli.errors import InputError, describe
from factorize_cli.geometry import LayerKind
from factorize_cli.graphs.candidate import layer_candidate
from factorize_cli.graphs.write import GraphSteps, write_graph

_TORCH_LAYER = re.compile(r"^__torch__\.torch\.nn\.modules\.(linear|conv)\.(___torch_mangle_\d+\.)?"
                          r"(Linear|Conv1d|Conv2d)$")
_OPS = {"aten::linear", "aten::conv1d", "aten::conv2d", "aten::_convolution"}
_NDIM = {"Linear": 2, "Conv1d": 3, "Conv2d": 4}
_WHERE = re.compile(r'File "(code/[^"]+)", line (\d+)')


def torch_message(e: BaseException) -> str:
    """torch's message about an archive in one line, with the place in the archive's code it points at.

    A C++ message that quotes damaged (non-UTF-8) code reaches Python as a UnicodeDecodeError from
    pybind, not as the message; its bytes still hold the message.
    """
    if isinstance(e, UnicodeDecodeError) and isinstance(e.object, bytes):
        e = RuntimeError(e.object.decode("utf-8", "replace"))
    first = describe(e).rstrip(":")
    where = _WHERE.search(str(e))
    return f"{first}, at {where[1]} line {where[2]}" if where else first


def torch_layer_kind(module: torch.jit.ScriptModule) -> str | None:
    """'Linear', 'Conv1d' or 'Conv2d' for torch's own modules (not a user class of the same name)."""
    match = _TORCH_LAYER.match(module._c._type().qualified_name())
    return match.group(3) if match else None


def inline_methods(root: torch.jit.ScriptModule) -> None:
    for name in root._c._method_names():
        torch._C._jit_pass_inline(root._c._get_method(name).graph)


def walk(block) -> Iterator:
    for node in list(block.nodes()):
        yield node
        for inner in node.blocks():
            yield from walk(inner)


def attribute_path(value) -> str | None:
    """'a.b.weight' for a value read by a GetAttr chain from the method's self, else None."""
    names, node = [], value.node()
    while node.kind() == "prim::GetAttr":
        names.append(node.s("name"))
        node = node.inputsAt(0).node()
    return ".".join(reversed(names)) if names and node.kind() == "prim::Param" else None


def _constant(value):
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


@dataclass
class Uses:
    calls: list = field(default_factory=list)  # (graph, node) of rewritable ops
    other: list[str] = field(default_factory=list)  # why some read is not rewritable


def analyse(root: torch.jit.ScriptModule, layers: list[str]) -> dict[str, str | None]:
    """For each layer path, None when every read of its weight is a rewritable op call, else why not."""
    uses = _collect(root, set(layers))
    out: dict[str, str | None] = {}
    for layer in layers:
        u = uses.get(layer)
        if u is None or not (u.calls or u.other):
            out[layer] = "never called by the module's methods"
        elif u.other:
            out[layer] = u.other[0]
        else:
            out[layer] = None
    return out


def _collect(root: torch.jit.ScriptModule, layers: set[str]) -> dict[str, Uses]:
    uses: dict[str, Uses] = {}
    for method in root._c._method_names():
        graph = root._c._get_method(method).graph
        for node in walk(graph):
            if node.kind() != "prim::GetAttr" or node.s("name") != "weight":
                continue
            path = attribute_path(node.output())
            layer = path.removesuffix(".weight") if path else None
            if layer not in layers:
                continue
            entry = uses.setdefault(layer, Uses())
            for use in node.output().uses():
                reason = _unrewritable(use.user, use.offset)
                if reason:
                    entry.other.append(f"{reason} (in {method})")
                else:
                    entry.calls.append((graph, use.user))
    return uses


def _unrewritable(node, offset: int) -> str | None:
    kind = node.kind()
    if kind not in _OPS or offset != 1:
        return f"weight read outside its layer call by {kind}"
    inputs = list(node.inputs())
    if kind == "aten::_convolution":
        if _constant(inputs[6]) is not False:
            return "transposed convolution"
        groups = _constant(inputs[8])
    elif kind in ("aten::conv1d", "aten::conv2d"):
        groups = _constant(inputs[6])
    else:
        groups = 1
    if groups != 1:
        return f"grouped convolution (groups={groups})"
    return None


class FactorPairs:
    """The rewrite pass: each call of a factorized layer becomes two calls of the same op, one per factor.

    Why calls, not modules: a parent's class type fixes its fields' types, so a layer cannot be swapped
    for a module of another type; its calls in the (inlined) root graphs can be. Where the pair lives:
    on the layer itself, as submodules ``module0``/``module1`` (``<layer>.module0.weight``, the key layout
    of every other output format), when no other module of the archive has the layer's class type, since
    an attribute added to a class type is added to every instance of it; otherwise in a submodule of the
    root (whose type is its own), ``factorized__<layer>``, holding them as ``0``/``1``. Type sharing is
    read once, before any rewrite adds modules of new types.
    """

    def __init__(self, root: torch.jit.ScriptModule) -> None:
        self.root = root
        paths: dict[str, list[str]] = {}
        for name, sub in root.named_modules(remove_duplicate=False):  # one module at two paths counts twice
            paths.setdefault(sub._c._type().qualified_name(), []).append(name)
        self._own_type = {names[0] for names in paths.values() if len(names) == 1}

    def places_on_layer(self, layer: str) -> bool:
        """Whether ``layer``'s pair goes on the layer itself (its type is its own and has no such fields)."""
        module = _submodule(self.root, layer)
        return layer in self._own_type and not (module.hasattr("module0") or module.hasattr("module1"))

    def rewrite(self, layer: str, first: torch.Tensor, second: torch.Tensor) -> int:
        """Replace every call of ``layer`` by its factor pair, empty its weight; returns the calls rewritten."""
        module0, module1 = (torch.jit.script(m) for m in _factor_modules(first, second))
        target = _submodule(self.root, layer)
        if self.places_on_layer(layer):
            target._register_attribute("module0", module0._c._type(), module0._c)
            target._register_attribute("module1", module1._c._type(), module1._c)

            def reads(graph, call):  # from the value the call reads the weight of: the layer
                start = call.inputsAt(1).node().inputsAt(0)
                return [_read(graph, call, start, target, [name, "weight"]) for name in ("module0", "module1")]
        else:
            holder = torch.jit.script(nn.Sequential(module0, module1))
            attribute = "factorized__" + layer.replace(".", "__")
            self.root._c._register_attribute(attribute, holder._c._type(), holder._c)

            def reads(graph, call):  # from the method's self: the root
                start = next(graph.inputs())
                return [_read(graph, call, start, self.root._c, [attribute, name, "weight"]) for name in ("0", "1")]
        calls = _collect(self.root, {layer})[layer].calls
        for graph, call in calls:
            _split_call(graph, call, *reads(graph, call), first.dim() - 2)
        _drop_dead_reads(self.root, f"{layer}.weight")
        target.setattr("weight", torch.empty(0, dtype=first.dtype))  # the factors replace it
        return len(calls)


def _submodule(root: torch.jit.ScriptModule, path: str) -> torch._C.ScriptModule:
    module = root._c
    for name in path.split("."):
        module = module.getattr(name)
    return module


def _factor_modules(first: torch.Tensor, second: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """Modules holding the two factors as their ``weight`` (the bias stays with the layer)."""
    rank = first.shape[0]
    if first.dim() == 2:
        module0, module1 = nn.Linear(first.shape[1], rank, bias=False), nn.Linear(rank, second.shape[0], bias=False)
    else:
        conv = nn.Conv1d if first.dim() == 3 else nn.Conv2d
        module0 = conv(first.shape[1], rank, tuple(first.shape[2:]), bias=False)
        module1 = conv(rank, second.shape[0], 1, bias=False)
    module0.weight = nn.Parameter(first.detach().clone(), requires_grad=False)
    module1.weight = nn.Parameter(second.detach().clone(), requires_grad=False)
    return module0, module1


def _read(graph, before, value, module, names: list[str]):
    """The value of ``value.<names...>``, read by a ``prim::GetAttr`` chain inserted before ``before``;
    ``module`` is the (C++) module ``value`` holds, for the attributes' types."""
    for name in names:
        attribute = module.getattr(name)
        get = graph.create("prim::GetAttr", [value])
        get.s_("name", name)
        get.insertBefore(before)
        get.output().setType(attribute._type() if isinstance(attribute, torch._C.ScriptModule)
                             else torch._C.TensorType.get())
        value, module = get.output(), attribute
    return value


def _split_call(graph, node, w0, w1, spatial: int) -> None:
    """``op(x, w, b, ...)`` -> ``op(op(x, w0, None, ...), w1, b, pointwise...)``."""
    def constant(value):
        c = graph.insertConstant(value)
        c.node().moveBefore(node)
        return c

    kind, inputs = node.kind(), list(node.inputs())
    first = graph.create(kind, [inputs[0], w0, constant(None), *inputs[3:]], 1)
    first.insertBefore(node)
    first.output().setType(node.output().type())
    if kind == "aten::linear":
        rest = [inputs[2]]
    else:
        ones, zeros = constant([1] * spatial), constant([0] * spatial)
        if kind == "aten::_convolution":  # transposed=False, output_padding=0, groups=1, then the flags
            rest = [inputs[2], ones, zeros, ones, constant(False), zeros, constant(1), *inputs[9:]]
        else:
            rest = [inputs[2], ones, zeros, ones, constant(1)]
    second = graph.create(kind, [first.output(), w1, *rest], 1)
    second.insertBefore(node)
    second.output().setType(node.output().type())
    node.output().replaceAllUsesWith(second.output())
    node.destroy()


def _drop_dead_reads(root: torch.jit.ScriptModule, path: str) -> None:
    """Remove the reads of ``path`` (and of the modules on the way) left without a use once its calls
    are rewritten, so that no method reads the emptied weight."""
    for method in root._c._method_names():
        graph = root._c._get_method(method).graph
        dead = [n for n in walk(graph)
                if n.kind() == "prim::GetAttr" and not n.output().uses() and attribute_path(n.output()) == path]
        for node in dead:
            while node.kind() == "prim::GetAttr" and not node.output().uses():
                parent = node.inputsAt(0).node()
                node.destroy()
                node = parent


@dataclass(frozen=True)
class Archive:
    """A loaded TorchScript archive and the extra files it carried (kept on save)."""

    module: torch.jit.ScriptModule
    extra_files: dict[str, bytes]


def load_archive(path) -> Archive:
    """Load, inline and check an archive; torch's own exceptions (of many kinds) pass through."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = [n.split("/extra/", 1)[1] for n in z.namelist() if "/extra/" in n and not n.endswith("/")]
    extra = {name: "" for name in names}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    inline_methods(module)
    try:
        read_debug_info(module)
    except Exception as e:
        raise InputError(f"{path}: the archive's debug information (code/**.debug_pkl) is damaged "
                         f"({torch_message(e)}); torch cannot save this module again") from e
    return Archive(module, {k: v if isinstance(v, bytes) else v.encode() for k, v in extra.items()})


def read_debug_info(root: torch.jit.ScriptModule) -> None:
    """Read the source ranges of every method now. torch unpickles a code file's ``debug_pkl`` only when
    a source range is first asked for, so a damaged one would surface when the rewritten archive is
    saved, after all the work; printing a graph asks for all of its nodes' ranges."""
    seen = set()
    for _, sub in root.named_modules():
        kind = sub._c._type().qualified_name()
        if kind in seen:
            continue
        seen.add(kind)
        for name in sub._c._method_names():
            str(sub._c._get_method(name).graph)


def candidates(archive: Archive):
    """Candidates from module structure: torch's own Linear/Conv1d/Conv2d submodules."""
    from factorize_cli.formats.base import shared_storage

    state = archive.module.state_dict()
    tied = shared_storage(state)  # torch.jit.load keeps storages shared
    layers = {}
    for name, sub in archive.module.named_modules():
        kind = torch_layer_kind(sub) if name else None
        weight = getattr(sub, "weight", None) if kind else None
        if isinstance(weight, torch.Tensor) and weight.dim() == _NDIM[kind]:
            layers[name] = (sub, kind, weight)  # else not a layer this pass understands (an edited archive)
    unsafe = analyse(archive.module, list(layers))
    for name in layers:
        if f"{name}.weight" not in state:
            unsafe[name] = "weight is not a parameter or buffer of the layer (edited class code?)"
    return [layer_candidate(name, weight, getattr(sub, "bias", None), LayerKind(kind.lower()),
                            groups=int(getattr(sub, "groups", 1)) if kind != "Linear" else 1,
                            tied_with=tied.get(f"{name}.weight"), unsafe=unsafe[name])
            for name, (sub, kind, weight) in layers.items()]


def write_rewritten(archive: Archive, plan, factorize, results: dict, progress, output, *, before_commit) -> list[str]:
    """Rewrite every planned layer, save atomically, and check the archive loads before committing it."""
    steps = GraphSteps("archive", rewrite=FactorPairs(archive.module).rewrite,
                       save=lambda tmp: torch.jit.save(archive.module, str(tmp), _extra_files=archive.extra_files),
                       load=lambda tmp: torch.jit.load(str(tmp), map_location="cpu"), message=torch_message)
    return write_graph(steps, plan, factorize, results, progress, output, before_commit=before_commit)
