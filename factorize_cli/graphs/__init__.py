"""Graph rewrites for formats that carry code, not just tensors (TorchScript)."""


def _torchscript():
    from factorize_cli.graphs import torchscript
    return torchscript


def _exported():
    from factorize_cli.graphs import export
    return export


# Formats that carry code: candidates come from their graphs, and apply rewrites the graph.
GRAPH_FORMATS = {"torchscript": _torchscript, "torch-export": _exported}
