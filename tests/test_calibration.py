"""Data-aware factorization: whitening by the input second moment minimises the output error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from factorize_cli.calibration import (collect_activation_stats, input_rows, load_activation_stats,
                                       save_activation_stats)
from factorize_cli.errors import InputError
from factorize_cli.factorization import factorize_checked, factorize_whitened, whitening
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.modules import convert_to_factorized, read_rank_map


def output_optimum(w: torch.Tensor, x: torch.Tensor, rank: int) -> float:
    """Closed form: the best rank-r W' gives W'X^T = the rank-r truncation of W X^T (X full column rank)."""
    s = torch.linalg.svdvals(w.to(torch.float64) @ x.to(torch.float64).T)
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def anisotropic(n: int, d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or d, generator=gen, dtype=torch.float64)
    if rank is not None:
        x = x @ torch.randn(rank, d, generator=gen, dtype=torch.float64)
    return x * torch.logspace(0, -2.5, d, dtype=torch.float64)


@pytest.mark.parametrize("rank", [4, 12, 30])
def test_whitened_error_is_the_reduced_rank_optimum(rank):
    gen = torch.Generator().manual_seed(rank)
    w = torch.randn(80, 48, generator=gen, dtype=torch.float64)
    x = anisotropic(4000, 48, seed=rank)
    geo = Geometry.from_weight_shape(LayerKind.LINEAR, (80, 48), False)
    root, inverse = whitening(x.T @ x / len(x))
    result = factorize_whitened(w, geo, rank, root, inverse)
    f = result.outcome.factors
    achieved = float(((w - f.second @ f.first) @ x.T).norm() / (w @ x.T).norm())
    best = output_optimum(w, x, rank)
    assert achieved == pytest.approx(best, rel=1e-9) and result.output_error == pytest.approx(best, rel=1e-9)
    assert f.stats.relative_error == pytest.approx(best, rel=1e-9)  # predicted from the whitened spectrum
    plain = factorize_checked(w, geo, rank).factors
    assert float(((w - plain.second @ plain.first) @ x.T).norm() / (w @ x.T).norm()) > 1.2 * best


def test_singular_second_moment_still_works():
    w = torch.randn(40, 32, dtype=torch.float64)
    x = anisotropic(500, 32, seed=3, rank=10)  # inputs span only 10 of 32 dimensions
    c = x.T @ x / len(x)
    assert torch.linalg.matrix_rank(c) == 10
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(c)  # what SVD-LLM's users trip over
    root, inverse = whitening(c)
    assert bool(torch.isfinite(root).all() and torch.isfinite(inverse).all())
    geo = Geometry.from_weight_shape(LayerKind.LINEAR, (40, 32), False)
    f = factorize_whitened(w, geo, 6, root, inverse).outcome.factors
    s = torch.linalg.svdvals(w @ x.T)
    best = float(s[6:].square().sum().sqrt() / s.square().sum().sqrt())
    achieved = float(((w - f.second @ f.first) @ x.T).norm() / (w @ x.T).norm())
    assert achieved == pytest.approx(best, rel=1e-3)
    with pytest.raises(ValueError):
        whitening(torch.zeros(4, 4))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(6, 24, 3, stride=2, padding=1, padding_mode="reflect")
        self.c1 = nn.Conv1d(24, 32, 3, padding=2, dilation=2)
        self.fc = nn.Linear(32, 40)
        self.head = nn.Linear(40, 30)

    def forward(self, x):
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c1(x.flatten(2)))
        return self.head(torch.relu(self.fc(x.transpose(1, 2))))


def test_input_rows_multiply_the_weight_like_the_layer():
    torch.manual_seed(0)
    x2 = torch.randn(2, 6, 9, 11)
    x1 = torch.randn(2, 24, 17)
    for layer, x in ((nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"), x2),
                     (nn.Conv2d(6, 8, (3, 2), dilation=2, padding="same", padding_mode="circular"), x2),
                     (nn.Conv1d(24, 8, 3, padding=2, dilation=2, stride=2), x1),
                     (nn.Conv1d(24, 8, 4, padding="same", padding_mode="replicate"), x1)):
        layer.bias.data.zero_()
        y = layer(x)
        rows = input_rows(layer, x)
        direct = (rows @ layer.weight.reshape(8, -1).T).reshape(x.shape[0], -1, 8).transpose(1, 2)
        assert torch.allclose(direct.reshape(y.shape), y, atol=1e-5), layer


def test_collect_save_load(tmp_path):
    torch.manual_seed(1)
    model = Net().eval()
    batches = [torch.randn(3, 6, 8, 8) for _ in range(4)]
    stats = collect_activation_stats(model, batches)
    assert set(stats) == {"c2", "c1", "fc", "head"}
    rows = []
    model.fc.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, 32).double()))
    with torch.no_grad():
        for b in batches:
            model(b)
    x = torch.cat(rows)
    assert stats["fc"].count == len(x) and torch.allclose(stats["fc"].xtx, x.T @ x)
    assert torch.allclose(stats["fc"].mean, x.mean(0))
    assert stats["c2"].xtx.shape == (54, 54) and stats["c1"].xtx.shape == (72, 72)
    save_activation_stats(stats, tmp_path / "s.safetensors", {"data": "random"})
    back = load_activation_stats(tmp_path / "s.safetensors")
    assert set(back) == set(stats) and torch.equal(back["c1"].xtx, stats["c1"].xtx)
    assert back["c1"].count == stats["c1"].count
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="not activation statistics"):
        load_activation_stats(tmp_path / "other.safetensors")


def test_calibrated_apply_end_to_end(cli, tmp_path):
    torch.manual_seed(2)
    model = Net().eval()
    for m in (model.c2, model.c1, model.fc, model.head):  # make the weights far from low rank
        nn.init.normal_(m.weight)
    inputs = [torch.randn(4, 6, 8, 8) * torch.logspace(0, -1, 6).reshape(1, 6, 1, 1) for _ in range(8)]
    stats = collect_activation_stats(model, inputs[:6], layers=["c2", "c1", "fc"])
    save_activation_stats(stats, tmp_path / "stats.safetensors")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    common = ["--min-features", "8", "--min-channels", "4", "--latent-features", "0.25", "--latent-channels", "0.25",
              "-q", "--json"]
    r = cli("apply", tmp_path / "m.safetensors", tmp_path / "cal.safetensors", "--calibration",
            tmp_path / "stats.safetensors", *common)
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    assert all(layers[n]["calibrated"] for n in ("c2", "c1", "fc"))
    assert not layers["head"]["calibrated"] and "no calibration statistics" in layers["head"]["detail"]
    assert layers["fc"]["achieved_output_error"] == pytest.approx(
                                                                   (1 - layers["fc"]["energy_kept"]) ** 0.5, rel=1e-3)
    assert r.json["totals"]["achieved_output_error"] is not None
    r2 = cli("apply", tmp_path / "m.safetensors", tmp_path / "plain.safetensors", *common)
    ranks = read_rank_map(tmp_path / "cal.factorize.json")
    assert ranks == read_rank_map(tmp_path / "plain.factorize.json")

    def output_error(path):
        rebuilt = convert_to_factorized(Net(), ranks).eval()
        rebuilt.load_state_dict(load_file(str(path)), strict=True)
        with torch.no_grad():
            return sum(float((rebuilt(x) - model(x)).norm()) for x in inputs[6:])

    assert output_error(tmp_path / "cal.safetensors") < output_error(tmp_path / "plain.safetensors")
    # layer by layer, on held-out inputs: the calibrated factors have the smaller output error
    held_out = collect_activation_stats(model, inputs[6:], layers=["c2", "c1", "fc"])
    cal, plain = load_file(str(tmp_path / "cal.safetensors")), load_file(str(tmp_path / "plain.safetensors"))
    for name in ("c2", "c1", "fc"):
        w = model.get_submodule(name).weight.detach().double().reshape(layers[name]["shape"][0], -1)
        c = held_out[name].second_moment

        def err(sd):
            approx = sd[f"{name}.module1.weight"].double().flatten(1) @ sd[f"{name}.module0.weight"].double().flatten(1)
            d = w - approx
            return float(torch.trace(d @ c @ d.T))

        assert err(cal) < err(plain), name
    # an error policy on whitened spectra bounds the output error
    r3 = cli("plan", tmp_path / "m.safetensors", "--calibration", tmp_path / "stats.safetensors",
             "--rank-policy", "error:0.3", "--min-features", "8", "--min-channels", "4", "-q", "--json")
    for e in r3.json["layers"]:
        if e["action"] == "factorize" and e["calibrated"]:
            assert e["predicted_output_error"] <= 0.3 and e["predicted_error"] is None
