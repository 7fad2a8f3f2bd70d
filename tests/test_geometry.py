from __future__ import annotations

import math

import pytest

from factorize_cli.config import Latent
from factorize_cli.errors import UsageError
from factorize_cli.geometry import Geometry, LayerKind


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536), (10, 512), (7, 3), (64, 32, 3, 3),
                                   (512, 64, 3, 3), (3, 16, 1, 1), (128, 129, 3, 1)])
def test_break_even_matches_composer(shape):
    kind = LayerKind.from_ndim(len(shape))
    geo = Geometry.from_weight_shape(kind, shape, has_bias=True)
    out, fan_in = shape[0], math.prod(shape[1:])
    composer = math.ceil(fan_in * out / (fan_in + out) - 1)
    assert geo.break_even_rank == composer
    r = geo.break_even_rank
    assert r * (fan_in + out) < fan_in * out <= (r + 1) * (fan_in + out)


def test_costs_linear_and_conv():
    lin = Geometry.from_weight_shape(LayerKind.LINEAR, (300, 200), has_bias=True)
    assert lin.params() == 300 * 200 + 300
    assert lin.params(10) == 10 * 200 + 300 * 10 + 300
    assert lin.macs() == 60000 and lin.macs(10) == 5000
    conv = Geometry.from_weight_shape(LayerKind.CONV2D, (64, 32, 3, 3), has_bias=False)
    assert conv.fan_in == 288 and conv.min_dim == 32
    assert conv.factor_shapes(8) == ((8, 32, 3, 3), (64, 8, 1, 1))
    # Composer's conv pair always carries a bias on module1
    assert conv.params(8) == 8 * 288 + 64 * 8 + 64
    assert conv.macs(8) == 8 * 288 + 8 * 64


@pytest.mark.parametrize("text,min_dim,rank", [("0.25", 384, 96), ("0.3", 384, 115), ("0.001", 100, 1),
                                               ("64", 384, 64), ("1", 10, 1), ("1.0", 10, 1)])
def test_latent_sizes(text, min_dim, rank):
    assert Latent.parse(text).rank_for(min_dim) == rank


@pytest.mark.parametrize("text", ["0", "-0.5", "2.5", "nan", "inf", "abc"])
def test_bad_latent_sizes(text):
    with pytest.raises(UsageError):
        Latent.parse(text)
