"""Rank policies: property tests on generated spectra, and the policies through plan/apply."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from factorize_cli.config import (BudgetMetric, BudgetPolicy, EnergyPolicy, ErrorPolicy, FactorizeConfig, Latent,
                                  RankPin, RatioPolicy, SelectionConfig, parse_policy)
from factorize_cli.errors import UsageError
from factorize_cli.formats.torchfile import checkpoint_from_mapping
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.pipeline import make_plan
from factorize_cli.planning import ratio_rank
from factorize_cli.policies import (BudgetLayer, allocate_budget, rank_for_energy, rank_for_error, round_nearest,
                                    tail_energy)
from tests.conftest import SMALL, decaying_matrix

spectra = st.lists(st.floats(1e-6, 1e3, allow_nan=False), min_size=1, max_size=80).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))


@given(spectra, st.floats(0.01, 1.0))
def test_energy_policy_picks_the_smallest_sufficient_rank(sigma, t):
    r = rank_for_energy(sigma, t)
    total = float(sigma.square().sum())
    def dropped(k):  # summed directly, so tiny tails are not lost against a large total
        return float(sigma[k:].square().sum())
    assert 1 <= r <= len(sigma)
    assert dropped(r) <= (1 - t) * total * (1 + 1e-9) + 1e-300
    if r > 1:
        assert dropped(r - 1) > (1 - t) * total


@given(spectra, st.floats(0.0, 0.99))
def test_error_policy_picks_the_smallest_sufficient_rank(sigma, e):
    r = rank_for_error(sigma, e)
    total = float(sigma.square().sum())
    def error(k):
        return (float(sigma[k:].square().sum()) / total) ** 0.5
    assert error(r) <= e + 1e-9
    if r > 1:
        assert error(r - 1) > e


layer_shapes = st.tuples(st.integers(8, 96), st.integers(8, 96), st.floats(0.2, 2.0), st.integers(0, 10**6))


def make_layers(shapes, step=1, weights=None, whole=True):
    """Bias-free Linears: cost r * (out + in) at rank r, out * in whole."""
    layers = []
    for i, (out, fan_in, alpha, seed) in enumerate(shapes):
        k = min(out, fan_in)
        gen = torch.Generator().manual_seed(seed)
        sigma = (torch.arange(1, k + 1, dtype=torch.float64) ** -alpha) * (1 + torch.rand(1, generator=gen).item())
        geo = Geometry.from_weight_shape(LayerKind.LINEAR, (out, fan_in), has_bias=False)
        layers.append((BudgetLayer(f"l{i}", sigma, out + fan_in, 0, geo.break_even_rank // step * step,
                                   whole_cost=geo.params() if whole else None, min_dim=geo.min_dim,
                                   weight=1.0 if weights is None else weights[i]), geo))
    return layers


def squared_error(layers, ranks):
    """Weighted squared error; a layer kept whole (None) has none."""
    return sum(b.weight * float(tail_energy(b.sigma)[r]) for b, _ in layers if (r := ranks[b.name]) is not None)


def params(layers, ranks):
    return sum(g.params(ranks[b.name]) for b, g in layers)


def uniform_schedules(layers, step):
    """Every schedule ``--latent-features f`` plans (break-even guard included: None leaves a layer whole),
    one f inside each interval between the fractions k/dim where some layer's rank changes."""
    cuts = sorted({k / g.min_dim for _, g in layers for k in range(1, g.min_dim)} | {0.0, 1.0})
    for f in ((a + b) / 2 for a, b in zip(cuts, cuts[1:])):
        policy = RatioPolicy(Latent(f), Latent(f))
        ranks = {b.name: round_nearest(ratio_rank(g, policy), step) for b, g in layers}
        yield {n: None if r > g.break_even_rank else r for (b, g), (n, r) in zip(layers, ranks.items())}


def best_uniform_error(layers, step, budget):
    return min((squared_error(layers, u) for u in uniform_schedules(layers, step) if params(layers, u) <= budget),
               default=math.inf)


def brute_force_optimum(layers, step, budget):
    """The least weighted error over every choice of rank or whole per layer that fits."""
    choices = [[*range(step, b.max_rank + 1, step), None] for b, _ in layers]
    best = math.inf
    for ranks in itertools.product(*choices):
        chosen = {b.name: r for (b, _), r in zip(layers, ranks)}
        if params(layers, chosen) <= budget:
            best = min(best, squared_error(layers, chosen))
    return best


def check_choices(layers, ranks, step):
    assert all(r is None or (r % step == 0 and step <= r <= b.max_rank) for b, _ in layers for r in [ranks[b.name]])


@settings(max_examples=60, deadline=None)
@given(st.lists(layer_shapes, min_size=1, max_size=6), st.floats(0.05, 0.95), st.sampled_from([1, 4, 8]))
def test_budget_is_spent_within_tolerance(shapes, fraction, step):
    layers = [(b, g) for b, g in make_layers(shapes, step) if b.max_rank >= step]
    if not layers:
        return
    before = sum(g.params() for _, g in layers)
    budget = fraction * before
    minimum = sum(step * b.cost_per_rank for b, _ in layers)
    if minimum > budget:
        with pytest.raises(ValueError):
            allocate_budget([b for b, _ in layers], budget, step)
        return
    ranks = allocate_budget([b for b, _ in layers], budget, step)
    spent = params(layers, ranks)
    assert spent <= budget
    check_choices(layers, ranks, step)
    # any move up that is left (the next step; whole, from any rank) costs more than the budget left
    moves = [g.params() - g.params(r) for b, g in layers if (r := ranks[b.name]) is not None]
    moves += [step * b.cost_per_rank for b, _ in layers if (r := ranks[b.name]) is not None and r < b.max_rank]
    if moves:
        assert budget - spent < min(moves)


weights = st.lists(st.floats(0.05, 20.0), min_size=6, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(layer_shapes, min_size=1, max_size=6), st.floats(0.05, 0.95), st.sampled_from([1, 2, 8]), weights)
@example(  # one of the rare cases (1 in 3000 drawn) where the search from the lowest ranks alone loses (by 10 %)
    [(55, 50, 1.0327, 964074), (83, 59, 1.0781, 957260), (22, 21, 1.2356, 202430), (35, 49, 1.2849, 421988),
     (26, 13, 1.7546, 87046), (12, 89, 0.7089, 923056)], 0.0603, 1, [1.0, 8.261, 1.0, 1.0, 4.347, 1.0])
def test_never_worse_than_the_best_uniform_ratio_that_fits(shapes, fraction, step, w):
    """Without the exact knapsack too: the search from the best uniform schedule guarantees it."""
    layers = [(b, g) for b, g in make_layers(shapes, step, w) if b.max_rank >= step]
    budget = fraction * sum(g.params() for _, g in layers)
    assume(layers and sum(step * b.cost_per_rank for b, _ in layers) <= budget)
    for limit in (0, 30_000_000):
        ranks = allocate_budget([b for b, _ in layers], budget, step, exact_limit=limit)
        check_choices(layers, ranks, step)
        assert params(layers, ranks) <= budget
        assert squared_error(layers, ranks) <= best_uniform_error(layers, step, budget) * (1 + 1e-9)


small_shapes = st.tuples(st.integers(4, 22), st.integers(4, 22), st.floats(0.0, 2.0), st.integers(0, 10**6))


@settings(max_examples=60, deadline=None)
@given(st.lists(small_shapes, min_size=1, max_size=4), st.floats(0.05, 1.0), st.sampled_from([1, 2, 3]), weights)
def test_never_worse_than_the_optimum_by_brute_force(shapes, fraction, step, w):
    layers = [(b, g) for b, g in make_layers(shapes, step, w) if b.max_rank >= step]
    budget = fraction * sum(g.params() for _, g in layers)
    assume(layers and sum(step * b.cost_per_rank for b, _ in layers) <= budget)
    ranks = allocate_budget([b for b, _ in layers], budget, step)
    check_choices(layers, ranks, step)
    assert params(layers, ranks) <= budget
    optimum = brute_force_optimum(layers, step, budget)
    assert squared_error(layers, ranks) <= optimum * (1 + 1e-9) + 1e-300
    assert best_uniform_error(layers, step, budget) >= optimum * (1 - 1e-9)  # the brute force is a true optimum


def test_a_layer_is_kept_whole_when_that_is_strictly_best():
    flat = BudgetLayer("flat", torch.ones(64, dtype=torch.float64), 128, 0, 31, whole_cost=64 * 64, min_dim=64)
    steep = BudgetLayer("steep", 2.0 ** -torch.arange(64, dtype=torch.float64), 128, 0, 31, whole_cost=64 * 64,
                        min_dim=64)
    # whole costs one step more than the flat layer's ceiling and removes the 33 it keeps there
    ranks = allocate_budget([flat, steep], 64 * 64 + 128)
    assert ranks == {"flat": None, "steep": 1}
    for limit in (0, 30_000_000):  # the search alone finds it, and the exact knapsack agrees
        assert allocate_budget([flat, steep], 64 * 64 + 128, exact_limit=limit) == ranks
    # without the choice the flat layer stays at its ceiling and the error is 33 times larger than 2^-2 / 3
    assert allocate_budget([replace(flat, whole_cost=None), steep], 64 * 64 + 128) == {"flat": 31, "steep": 2}


def test_a_heavier_weight_draws_rank_to_its_layer():
    twins = [layer for layer, _ in make_layers([(64, 64, 0.6, 7), (64, 64, 0.6, 7)])]
    budget = sum(16 * b.cost_per_rank for b in twins)
    even = allocate_budget(twins, budget)
    assert even["l0"] == even["l1"] == 16
    heavy = allocate_budget([replace(twins[0], weight=10.0), twins[1]], budget)
    assert heavy["l0"] > 16 > heavy["l1"]
    light = allocate_budget([replace(twins[0], weight=0.1), twins[1]], budget)
    assert light["l0"] < 16 < light["l1"]


@settings(max_examples=60, deadline=None)
@given(st.lists(layer_shapes, min_size=2, max_size=6), st.floats(0.05, 0.45))
def test_greedy_is_never_worse_than_uniform_at_equal_params(shapes, fraction):
    layers = make_layers(shapes)
    uniform = {b.name: max(1, int(fraction * g.min_dim)) for b, g in layers}
    if any(uniform[b.name] > b.max_rank for b, _ in layers):
        return
    budget = sum(uniform[b.name] * b.cost_per_rank for b, _ in layers)
    greedy = allocate_budget([b for b, _ in layers], budget)
    assert squared_error(layers, greedy) <= squared_error(layers, uniform) * (1 + 1e-12)


def test_greedy_is_strictly_better_on_layers_with_different_decay():
    layers = make_layers([(64, 64, 0.3, 1), (64, 64, 1.5, 2), (64, 64, 0.8, 3)], whole=False)
    uniform = {b.name: 16 for b, _ in layers}
    budget = sum(16 * b.cost_per_rank for b, _ in layers)
    greedy = allocate_budget([b for b, _ in layers], budget)
    assert squared_error(layers, greedy) < 0.95 * squared_error(layers, uniform)
    assert greedy["l0"] > 16 > greedy["l1"]  # slow decay gets more rank, fast decay less


def sd_with_decays():
    return {f"fc{i}.weight": decaying_matrix(96, 64, alpha=a, seed=i) for i, a in enumerate((0.2, 0.6, 1.2, 2.0))}


def plan(config):
    return {lp.name: lp for lp in make_plan(checkpoint_from_mapping(sd_with_decays()), config, spectra=True).layers}


SEL = SelectionConfig(min_features=8)


def test_energy_and_error_policies_through_the_planner():
    layers = plan(FactorizeConfig(selection=SEL, policy=EnergyPolicy(0.9)))
    for lp in layers.values():
        if lp.factorized:
            assert rank_for_energy(lp.spectrum, 0.9) == lp.rank
        else:  # the slowly decaying layer needs a rank above break-even
            assert lp.reason.value == "above-break-even" and "keep 0.9 of the energy" in lp.detail
    layers = plan(FactorizeConfig(selection=SEL, policy=ErrorPolicy(0.1), rank_multiple=8))
    for lp in layers.values():
        if lp.factorized:
            assert lp.rank % 8 == 0 and lp.rank >= rank_for_error(lp.spectrum, 0.1) > lp.rank - 8


@pytest.mark.parametrize("metric", list(BudgetMetric))
def test_budget_policy_through_the_planner(metric):
    config = FactorizeConfig(selection=SEL, policy=BudgetPolicy(metric, 0.5), rank_multiple=4)
    p = make_plan(checkpoint_from_mapping(sd_with_decays()), config, spectra=True)
    cost = (lambda g, r: g.params(r)) if metric is BudgetMetric.PARAMS else (lambda g, r: g.macs(r))
    # the slowest decay (0.2, nearly flat) is left whole: at its full cost, with none of its error
    whole = p.layer("fc0")
    assert whole.reason.value == "kept-whole" and whole.rank is None
    assert f"the {metric.value} budget does better leaving it whole (6,144)" in whole.detail
    budgeted = [*p.to_factorize, whole]
    before = sum(cost(lp.geometry, None) for lp in budgeted)
    after = sum(cost(lp.geometry, lp.rank) for lp in budgeted)
    assert 0.5 * before - 4 * 160 <= after <= 0.5 * before
    assert all(lp.rank % 4 == 0 and lp.rank <= lp.geometry.break_even_rank for lp in p.to_factorize)
    ranks = [p.layer(f"fc{i}").rank for i in range(1, 4)]
    assert ranks == sorted(ranks, reverse=True)  # slower decay, more rank
    assert f"{metric.value} budget: the budgeted layers keep {after:,} of {before:,}" in p.notes[-1]
    assert "1 of them kept whole; every layer's squared error counted alike (weight error)" in p.notes[-1]


def test_pins_win_and_obey_break_even():
    config = FactorizeConfig(selection=SEL, policy=BudgetPolicy(BudgetMetric.PARAMS, 0.5),
                             pins=(RankPin.parse("fc0=5"), RankPin.parse("fc3=60")))
    layers = plan(config)
    assert layers["fc0"].rank == 5 and layers["fc0"].pinned and layers["fc0"].factorized
    assert layers["fc3"].reason.value == "above-break-even" and "pinned" in layers["fc3"].detail


def test_impossible_budget_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot be met"):
        plan(FactorizeConfig(selection=SEL, policy=BudgetPolicy(BudgetMetric.PARAMS, 0.01), rank_multiple=16))


@pytest.mark.parametrize("text", ["energy", "energy:x", "error:1.5", "params:1.2", "bogus", "macs:0"])
def test_bad_policies(text):
    with pytest.raises(UsageError):
        parse_policy(text, RatioPolicy())


@pytest.mark.parametrize("text", ["fc", "=3", "fc=0", "fc=-1", "fc=x"])
def test_bad_pins(text):
    with pytest.raises(UsageError):
        RankPin.parse(text)


@pytest.fixture
def decays_file(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "m.safetensors"
    save_file(sd_with_decays(), str(path))
    return path


def test_gate_failure_exits_1_with_one_line_per_violation(cli, decays_file, tmp_path):
    r = cli("plan", decays_file, "--min-features", "8", "--max-layer-error", "0.05", "--min-param-reduction", "0.9",
            "--report", tmp_path / "r.json", "-q")
    assert r.code == 1
    lines = r.stderr.strip().splitlines()
    assert all(line.startswith("factorize: gate failed: ") for line in lines)
    assert sum("layer fc" in line for line in lines) >= 2 and any("param reduction" in line for line in lines)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gates"]["passed"] is False and len(report["gates"]["violations"]) == len(lines)


def test_passing_gates_exit_0(cli, decays_file):
    r = cli("plan", decays_file, "--min-features", "8", "--max-layer-error", "0.99", "--max-total-error", "0.9",
            "--json", "-q")
    assert r.code == 0 and r.json["gates"] == {"checked": ["max_layer_error", "max_total_error"], "passed": True,
                                                "violations": []}


def test_apply_gate_failure_writes_report_but_no_output(cli, decays_file, tmp_path):
    out = tmp_path / "o.safetensors"
    r = cli("apply", decays_file, out, "--min-features", "8", "--max-total-error", "0.01", "-q")
    assert r.code == 1 and "total error" in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    report = json.loads((tmp_path / "o.factorize.json").read_text())
    assert report["output"]["written"] is False and report["totals"]["achieved_error"] > 0.01
    # with a budget policy the predicted errors fail the gate before any factorization
    r = cli("apply", decays_file, out, "--min-features", "8", "--rank-policy", "params:0.5",
            "--max-layer-error", "0.01", "-q", "--force")
    assert r.code == 1 and not out.exists()
    assert json.loads((tmp_path / "o.factorize.json").read_text())["totals"]["achieved_error"] is None


def test_apply_with_policy_reports_predicted_and_achieved(cli, decays_file, tmp_path):
    r = cli("apply", decays_file, tmp_path / "o.safetensors", "--min-features", "8", "--rank-policy", "energy:0.8",
            "--json", "-q")
    assert r.code == 0
    for e in r.json["layers"]:
        if e["action"] == "factorize":
            assert e["achieved_error"] == pytest.approx(e["predicted_error"], abs=1e-6)
            assert e["energy_kept"] >= 0.8 - 1e-9
