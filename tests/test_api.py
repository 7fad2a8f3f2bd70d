"""factorize_(model, config, data): in-place swaps, plain factors identical to the state-dict path, the
error-compensating closed form against float64 references, sequential statistics against a model
factorized by hand, and held-out output error plain > whitened > sequential."""

from __future__ import annotations

import copy
import math

import jsonschema
import pytest
import torch
from torch import nn

from factorize_cli import factorize_, factorize_state_dict
from factorize_cli import runs
from factorize_cli.calibration import input_rows
from factorize_cli.compensation import compensated_factors
from factorize_cli.config import (BudgetMetric, BudgetPolicy, FactorizeConfig, Gates, Latent, RatioPolicy,
                                  SelectionConfig)
from factorize_cli.errors import GateError, UsageError
from factorize_cli.factorization import as_matrix, factorize_whitened, reconstruct, whitening
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.modules import FactorizedConv1d, FactorizedConv2d, FactorizedLinear
from factorize_cli.report import load_schema
from tests.conftest import optimum_error

SMALL = FactorizeConfig(selection=SelectionConfig(min_features=8, min_channels=8))


class Mixed(nn.Module):
    """A Conv2d, a Conv1d over the flattened pixels, and a Linear over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(8, 32, 3, padding=1)
        self.conv1d = nn.Conv1d(32, 32, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2d(x)).flatten(2)
        return self.fc(torch.relu(self.conv1d(y)).transpose(1, 2))


def mlp(widths: list[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, dtype=dtype), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def structured(seed: int, rows: int, width: int = 32, latent: int = 16, dtype=torch.float32) -> torch.Tensor:
    """Inputs near a ``latent``-dimensional subspace (the same one for every seed)."""
    mixing = torch.randn(latent, width, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, latent, generator=g) @ mixing + 0.05 * torch.randn(rows, width, generator=g)
    return x.to(dtype)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def product(pair: nn.Module) -> torch.Tensor:
    """``module1 @ module0`` of a factorized pair as an ``out x fan_in`` float64 matrix."""
    first, second = pair.module0.weight.detach(), pair.module1.weight.detach()
    return second.to(torch.float64).reshape(second.shape[0], -1) @ first.to(torch.float64).reshape(first.shape[0], -1)


# -- the closed form ---------------------------------------------------------------------------------------

def _regression_problem(seed: int = 0, rows: int = 400, fan_in: int = 12, out: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, fan_in, generator=g, dtype=torch.float64) @ \
        torch.randn(fan_in, fan_in, generator=g, dtype=torch.float64)
    x_now = x + 0.3 * torch.randn(rows, fan_in, generator=g, dtype=torch.float64)  # after earlier layers changed
    w = torch.randn(out, fan_in, generator=g, dtype=torch.float64)
    return x, x_now, w


def _objective(x, x_now, w, m) -> float:
    return float((x @ w.T - x_now @ m.T).norm())


def test_closed_form_is_the_rank_r_least_squares_optimum():
    x, x_now, w = _regression_problem()
    rows, rank = x.shape[0], 4
    geo = Geometry.from_weight_shape(LayerKind.LINEAR, tuple(w.shape), False)
    done = compensated_factors(w, geo, rank, x_now.T @ x_now / rows, x.T @ x_now / rows,
                               float((x @ w.T).square().sum()) / rows, engine="exact")
    m = done.outcome.factors.second @ done.outcome.factors.first

    # An independent route: the unconstrained least-squares M*, then the rank-r M nearest to it in the
    # norm ||X' (M* - M)^T|| (the residual of M* is orthogonal to X'), through the QR of X'.
    full = torch.linalg.lstsq(x_now, x @ w.T).solution.T
    q, r = torch.linalg.qr(x_now)
    u, s, vh = torch.linalg.svd(r @ full.T)
    reference = torch.linalg.solve_triangular(r, (u[:, :rank] * s[:rank]) @ vh[:rank], upper=True).T
    assert relative(m, reference) < 1e-9
    best = _objective(x, x_now, w, m)
    assert best == pytest.approx(_objective(x, x_now, w, reference), rel=1e-12)
    assert done.output_error == pytest.approx(best / float((x @ w.T).norm()), rel=1e-9)

    # No rank-r neighbour does better.
    g = torch.Generator().manual_seed(1)
    second, first = done.outcome.factors.second, done.outcome.factors.first
    for scale in (1e-4, 1e-2, 1e-1):
        for _ in range(50):
            a = second + scale * torch.randn(second.shape, generator=g, dtype=torch.float64)
            b = first + scale * torch.randn(first.shape, generator=g, dtype=torch.float64)
            assert _objective(x, x_now, w, a @ b) >= best * (1 - 1e-12)
    # ... and it beats plain whitening by today's inputs, which ignores that X' drifted from X.
    root, inverse = whitening(x_now.T @ x_now / rows)
    naive = factorize_whitened(w, geo, rank, root, inverse, engine="exact").outcome.factors
    assert _objective(x, x_now, w, naive.second @ naive.first) > best


def test_closed_form_with_unchanged_inputs_is_whitening():
    x, _, w = _regression_problem(seed=2)
    moment = x.T @ x / x.shape[0]
    geo = Geometry.from_weight_shape(LayerKind.LINEAR, tuple(w.shape), False)
    done = compensated_factors(w, geo, 5, moment, moment, engine="exact").outcome.factors
    whitened = factorize_whitened(w, geo, 5, *whitening(moment), engine="exact").outcome.factors
    assert relative(done.second @ done.first, whitened.second @ whitened.first) < 1e-10
    assert torch.allclose(done.sigma, whitened.sigma, rtol=1e-10)


# -- in place, and plain factors as the state-dict path computes them -------------------------------------

def test_plain_swaps_in_place_with_the_state_dict_paths_factors():
    torch.manual_seed(0)
    model = Mixed()
    original = copy.deepcopy(model)
    before = sum(p.numel() for p in model.parameters())
    report = factorize_(model, SMALL)
    jsonschema.validate(report, load_schema())

    assert type(model.conv2d) is FactorizedConv2d and type(model.conv1d) is FactorizedConv1d
    assert type(model.fc) is FactorizedLinear
    assert sum(p.numel() for p in model.parameters()) < before
    assert {e["name"]: (e["method"], e["rank"]) for e in report["layers"]} == \
        {"conv2d": ("plain", 2), "conv1d": ("plain", 8), "fc": ("plain", 6)}
    assert report["input"]["format"] == "module"

    state, _ = factorize_state_dict(original.state_dict(), SMALL)
    mine = model.state_dict()
    assert list(mine) == list(state)
    for key, tensor in state.items():
        assert torch.equal(mine[key], tensor), key

    reference = copy.deepcopy(original)  # the rank-r truncations put back as dense weights
    for name in ("conv2d", "conv1d", "fc"):
        layer, pair = getattr(original, name), getattr(model, name)
        geo = Geometry.from_weight_shape(LayerKind.from_ndim(layer.weight.dim()), tuple(layer.weight.shape), False)
        dense = reconstruct(pair.module0.weight, pair.module1.weight, geo)
        assert relative(dense, layer.weight.detach().double()) == \
            pytest.approx(optimum_error(layer.weight.detach(), pair.rank), rel=1e-4)
        getattr(reference, name).weight.data.copy_(dense)
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_dtype_device_flags_and_requires_grad_are_kept():
    model = mlp([32, 64, 64, 16], dtype=torch.bfloat16)
    model[2].weight.requires_grad_(False)
    model.train()
    model[0].eval()
    factorize_(model, SMALL, [structured(i, 64, dtype=torch.bfloat16) for i in range(2)])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.training and not model[0].training and not model[0].module0.training and model[2].training
    assert model[0].module0.weight.requires_grad and not model[2].module0.weight.requires_grad


# -- sequential statistics --------------------------------------------------------------------------------

class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.c1 = nn.Conv2d(4, 16, 3, padding=1, dtype=torch.float64)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, dtype=torch.float64)
        self.fc = nn.Linear(16 * 9, 32, dtype=torch.float64)
        self.out = nn.Linear(32, 16, dtype=torch.float64)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1)
        return self.out(torch.tanh(self.fc(y)))


def _inputs(model: nn.Module, layer: str, data) -> torch.Tensor:
    """The rows ``layer`` multiplies, over every batch, captured by hand."""
    rows = []
    module = model.get_submodule(layer)
    handle = module.register_forward_pre_hook(lambda m, a: rows.append(input_rows(m, a[0].detach())))
    with torch.no_grad():
        for batch in data:
            model(batch)
    handle.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("layer", ["c2", "fc", "out"])
def test_sequential_statistics_are_those_of_the_model_factorized_by_hand(layer):
    order = ["c1", "c2", "fc", "out"]
    original = ConvNet()
    data = [torch.randn(5, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            for i in range(3)]
    done = copy.deepcopy(original)
    config = FactorizeConfig(selection=SelectionConfig(min_features=8, min_channels=4))
    assert {e["name"] for e in factorize_(done, config, data)["layers"] if e["method"] == "sequential"} == set(order)
    earlier = order[:order.index(layer)]

    by_hand = copy.deepcopy(original)  # the layers before, swapped for the pairs factorize_ computed
    for name in earlier:
        setattr(by_hand, name, copy.deepcopy(getattr(done, name)))
    x, x_now = _inputs(original, layer, data), _inputs(by_hand, layer, data)
    moment, cross = x_now.T @ x_now, x.T @ x_now
    geo = Geometry.from_weight_shape(LayerKind.from_ndim(getattr(original, layer).weight.dim()),
                                     tuple(getattr(original, layer).weight.shape), True)
    w = as_matrix(getattr(original, layer).weight, geo).double()

    # The collector's sums, on a model whose earlier layers are swapped the way factorize_ swaps them.
    model = copy.deepcopy(original)
    modules = {n: model.get_submodule(n) for n in order}
    calibration = runs.Calibration(runs.ModuleTaps(model, modules), data, {n: geo for n in order})
    swaps = runs.Swaps(model)
    for name in earlier:
        swaps.put(name, copy.deepcopy(getattr(done, name)))
    group = next(g for g in calibration.groups if g.leader == layer)
    paired = calibration.paired(group, swaps, {layer: w})
    assert paired.count == x.shape[0]
    assert torch.allclose(paired.moment, moment, rtol=1e-12, atol=1e-12 * float(moment.abs().max()))
    assert torch.allclose(paired.cross, cross, rtol=1e-12, atol=1e-12 * float(cross.abs().max()))
    assert float(paired.energy[layer]) == pytest.approx(float((x @ w.T).square().sum()), rel=1e-12)
    if earlier:
        assert not torch.allclose(cross, moment)  # the earlier layers did change this layer's inputs

    # ... and factorize_'s factors of the layer are the closed form on those statistics.
    rank = getattr(done, layer).rank
    expected = compensated_factors(getattr(original, layer).weight.detach(), geo, rank, moment / len(x),
                                   cross / len(x), engine="auto").outcome.factors
    assert relative(product(getattr(done, layer)),
                    expected.second.reshape(geo.out_features, rank) @ expected.first.reshape(rank, -1)) < 1e-9


# -- held-out output error --------------------------------------------------------------------------------

def test_held_out_error_sequential_below_whitened_below_plain():
    original = mlp([32, 128, 128, 128, 128, 32])
    train = [structured(i, 256) for i in range(8)]
    held_out = structured(100, 2048)
    target = original(held_out).detach()
    errors = {}
    for method, data, sequential in (("plain", None, True), ("whitened", train, False), ("sequential", train, True)):
        model = copy.deepcopy(original)
        report = factorize_(model, SMALL, data, sequential=sequential)
        jsonschema.validate(report, load_schema())
        assert {e["method"] for e in report["layers"]} == {method}
        assert all(e["calibrated"] == (data is not None) for e in report["layers"])
        errors[method] = relative(model(held_out).detach(), target)
    # measured: plain 0.842, whitened 0.509, sequential 0.482
    assert errors["whitened"] < 0.7 * errors["plain"]
    assert errors["sequential"] < 0.98 * errors["whitened"]


class Attention(nn.Module):
    """q/k/v read one tensor: one group, one set of statistics."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        y = self.norm(x)
        q, k, v = (m(y).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_layers_reading_one_input_share_their_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(Attention(), Attention())
    data = [structured(i, 64).reshape(4, 16, 32) for i in range(3)]
    modules = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    calibration = runs.Calibration(runs.ModuleTaps(model, modules), data, {n: None for n in modules})
    assert [g.names for g in calibration.groups][:4] == [("0.q", "0.k", "0.v"), ("0.o",), ("0.up",), ("0.down",)]
    assert len(calibration.groups) == 8 and all(g.once for g in calibration.groups)
    original = copy.deepcopy(model)
    held_out = structured(50, 512).reshape(32, 16, 32)
    target = original(held_out).detach()
    report = factorize_(model, SMALL, data)
    assert "8 distinct layer input(s)" in report["notes"][-1]
    assert {e["method"] for e in report["layers"]} == {"sequential"}
    plain = copy.deepcopy(original)
    factorize_(plain, SMALL)
    assert relative(model(held_out).detach(), target) < 0.8 * relative(plain(held_out).detach(), target)


# -- transformers GPT-2 (Conv1D) ----------------------------------------------------------------------------

def test_gpt2_conv1d_with_token_batches():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (4, 16), generator=g)} for _ in range(4)]
    held_out = torch.randint(0, 128, (16, 16), generator=g)
    with torch.no_grad():
        target = original(held_out).logits

    model = copy.deepcopy(original)
    report = factorize_(model, SMALL, data)
    jsonschema.validate(report, load_schema())
    entries = {e["name"]: e for e in report["layers"]}
    assert entries["lm_head"]["reason"] == "tied-weight"
    for block in ("transformer.h.0", "transformer.h.1"):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert type(model.get_submodule(f"{block}.{name}")) is FactorizedLinear
            assert entries[f"{block}.{name}"]["method"] == "sequential"
            assert entries[f"{block}.{name}"]["orientation"] == "in-out"
    plain = copy.deepcopy(original)
    factorize_(plain, SMALL)
    with torch.no_grad():
        error, plain_error = relative(model(held_out).logits, target), relative(plain(held_out).logits, target)
    assert error < plain_error

    fresh = transformers.GPT2LMHeadModel(config)  # the factorized state dict loads into converted modules
    from factorize_cli import convert_to_factorized
    convert_to_factorized(fresh, {e["name"]: e["rank"] for e in report["layers"] if e["action"] == "factorize"})
    fresh.load_state_dict(model.state_dict(), strict=True)


# -- the rest of the contract -------------------------------------------------------------------------------

def test_budget_policy_plans_with_whitened_spectra():
    model = mlp([32, 64, 64, 16])
    config = FactorizeConfig(selection=SMALL.selection, policy=BudgetPolicy(BudgetMetric.PARAMS, 0.5))
    report = factorize_(model, config, [structured(i, 128) for i in range(2)])
    jsonschema.validate(report, load_schema())
    assert all(e["predicted_output_error"] is not None for e in report["layers"])
    assert report["totals"]["candidate_params_after"] <= 0.5 * report["totals"]["candidate_params_before"] + 64


def test_one_shot_statistics_in_several_runs_give_the_same_factors(monkeypatch):
    original = mlp([32, 64, 64, 16], dtype=torch.float64)
    data = [structured(i, 128, dtype=torch.float64) for i in range(2)]
    together = copy.deepcopy(original)
    factorize_(together, SMALL, data, sequential=False)
    monkeypatch.setattr(runs, "STATISTICS_BUDGET", 1)  # one group per run
    apart = copy.deepcopy(original)
    factorize_(apart, SMALL, data, sequential=False)
    for key, tensor in together.state_dict().items():
        assert torch.equal(apart.state_dict()[key], tensor), key


def test_a_layer_the_data_never_reaches_gets_plain_svd():
    class Spare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = mlp([32, 64, 64, 16]), nn.Linear(64, 64)

        def forward(self, x):
            return self.used(x)

    model = Spare()
    report = factorize_(model, SMALL, [structured(0, 64)])
    entry = next(e for e in report["layers"] if e["name"] == "unused")
    assert entry["method"] == "plain" and not entry["calibrated"]
    assert entry["detail"] == "not called on the calibration data: plain SVD"
    assert type(model.unused) is FactorizedLinear
    assert {e["method"] for e in report["layers"] if e["name"] != "unused"} == {"sequential"}


def test_a_failed_gate_leaves_the_model_as_it_was():
    model = mlp([32, 64, 64, 16])
    original = copy.deepcopy(model)
    config = FactorizeConfig(selection=SMALL.selection, gates=Gates(max_layer_error=0.01))
    with pytest.raises(GateError) as e:
        factorize_(model, config, [structured(0, 64)])
    assert e.value.report is not None and e.value.violations
    assert [type(m) for m in model] == [type(m) for m in original]
    for key, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor)


def test_subclasses_and_grouped_convs_are_left_alone_with_a_reason():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=2), nn.Flatten(), nn.Linear(16, 16))
    model.attention = nn.MultiheadAttention(16, 2)
    report = factorize_(model, SMALL)
    reasons = {e["name"]: e["reason"] for e in report["layers"]}
    assert reasons == {"0": "grouped-conv", "2": None, "attention.out_proj": "module-type"}


def test_factors_of_a_factorized_model_are_not_factorized_again():
    model = mlp([32, 64, 64, 16])
    factorize_(model, SMALL)
    state = copy.deepcopy(model.state_dict())
    report = factorize_(model, SMALL)
    assert {e["reason"] for e in report["layers"]} == {"not-rewritable"}
    assert report["layers"][0]["detail"] == "a factor of 0, which is factorized already"
    assert all(torch.equal(model.state_dict()[k], t) for k, t in state.items())


@pytest.mark.parametrize("data, message", [
    (iter([torch.zeros(1, 32)]), "iterator"),
    (torch.zeros(4, 32), "wrap one batch in a list"),
    ({"x": torch.zeros(4, 32)}, "wrap one batch in a list"),
    ([], "no batches"),
])
def test_data_it_cannot_use_is_refused(data, message):
    model = mlp([32, 64, 16])
    with pytest.raises(UsageError, match=message):
        factorize_(model, SMALL, data)
    assert type(model[0]) is nn.Linear


def test_arguments_it_cannot_use_are_refused():
    with pytest.raises(UsageError, match="nn.Module"):
        factorize_({"weight": torch.zeros(2, 2)})
    with pytest.raises(UsageError, match="data="):
        factorize_(mlp([32, 64, 16]), FactorizeConfig(calibration="stats.safetensors"))
    with pytest.raises(UsageError, match="TorchScript"):
        factorize_(torch.jit.script(mlp([32, 64, 16])), SMALL)


def test_ratio_latent_sizes_follow_the_config():
    model = mlp([32, 64, 64, 16])
    config = FactorizeConfig(selection=SMALL.selection, policy=RatioPolicy(Latent(0.5), Latent(0.5)))
    report = factorize_(model, config)
    assert [e["rank"] for e in report["layers"]] == [16, 32, 8]
