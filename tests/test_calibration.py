"""Data-aware factorization: whitening by the input second moment minimises the output error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from factorize_cli.calibration import (ActivationStats, StatsFile, collect_activation_stats, input_rows,
                                       load_activation_stats, save_activation_stats)
from factorize_cli.errors import InputError
from factorize_cli.factorization import factorize_checked, factorize_whitened, whitening
from factorize_cli.geometry import Geometry, LayerKind
from factorize_cli.modules import convert_to_factorized, read_rank_map
from tests.conftest import llama_block


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


def test_shared_inputs_are_stored_once_and_read_back_equal(tmp_path):
    _, stats = llama_block()
    q = stats["layers.0.self_attn.q_proj"]
    twin = ActivationStats(q.xtx.clone(), q.total.clone(), q.count)  # same count and sum, another xtx
    twin.xtx[0, 1] += 1.0
    twin.xtx[1, 0] += 1.0
    stats["twin"] = twin
    save_activation_stats(stats, tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["format"] == "factorize-activation-stats/2"
    assert json.loads(meta["aliases"]) == {"layers.0.self_attn.k_proj": "layers.0.self_attn.q_proj",
                                           "layers.0.self_attn.v_proj": "layers.0.self_attn.q_proj",
                                           "layers.0.mlp.up_proj": "layers.0.mlp.gate_proj"}
    assert len(keys) == 3 * 5  # q (for k, v), o, gate (for up), down, twin
    assert "layers.0.self_attn.k_proj.xtx" not in keys and "twin.xtx" in keys
    matrices = 8 * (4 * 48 * 48 + 96 * 96)
    size = (tmp_path / "s.safetensors").stat().st_size
    assert matrices < size < matrices + 8 * 400 + 4096  # sums, counts, header: not 3 more 48x48 matrices
    back = load_activation_stats(tmp_path / "s.safetensors")
    assert set(back) == set(stats)
    for name, s in stats.items():
        assert torch.equal(back[name].xtx, s.xtx) and torch.equal(back[name].total, s.total), name
        assert back[name].count == s.count == 600
    back["layers.0.self_attn.k_proj"].xtx.zero_()  # aliases are loaded as copies: no shared mutation
    assert torch.equal(back["layers.0.self_attn.q_proj"].xtx, q.xtx)


def write_v1(stats, path):
    """A statistics file as format /1 wrote it: every layer's own tensors, no aliases."""
    tensors = {}
    for name, s in stats.items():
        tensors.update({f"{name}.xtx": s.xtx, f"{name}.sum": s.total, f"{name}.count": torch.tensor(s.count)})
    save_file(tensors, str(path), metadata={"format": "factorize-activation-stats/1",
                                            "layers": json.dumps(sorted(stats))})


def test_format_1_files_still_read(tmp_path):
    _, stats = llama_block()
    write_v1(stats, tmp_path / "v1.safetensors")
    back = load_activation_stats(tmp_path / "v1.safetensors")
    assert set(back) == set(stats)
    assert all(torch.equal(back[n].xtx, s.xtx) and back[n].count == s.count for n, s in stats.items())
    with StatsFile(tmp_path / "v1.safetensors") as f:
        assert f.canonical("layers.0.self_attn.k_proj") == "layers.0.self_attn.k_proj"


def test_opening_statistics_reads_no_matrix(tmp_path, monkeypatch):
    from factorize_cli.formats.safetensors import SafetensorsFile

    _, stats = llama_block()
    save_activation_stats(stats, tmp_path / "s.safetensors")
    reads = []
    get = SafetensorsFile.get
    monkeypatch.setattr(SafetensorsFile, "get", lambda self, key: reads.append(key) or get(self, key))
    with StatsFile(tmp_path / "s.safetensors") as f:
        assert "layers.0.self_attn.v_proj" in f and "head" not in f
        assert f.fan_in("layers.0.self_attn.v_proj") == 48 and f.fan_in("layers.0.mlp.down_proj") == 96
        assert f.count("layers.0.self_attn.v_proj") == 600 and f.count("layers.0.self_attn.k_proj") == 600
        assert reads == ["layers.0.self_attn.q_proj.count"]  # one tiny read, shared by the aliases
        moment = f.second_moment("layers.0.self_attn.v_proj")
    assert reads[1:] == ["layers.0.self_attn.q_proj.xtx"]
    assert torch.equal(moment, stats["layers.0.self_attn.v_proj"].second_moment)


@pytest.mark.parametrize("damage, message", [
    (lambda meta, t: meta.update(aliases=json.dumps({"a": "nowhere"})), "holds none"),
    (lambda meta, t: t.pop("fc.count"), "incomplete"),
    (lambda meta, t: t.update({"fc.sum": torch.zeros(5, dtype=torch.float64)}), "inconsistent shapes"),
])
def test_damaged_statistics_are_refused_from_the_header(tmp_path, damage, message):
    tensors = {"fc.xtx": torch.eye(4, dtype=torch.float64), "fc.sum": torch.zeros(4, dtype=torch.float64),
               "fc.count": torch.tensor(3)}
    meta = {"format": "factorize-activation-stats/2", "layers": json.dumps(["a", "fc"]), "aliases": '{"a": "fc"}'}
    damage(meta, tensors)
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=meta)
    with pytest.raises(InputError, match=message):
        StatsFile(tmp_path / "s.safetensors")
