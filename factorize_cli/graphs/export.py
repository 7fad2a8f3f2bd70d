"""torch.export ``.pt2`` programs: each selected ``linear``/``conv`` call becomes two.

The graph is an FX graph whose parameters are placeholders named in the graph signature. For a
factorized weight this pass adds two parameter placeholders (``<layer>.module0.weight``,
``<layer>.module1.weight``) with static-shape fake tensors from the program's own fake mode (a
program saves without them but fails to load), rewrites every call that reads the weight into
two calls, and drops the old parameter from the graph, the signature and the state dict. A
weight read by anything but the weight argument of a linear/conv call, or by a grouped conv, is
left alone with the reason, as is one whose weight shares its storage with another state-dict entry
(torch.export routes every read of a tied tensor through one of its names; the others keep it).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from factorize_cli.geometry import LayerKind
from factorize_cli.graphs.candidate import layer_candidate
from factorize_cli.graphs.write import GraphSteps, write_graph

_KINDS = {"linear": "linear", "conv1d": "conv1d", "conv2d": "conv2d"}


def _op_kind(node) -> str | None:
    if node.op != "call_function" or not hasattr(node.target, "overloadpacket"):
        return None
    return _KINDS.get(node.target.overloadpacket.__name__)


def _weights(ep: ExportedProgram) -> dict[str, str]:
    """Parameter target ('fc.weight') -> placeholder name."""
    return {s.target: s.arg.name for s in ep.graph_signature.input_specs
            if s.kind is InputKind.PARAMETER and s.target and s.target.endswith(".weight")}


def _why_not(ep: ExportedProgram, placeholder) -> str | None:
    if not placeholder.users:
        return "never used by the program"
    for user in placeholder.users:
        kind = _op_kind(user)
        if kind is None or len(user.args) < 2 or user.args[1] is not placeholder or placeholder in user.args[2:]:
            return f"weight read outside a linear/conv call by {user.target}"
        if kind != "linear" and len(user.args) > 6 and user.args[6] != 1:
            return f"grouped convolution (groups={user.args[6]})"
    return None


def candidates(ep: ExportedProgram):
    """Candidates from the graph: parameters read as the weight of linear/conv1d/conv2d calls (one op kind)."""
    from factorize_cli.formats.base import shared_storage

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    params = dict(ep.state_dict)
    tied = shared_storage(params)
    found = []
    for target, name in _weights(ep).items():
        node = nodes[name]
        kinds = {_op_kind(u) for u in node.users} - {None}
        weight = params.get(target)
        if len(kinds) != 1 or weight is None or weight.dim() not in (2, 3, 4):
            continue
        layer = target.removesuffix(".weight")
        found.append(layer_candidate(layer, weight, params.get(f"{layer}.bias"), LayerKind(kinds.pop()),
                                     tied_with=tied.get(target), unsafe=_why_not(ep, node)))
    return found


def rewrite(ep: ExportedProgram, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> ExportedProgram:
    """A new program in which each layer of ``factors`` ({layer: (first, second)}) runs as two calls."""
    with _quiet():
        gm = copy.deepcopy(ep.graph_module)
        call_graph = copy.deepcopy(ep.module_call_graph)
    graph = gm.graph
    state = dict(ep.state_dict)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # the copy renames a placeholder named after a builtin (nn.Sequential's `input` -> `input_1`):
    # placeholders and input specs correspond by position, so take the names from the copy
    specs = [replace(s, arg=replace(s.arg, name=p.name)) if getattr(s.arg, "name", p.name) != p.name else s
             for s, p in zip(ep.graph_signature.input_specs, placeholders, strict=True)]
    nodes = {n.name: n for n in placeholders}
    fake_mode = next(n.meta["val"].fake_mode for n in nodes.values() if hasattr(n.meta.get("val"), "fake_mode"))
    renamed: dict[str, str] = {}
    for layer, (first, second) in factors.items():
        index = next(i for i, s in enumerate(specs) if s.target == f"{layer}.weight")
        old = nodes[specs[index].arg.name]
        added = []
        for role, tensor in (("module0.weight", first), ("module1.weight", second)):
            key = f"{layer}.{role}"
            with graph.inserting_before(old):
                node = graph.placeholder("p_" + key.replace(".", "_"))
            node.meta.update({k: v for k, v in old.meta.items() if k not in ("val", "tensor_meta")})
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
            state[key] = torch.nn.Parameter(tensor.detach().clone(), requires_grad=False)
            added.append((node, InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=node.name), target=key,
                                          persistent=None)))
        for call in list(old.users):
            renamed[call.name] = _split(graph, fake_mode, call, added[0][0], added[1][0], first.dim() - 2)
        graph.erase_node(old)
        del state[f"{layer}.weight"]
        specs[index:index + 1] = [spec for _, spec in added]
    graph.lint()
    gm.recompile()
    outputs = [replace(o, arg=TensorArgument(name=renamed[o.arg.name]))
               if isinstance(o.arg, TensorArgument) and o.arg.name in renamed else o
               for o in ep.graph_signature.output_specs]
    return ExportedProgram(root=gm, graph=gm.graph,
                           graph_signature=ExportGraphSignature(input_specs=specs, output_specs=outputs),
                           state_dict=state, range_constraints=ep.range_constraints,
                           module_call_graph=call_graph, example_inputs=ep.example_inputs,
                           constants=ep.constants, verifiers=ep.verifiers)


def _split(graph, fake_mode, call, w0, w1, spatial: int) -> str:
    args = list(call.args)
    op, pointwise = call.target, call.target.overloadpacket.default
    with graph.inserting_before(call):
        if _op_kind(call) == "linear":
            first = graph.call_function(op, (args[0], w0))
            second = graph.call_function(op, (first, w1, *args[2:3]))
        else:
            first = graph.call_function(op, (args[0], w0, None, *args[3:]), dict(call.kwargs))
            bias = args[2] if len(args) > 2 else None
            second = graph.call_function(pointwise, (first, w1, bias, [1] * spatial, [0] * spatial, [1] * spatial, 1))
    for node in (first, second):
        node.meta.update({k: v for k, v in call.meta.items() if k not in ("val", "tensor_meta")})
        with fake_mode:
            node.meta["val"] = node.target(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args],
                                           **node.kwargs)
    call.replace_all_uses_with(second)
    graph.erase_node(call)
    return second.name


def write_rewritten(ep: ExportedProgram, plan, factorize, results: dict, progress, output, *,
                    before_commit) -> list[str]:
    """Rewrite every planned layer, save atomically, and check the program loads before committing it."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(tmp) -> None:
        with _quiet():
            torch.export.save(rewrite(ep, factors), str(tmp))

    def load(tmp) -> None:
        with _quiet():
            torch.export.load(str(tmp)).module()

    steps = GraphSteps("program", rewrite=lambda layer, first, second: factors.__setitem__(layer, (first, second)),
                       save=save, load=load)
    return write_graph(steps, plan, factorize, results, progress, output, before_commit=before_commit)


@contextmanager
def _quiet():
    """torch's own deprecation notices while it copies, saves and loads its objects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
