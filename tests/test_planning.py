"""Selection and planning: every candidate gets a decision with a reason a person understands."""

from __future__ import annotations

import pytest
import torch

from factorize_cli.config import FactorizeConfig, Latent, RatioPolicy, SelectionConfig
from factorize_cli.formats.torchfile import checkpoint_from_mapping
from factorize_cli.pipeline import make_plan
from tests.conftest import toy_state_dict


def plan_of(state_dict, **selection):
    latent = selection.pop("latent", None)
    policy = RatioPolicy(Latent(latent), Latent(latent)) if latent else RatioPolicy()
    config = FactorizeConfig(selection=SelectionConfig(**{"min_features": 32, "min_channels": 32, **selection}),
                             policy=policy)
    plan = make_plan(checkpoint_from_mapping(state_dict), config, spectra=True)
    return {layer.name: layer for layer in plan.layers}


def reason(layer):
    return layer.reason.value if layer.reason else None


def test_toy_decisions():
    layers = plan_of(toy_state_dict())
    assert set(layers) == {"embed", "conv", "fc1", "fc2", "head"}  # 2-D and 4-D `.weight` keys only
    assert reason(layers["embed"]) == "embedding-like"
    assert reason(layers["head"]) == "too-narrow" and "8 is below --min-features 32" in layers["head"].detail
    for name in ("conv", "fc1", "fc2"):
        assert layers[name].factorized and layers[name].spectrum is not None
    assert layers["fc1"].rank == 16  # 0.25 * min(96, 64)
    assert layers["conv"].rank == 8  # 0.25 * min(48, 32) channels
    assert layers["fc1"].candidate.bias is not None and layers["fc2"].candidate.bias is None


def test_above_break_even_is_skipped_with_the_numbers():
    layers = plan_of(toy_state_dict(), latent=0.9)
    fc1 = layers["fc1"]
    assert reason(fc1) == "above-break-even"
    assert fc1.rank == 57 and "break-even rank is 38" in fc1.detail


def test_absolute_rank():
    layers = plan_of(toy_state_dict(), latent=5)
    assert layers["fc1"].rank == 5 and layers["conv"].rank == 5


def test_include_overrides_embedding_heuristic_and_exclude_wins():
    layers = plan_of(toy_state_dict(), include=("embed", "fc*"))
    assert layers["embed"].factorized
    assert reason(layers["conv"]) == "not-included"
    layers = plan_of(toy_state_dict(), exclude=("fc?",))
    assert reason(layers["fc1"]) == "excluded" and "'fc?'" in layers["fc1"].detail
    assert layers["conv"].factorized


def test_kinds_can_be_disabled():
    layers = plan_of(toy_state_dict(), factorize_convs=False)
    assert reason(layers["conv"]) == "kind-disabled" and layers["fc1"].factorized
    layers = plan_of(toy_state_dict(), factorize_linears=False)
    assert reason(layers["fc1"]) == "kind-disabled" and layers["conv"].factorized


def test_non_finite_weight_is_skipped_and_others_proceed():
    sd = toy_state_dict()
    sd["fc1.weight"][3, 4] = float("nan")
    sd["fc2.weight"][0, 0] = float("inf")
    layers = plan_of(sd)
    assert reason(layers["fc1"]) == "non-finite" and reason(layers["fc2"]) == "non-finite"
    assert layers["conv"].factorized


def test_tied_weights_are_skipped():
    sd = toy_state_dict()
    sd["fc3.weight"] = sd["fc1.weight"]  # same storage, as torch.save keeps it
    layers = plan_of(sd)
    assert reason(layers["fc1"]) == "tied-weight" and reason(layers["fc3"]) == "tied-weight"


def test_integer_weights_are_reported_not_factorized():
    sd = toy_state_dict()
    sd["q.weight"] = torch.randint(-8, 8, (64, 64), dtype=torch.int8)
    layers = plan_of(sd)
    assert reason(layers["q"]) == "unsupported-dtype"


def test_vocabulary_sized_linear_is_embedding_like():
    sd = {"lm_head.weight": torch.zeros(16384, 64)}
    assert reason(plan_of(sd)["lm_head"]) == "embedding-like"


def test_a_bias_of_the_wrong_shape_is_not_taken():
    sd = {"fc.weight": torch.randn(64, 64), "fc.bias": torch.randn(3)}
    layer = plan_of(sd)["fc"]
    assert layer.factorized and layer.candidate.bias is None


@pytest.mark.parametrize("bad", [{"min_features": 0}, {"include": ("",)}])
def test_bad_selection_config(bad):
    from factorize_cli.errors import UsageError
    with pytest.raises(UsageError):
        SelectionConfig(**bad)


def test_conv1d_weights_and_stacked_experts():
    sd = {"conv.weight": torch.randn(64, 48, 3), "conv.bias": torch.randn(64),
          "experts.weight": torch.randn(8, 64, 128)}
    layers = plan_of(sd, latent=0.25)
    assert layers["conv"].factorized and layers["conv"].geometry.kind.value == "conv1d"
    assert layers["conv"].rank == 12 and layers["conv"].geometry.factor_shapes(12) == ((12, 48, 3), (64, 12, 1))
    assert reason(layers["experts"]) == "not-a-conv"
    assert reason(plan_of(sd, factorize_convs=False)["conv"]) == "kind-disabled"
