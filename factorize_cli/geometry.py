"""Layer geometry and cost: the one place where a weight's shape becomes a matrix.

A Linear ``out x in`` weight is the matrix itself. A Conv2d ``d x c x kh x kw``
weight is the ``d x (c*kh*kw)`` matrix of its unfolded patches; its factors are a
``kh x kw`` conv ``c -> r`` and a ``1 x 1`` conv ``r -> d`` (Conv1d likewise, with ``k``). A Linear stored
transposed (transformers' ``Conv1D``: ``in x out``, ``y = x @ W + b``) is the same ``out x in`` matrix once
``transposed`` says so; its factors are written in nn.Linear orientation like any other Linear's. Costs,
factorization and calibration all go through :class:`Geometry`. Pure Python, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class LayerKind(str, Enum):
    LINEAR = "linear"
    CONV1D = "conv1d"
    CONV2D = "conv2d"

    @classmethod
    def from_ndim(cls, ndim: int) -> LayerKind | None:
        return {2: cls.LINEAR, 3: cls.CONV1D, 4: cls.CONV2D}.get(ndim)

    @property
    def is_conv(self) -> bool:
        return self is not LayerKind.LINEAR


@dataclass(frozen=True)
class Geometry:
    kind: LayerKind
    out_features: int
    in_features: int
    kernel: tuple[int, ...]
    has_bias: bool
    transposed: bool = False  # the weight is stored in x out (transformers Conv1D), not out x in

    def __post_init__(self) -> None:
        if self.transposed and self.kind is not LayerKind.LINEAR:
            raise ValueError(f"only a Linear weight can be stored transposed, not a {self.kind.value}")

    @classmethod
    def from_weight_shape(cls, kind: LayerKind, shape: tuple[int, ...], has_bias: bool, *,
                          transposed: bool = False) -> Geometry:
        """From the weight as stored: ``out x in x k...``, or ``in x out`` when ``transposed``."""
        out, fan_in = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        return cls(kind, int(out), int(fan_in), tuple(int(k) for k in shape[2:]), has_bias, transposed)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight's shape as stored."""
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def fan_in(self) -> int:
        return self.in_features * math.prod(self.kernel)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``out x fan_in``, whatever the stored orientation."""
        return (self.out_features, self.fan_in)

    @property
    def cost(self) -> float:
        """What factorizing it costs, relatively: the Gram product and the eigensolve grow as m n min(m, n)
        (how the ranks of a torchrun launch share the layers)."""
        m, n = self.matrix_shape
        return float(m) * n * min(m, n)

    @property
    def min_dim(self) -> int:
        """Composer's ``min(in, out)``: features for Linear, channels for convs."""
        return min(self.in_features, self.out_features)

    @property
    def max_rank(self) -> int:
        """Rank of the full matrix."""
        return min(self.matrix_shape)

    @property
    def break_even_rank(self) -> int:
        """Largest rank whose two factors hold fewer weights than the original."""
        out, fan_in = self.matrix_shape
        return (out * fan_in - 1) // (out + fan_in)

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``module0.weight`` (in -> r) and ``module1.weight`` (r -> out)."""
        first = (rank, self.in_features, *self.kernel)
        second = (self.out_features, rank, *(1 for _ in self.kernel))
        return first, second

    def factorized_has_bias(self) -> bool:
        """Composer's conv pair always carries a bias on ``module1``; Linear keeps the original's."""
        return self.has_bias or self.kind.is_conv

    def params(self, rank: int | None = None) -> int:
        """Stored parameters (weights and bias) before (``rank=None``) or after factorizing."""
        out, fan_in = self.matrix_shape
        if rank is None:
            return out * fan_in + (out if self.has_bias else 0)
        return rank * (fan_in + out) + (out if self.factorized_has_bias() else 0)

    def macs(self, rank: int | None = None) -> int:
        """Multiply-accumulates per output position (per token, per output pixel)."""
        out, fan_in = self.matrix_shape
        return out * fan_in if rank is None else rank * (fan_in + out)
