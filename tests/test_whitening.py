"""The whitener: one whitening per distinct input across plan and apply, at most one pair in memory,
spectra planned with apply's engine, plain SVD (with the reason) when whitening fails, and the same
factors the whitened algorithm always produced."""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file

from factorize_cli import factorization
from factorize_cli.calibration import ActivationStats, StatsFile, save_activation_stats
from factorize_cli.config import FactorizeConfig, SelectionConfig
from factorize_cli.factorization import cholesky_whitening, factorize_checked, factorize_whitened, whitening
from factorize_cli.formats.safetensors import SafetensorsFile
from factorize_cli.formats.torchfile import checkpoint_from_mapping
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.execution import layer_seed
from factorize_cli.pipeline import make_plan
from factorize_cli.report import load_schema
from factorize_cli.whitening import Whitener
from tests.conftest import decaying_matrix, llama_block

FLAGS = ["--min-features", "8", "-q", "--json", "--force"]
INPUTS = 4  # distinct inputs of the block: q/k/v, o, gate/up, down


@pytest.fixture
def block(tmp_path):
    state_dict, stats = llama_block()
    save_file(state_dict, str(tmp_path / "m.safetensors"))
    save_activation_stats(stats, tmp_path / "s.safetensors")
    return state_dict, stats


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Count whitenings and spill directories; check no earlier pair is alive when a new one is computed."""
    calls, spills, alive = [], [], []
    real = factorization.cholesky_whitening

    def whitening_counted(second_moment):
        assert not [r for r in alive if r() is not None], "an earlier whitening is still in memory"
        calls.append(second_moment.shape[0])
        pair = real(second_moment)
        alive.append(weakref.ref(pair[0]))
        return pair

    mkdtemp = tempfile.mkdtemp

    def mkdtemp_recorded(**kw):
        spills.append(mkdtemp(dir=tmp_path, **kw))
        return spills[-1]

    monkeypatch.setattr(factorization, "cholesky_whitening", whitening_counted)
    monkeypatch.setattr("factorize_cli.whitening.tempfile.mkdtemp", mkdtemp_recorded)
    return calls, spills


def reference_factors(state_dict, stats, name, rank):
    """The whitened factors as the original code computed them: every layer whitened on its own."""
    w = state_dict[f"{name}.weight"]
    root, inverse = cholesky_whitening(stats[name].xtx / stats[name].count)
    geo = Geometry.from_weight_shape(LayerKind.LINEAR, tuple(w.shape), False)
    return factorize_whitened(w, geo, rank, root, inverse, engine="auto", seed=layer_seed(0, name)).outcome.factors


@pytest.mark.parametrize("policy", ["params:0.8", "ratio"])
def test_one_whitening_per_input_across_plan_and_apply(cli, tmp_path, block, counted, policy):
    state_dict, stats = block
    calls, spills = counted
    r = cli("apply", tmp_path / "m.safetensors", tmp_path / "out.safetensors", "--calibration",
            tmp_path / "s.safetensors", "--rank-policy", policy, *FLAGS)
    assert r.code == 0, r.stderr
    jsonschema.validate(r.json, load_schema())
    layers = {e["name"]: e for e in r.json["layers"]}
    done = [n for n, e in layers.items() if e["action"] == "factorize"]
    assert len(done) >= (5 if policy == "ratio" else 2) and all(layers[n]["calibrated"] for n in done)
    assert sorted(calls) == [48, 48, 48, 96]  # once per distinct input, planning's reused by apply
    if policy == "params:0.8":  # spectra: planning's pairs were spilled for apply, then deleted
        assert len(spills) == 1
    assert not [p for p in spills if os.path.exists(p)]
    out = load_file(str(tmp_path / "out.safetensors"))
    for name in done:  # identical to whitening each layer on its own (the code before sharing)
        ref = reference_factors(state_dict, stats, name, layers[name]["rank"])
        assert torch.equal(out[f"{name}.module0.weight"], ref.first), name
        assert torch.equal(out[f"{name}.module1.weight"], ref.second), name


def test_statistics_matrices_are_read_only_for_whitened_layers(cli, tmp_path, block, monkeypatch):
    reads = []
    get = SafetensorsFile.get
    monkeypatch.setattr(SafetensorsFile, "get",
                        lambda self, key: (reads.append(key) if self.path.name == "s.safetensors" else None)
                        or get(self, key))
    r = cli("apply", tmp_path / "m.safetensors", tmp_path / "out.safetensors", "--calibration",
            tmp_path / "s.safetensors", "--exclude", "*.o_proj", *FLAGS)
    assert r.code == 0, r.stderr
    assert sorted(k for k in reads if k.endswith(".xtx")) == [
        "layers.0.mlp.down_proj.xtx", "layers.0.mlp.gate_proj.xtx", "layers.0.self_attn.q_proj.xtx"]
    assert not [k for k in reads if k.endswith(".sum")]


def test_planned_whitened_spectrum_uses_the_gram_engine_and_matches_float64(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    w = decaying_matrix(512, 640, alpha=0.5, seed=4)
    x = torch.randn(3000, 640, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 640, dtype=torch.float64)
    stats = ActivationStats.empty(640)
    stats.add(x)
    save_activation_stats({"big": stats}, tmp_path / "s.safetensors")
    config = FactorizeConfig(selection=SelectionConfig(min_features=8), calibration=str(tmp_path / "s.safetensors"))
    assert factorization.choose_engine(Geometry.from_weight_shape(LayerKind.LINEAR, (512, 640), False)) == "gram"

    def no_full_svd(*a, **k):
        raise AssertionError("planning ran a full SVD")

    with monkeypatch.context() as m:
        m.setattr(torch.linalg, "svdvals", no_full_svd)
        m.setattr(torch.linalg, "svd", no_full_svd)
        plan = make_plan(checkpoint_from_mapping({"big.weight": w}), config, spectra=True)
    layer = plan.layer("big")
    assert layer.calibrated
    root, _ = whitening(stats.second_moment)
    reference = torch.linalg.svdvals(w.to(torch.float64) @ root)
    assert layer.spectrum.dtype == torch.float64 and layer.spectrum.shape == reference.shape
    top = float(reference[0])
    assert float((layer.spectrum - reference).abs().max()) < 1e-7 * top
    strong = reference > 1e-3 * top
    assert float(((layer.spectrum - reference)[strong] / reference[strong]).abs().max()) < 1e-8


@pytest.mark.parametrize("policy", ["ratio", "params:0.8"])  # found while applying / while planning spectra
@pytest.mark.parametrize("moment", ["zero", "nan"])
def test_failed_whitening_falls_back_to_plain_svd_with_the_reason(cli, tmp_path, counted, policy, moment):
    state_dict, stats = llama_block()
    o = "layers.0.self_attn.o_proj"
    fill = 0.0 if moment == "zero" else float("nan")
    stats[o] = ActivationStats(torch.full((48, 48), fill, dtype=torch.float64), torch.zeros(48, dtype=torch.float64),
                               600)
    save_file(state_dict, str(tmp_path / "m.safetensors"))
    save_activation_stats(stats, tmp_path / "s.safetensors")
    pin = ["--rank", f"{o}=8"] if policy != "ratio" else []  # else the budget may keep it whole
    r = cli("apply", tmp_path / "m.safetensors", tmp_path / "out.safetensors", "--calibration",
            tmp_path / "s.safetensors", "--rank-policy", policy, *FLAGS, *pin)
    assert r.code == 0, r.stderr
    jsonschema.validate(r.json, load_schema())
    layers = {e["name"]: e for e in r.json["layers"]}
    entry = layers[o]
    assert entry["action"] == "factorize" and not entry["calibrated"]
    assert entry["detail"].startswith("whitening failed (") and entry["detail"].endswith(": plain SVD")
    assert entry["achieved_output_error"] is None and entry["achieved_error"] is not None
    assert layers["layers.0.self_attn.q_proj"]["calibrated"]
    assert r.json["totals"]["achieved_output_error"] is not None
    assert len(calls := counted[0]) == INPUTS  # the failed input is tried once, not again by apply
    assert calls.count(48) == 3
    w = state_dict[f"{o}.weight"]
    plain = factorize_checked(w, Geometry.from_weight_shape(LayerKind.LINEAR, (48, 48), False), entry["rank"],
                              seed=layer_seed(0, o)).factors
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out[f"{o}.module0.weight"], plain.first) and torch.equal(out[f"{o}.module1.weight"],
                                                                                 plain.second)
    if policy == "params:0.8":  # planned from the plain spectrum
        assert entry["predicted_error"] is not None and entry["predicted_output_error"] is None


def test_pairs_kept_for_apply_are_bounded_and_dropped_when_not_needed(tmp_path, block, counted):
    calls, spills = counted
    names = list(block[1])
    with StatsFile(tmp_path / "s.safetensors") as stats:
        canonical = {stats.canonical(n) for n in names}
    assert len(canonical) == INPUTS
    with Whitener(str(tmp_path / "s.safetensors"), keep_for_apply=True) as whitener:
        whitener.begin_planning(names)
        for name in names:
            assert not isinstance(whitener.pair(name), str)
        assert len(calls) == INPUTS and len(spills) == 1
        spilled = sorted(p.name for p in Path(spills[0]).iterdir())
        assert len(spilled) == INPUTS - 1  # the current pair stays in memory only
        whitener.begin_apply(["layers.0.self_attn.k_proj"])  # apply needs one input again
        assert len(list(Path(spills[0]).iterdir())) == 1
        first = whitener.pair("layers.0.self_attn.k_proj")
        assert len(calls) == INPUTS  # restored, not recomputed
        root, _ = cholesky_whitening(block[1]["layers.0.self_attn.k_proj"].second_moment)
        assert torch.equal(first[0], root)
        assert not list(Path(spills[0]).iterdir())  # used up: deleted
    assert not os.path.exists(spills[0])


def test_the_pair_is_held_in_the_precision_layers_use(tmp_path, block, counted):
    """A float32 request converts the held float64 pair once (the float64 one is dropped); a float64 request
    after that recomputes it from the statistics rather than widening rounded values."""
    calls, _ = counted
    name = "layers.0.mlp.down_proj"
    with Whitener(str(tmp_path / "s.safetensors")) as whitener:
        wide = whitener.pair(name)
        assert wide[0].dtype == torch.float64 and len(calls) == 1
        narrow = whitener.pair(name, torch.float32)
        assert narrow[0].dtype == torch.float32 and torch.equal(narrow[0], wide[0].float())
        del wide
        assert whitener.pair(name, torch.float32)[0] is narrow[0] and len(calls) == 1  # held, not converted again
        del narrow
        again = whitener.pair(name, torch.float64)
        assert again[0].dtype == torch.float64 and len(calls) == 2
        root, _ = cholesky_whitening(block[1][name].second_moment)
        assert torch.equal(again[0], root)
