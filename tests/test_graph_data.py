"""`factorize apply PROGRAM OUT --data INPUTS` on TorchScript archives and .pt2 programs: the program runs
live on the inputs (whitened plan, sequential refits) and the format's own writer writes the factors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from factorize_cli.compensation import compensated_factors
from factorize_cli.geometry import Geometry, LayerKind

FLAGS = ["--min-features", "8", "--min-channels", "8", "--latent-features", "0.25", "--latent-channels", "0.25",
         "-q", "--json"]


class Net(nn.Module):
    """A Conv1d over a sequence, then Linears over its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 32, 3, padding=1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).transpose(1, 2)
        h = torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(h))))))
        return self.out(h)


def inputs(seed: int, n: int = 16, t: int = 12, dtype=torch.float32) -> torch.Tensor:
    """Sequences whose steps lie near one 3-dimensional subspace of the 8 channels."""
    mixing = torch.randn(3, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * t, 3, generator=g) @ mixing + 0.05 * torch.randn(n * t, 8, generator=g)
    return x.reshape(n, t, 8).transpose(1, 2).contiguous().to(dtype)


def save(model: nn.Module, fmt: str, path, example) -> None:
    if fmt == "pt2":
        torch.export.save(torch.export.export(model, (example,)), str(path))
    else:
        torch.jit.save(torch.jit.script(model) if fmt == "script" else torch.jit.trace(model, example), str(path))


def load(path, fmt: str):
    return torch.export.load(str(path)).module() if fmt == "pt2" else torch.jit.load(str(path))


def state(path, fmt: str) -> dict[str, torch.Tensor]:
    return dict(torch.export.load(str(path)).state_dict) if fmt == "pt2" else torch.jit.load(str(path)).state_dict()


def product(weights: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """``second @ first`` of a written layer (on the layer, or held by the root), ``out x fan_in`` float64."""
    keys = [(f"{layer}.module0.weight", f"{layer}.module1.weight"),
            (f"factorized__{layer}.0.weight", f"factorized__{layer}.1.weight")]
    first, second = next((weights[a], weights[b]) for a, b in keys if a in weights)
    return second.double().reshape(second.shape[0], -1) @ first.double().reshape(first.shape[0], -1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def program(tmp_path):
    def make(fmt: str, dtype=torch.float32, batches: int = 6):
        torch.manual_seed(0)
        model = Net().to(dtype).eval()
        data = [inputs(i, dtype=dtype) for i in range(batches)]
        path = tmp_path / ("m.pt2" if fmt == "pt2" else "m.pt")
        save(model, fmt, path, data[0])
        torch.save(data, tmp_path / "inputs.pt")
        return model, path, data

    return make


@pytest.mark.parametrize("fmt", ["script", "trace", "pt2"])
def test_held_out_error_sequential_below_whitened_below_plain(cli, tmp_path, program, fmt):
    model, path, _ = program(fmt)
    held_out = [inputs(100 + i) for i in range(4)]  # other draws, the calibration's batch size (.pt2 fixes it)

    def outputs(program) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([program(x) for x in held_out])

    target = outputs(model)
    errors = {}
    for method, extra in (("plain", []), ("whitened", ["--data", tmp_path / "inputs.pt", "--no-sequential"]),
                          ("sequential", ["--data", tmp_path / "inputs.pt"])):
        out = tmp_path / f"{method}{path.suffix}"
        r = cli("apply", path, out, *extra, *FLAGS)
        assert r.code == 0, r.stderr
        layers = [e for e in r.json["layers"] if e["action"] == "factorize"]
        assert [e["name"] for e in layers] == ["conv", "fc1", "fc2", "fc3", "out"]
        if extra:
            assert {e["method"] for e in layers} == {method}
            assert all(e["calibrated"] for e in layers)
        errors[method] = relative(outputs(load(out, fmt)), target)  # the written program runs
    # measured (all three formats): plain 0.506, whitened 0.321, sequential 0.314
    assert errors["sequential"] < 0.99 * errors["whitened"], errors
    assert errors["whitened"] < 0.8 * errors["plain"], errors


@pytest.mark.parametrize("fmt", ["script", "pt2"])
def test_sequential_factors_are_the_closed_form_on_a_model_with_the_first_layer_factorized(cli, tmp_path, program,
                                                                                             fmt):
    model, path, data = program(fmt, torch.float64)
    r = cli("apply", path, tmp_path / f"seq{path.suffix}", "--data", tmp_path / "inputs.pt", *FLAGS)
    assert r.code == 0, r.stderr
    written = state(tmp_path / f"seq{path.suffix}", fmt)
    rank = next(e["rank"] for e in r.json["layers"] if e["name"] == "fc1")

    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand.conv.weight.copy_(product(written, "conv").reshape(model.conv.weight.shape))
    rows = {}
    for name, m in (("x", model), ("x_now", by_hand)):
        seen = []
        handle = m.fc1.register_forward_pre_hook(lambda _, args: seen.append(args[0].reshape(-1, 32)))
        with torch.no_grad():
            for batch in data:
                m(batch)
        handle.remove()
        rows[name] = torch.cat(seen)
    x, x_now = rows["x"], rows["x_now"]
    assert relative(x_now, x) > 1e-3  # the factorized first layer did change fc1's inputs
    geo = Geometry.from_weight_shape(LayerKind.LINEAR, (64, 32), True)
    expected = compensated_factors(model.fc1.weight.detach(), geo, rank, x_now.T @ x_now / len(x),
                                   x.T @ x_now / len(x)).outcome.factors
    assert relative(product(written, "fc1"), expected.second @ expected.first) < 1e-9


@pytest.mark.parametrize("fmt", ["trace", "pt2"])
def test_one_shot_factors_equal_apply_with_the_calibrated_statistics(cli, tmp_path, program, fmt):
    _, path, _ = program(fmt)
    stats = tmp_path / "s.safetensors"
    assert cli("calibrate", path, tmp_path / "inputs.pt", stats, "-q").code == 0
    r = cli("apply", path, tmp_path / f"cal{path.suffix}", "--calibration", stats, *FLAGS)
    assert r.code == 0, r.stderr
    r = cli("apply", path, tmp_path / f"data{path.suffix}", "--data", tmp_path / "inputs.pt", "--no-sequential", *FLAGS)
    assert r.code == 0, r.stderr
    calibrated, live = state(tmp_path / f"cal{path.suffix}", fmt), state(tmp_path / f"data{path.suffix}", fmt)
    for layer in ("conv", "fc1", "fc2", "fc3", "out"):  # --calibration whitens in the working precision (float32)
        assert relative(product(live, layer), product(calibrated, layer)) < 2e-5, layer


def test_sensitivity_is_measured_on_the_program(cli, tmp_path, program):
    _, path, _ = program("script")
    r = cli("apply", path, tmp_path / "b.pt", "--data", tmp_path / "inputs.pt", "--rank-policy", "params:0.5",
            *FLAGS[:4], "-q", "--json")
    assert r.code == 0, r.stderr
    layers = [e for e in r.json["layers"] if e["action"] == "factorize"]
    assert layers and all(e["sensitivity"] is not None and e["sensitivity"] > 0 for e in layers)


@pytest.mark.parametrize("fmt", ["script", "pt2"])
def test_bad_inputs_are_one_line_errors(cli, tmp_path, program, fmt):
    _, path, _ = program(fmt)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save([torch.randn(4, 5, 12)], tmp_path / "wrong.pt")  # 5 channels where the conv takes 8
    torch.save({"x": torch.randn(2, 8, 12)}, tmp_path / "dict.pt")
    for bad, words in (("junk.pt", "not a torch.save file"), ("wrong.pt", "running the program"),
                       ("dict.pt", "expected a tensor, a list of calls"), ("missing.pt", "no such file")):
        r = cli("apply", path, tmp_path / f"o{path.suffix}", "--data", tmp_path / bad, *FLAGS)
        assert r.code == 2 and r.stderr.strip().count("\n") == 0 and words in r.stderr, (bad, r.stderr)
        assert not (tmp_path / f"o{path.suffix}").exists()
