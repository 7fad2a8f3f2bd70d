"""The candidate record of a layer found in a graph, built the same way for every graph format.

A graph format knows its layers from live structure (module types, op calls), so it has the weight and
bias tensors themselves rather than header facts; this turns them into the :class:`Candidate` that
selection and planning read for any format.
"""

from __future__ import annotations

import torch

from factorize_cli.formats.base import TensorInfo, dtype_name
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.selection import Candidate


def layer_candidate(layer: str, weight: torch.Tensor, bias: torch.Tensor | None, kind: LayerKind, *,
                    groups: int = 1, tied_with: str | None = None, unsafe: str | None = None) -> Candidate:
    """``layer``'s candidate (weight ``<layer>.weight``, bias ``<layer>.bias`` when it has a tensor one);
    ``unsafe`` says why the graph rewrite cannot touch it, ``tied_with`` names a key sharing its storage."""
    info = TensorInfo(f"{layer}.weight", tuple(weight.shape), dtype_name(weight.dtype))
    bias_info = TensorInfo(f"{layer}.bias", tuple(bias.shape), dtype_name(bias.dtype)) \
        if isinstance(bias, torch.Tensor) else None
    return Candidate(name=layer, weight=info, bias=bias_info,
                     geometry=Geometry.from_weight_shape(kind, info.shape, bias_info is not None),
                     from_structure=True, groups=groups, tied_with=tied_with, unsafe=unsafe)
