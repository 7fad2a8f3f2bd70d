"""`factorize calibrate` on TorchScript and .pt2 models: the same statistics as the Python API, and a
calibrated run end to end through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from factorize_cli.calibration import collect_activation_stats, load_activation_stats
from tests.test_export import Audio
from tests.test_torchscript import MLP, Twins, run_fresh


def batches_for(case: str):
    gen = torch.Generator().manual_seed(5)
    if case == "twins":
        return [(torch.randn(4, 32, generator=gen), torch.randn(2, 16, 20, generator=gen)) for _ in range(3)]
    return [(torch.randn(3, 16, 40, generator=gen),) for _ in range(3)]


@pytest.mark.parametrize("case,fmt", [("twins", "script"), ("twins", "trace"), ("audio", "pt2")])
def test_graph_statistics_equal_the_python_api(cli, tmp_path, case, fmt):
    torch.manual_seed(0)
    model = (Twins() if case == "twins" else Audio()).eval()
    batches = batches_for(case)
    path = tmp_path / ("m.pt2" if fmt == "pt2" else "m.pt")
    if fmt == "pt2":
        torch.export.save(torch.export.export(model, batches[0]), str(path))
    else:
        scripted = torch.jit.script(model) if fmt == "script" else torch.jit.trace(model, batches[0])
        torch.jit.save(scripted, str(path))
    torch.save(batches, tmp_path / "inputs.pt")
    r = cli("calibrate", path, tmp_path / "inputs.pt", tmp_path / "stats.safetensors", "-q")
    assert r.code == 0, r.stderr
    graph = load_activation_stats(tmp_path / "stats.safetensors")
    python = collect_activation_stats(model, batches)
    expected = {"twins": {"a.fc", "b.fc", "a.conv", "b.conv", "head"}, "audio": {"c1", "c2", "fc"}}[case]
    assert set(graph) == expected  # the tied `proj` is not a candidate of the rewrite, so not calibrated
    for name in expected:
        assert graph[name].count == python[name].count, name
        assert torch.allclose(graph[name].xtx, python[name].xtx, rtol=1e-6, atol=1e-6), name
    assert json.loads(r.stdout)["batches"] == 3


def test_calibrated_torchscript_end_to_end(cli, tmp_path):
    torch.manual_seed(1)
    model = MLP().eval()
    scale = torch.logspace(0, -2, 48)  # strongly anisotropic inputs
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(64, 48, generator=gen) * scale,) for _ in range(8)]
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    torch.save(batches[:6], tmp_path / "calib.pt")
    assert cli("calibrate", tmp_path / "m.pt", tmp_path / "calib.pt", tmp_path / "s.safetensors", "-q").code == 0
    common = ["--min-features", "32", "--latent-features", "0.25", "-q", "--json"]
    r = cli("apply", tmp_path / "m.pt", tmp_path / "cal.pt", "--calibration", tmp_path / "s.safetensors", *common)
    assert r.code == 0, r.stderr
    assert all(e["calibrated"] for e in r.json["layers"] if e["action"] == "factorize")
    assert cli("apply", tmp_path / "m.pt", tmp_path / "plain.pt", *common).code == 0
    held_out = torch.cat([b[0] for b in batches[6:]])
    with torch.no_grad():
        expected = model(held_out)
    errors = {}
    for name in ("cal", "plain"):
        got = run_fresh(tmp_path, tmp_path / "m.pt", tmp_path / f"{name}.pt", (held_out,))
        errors[name] = float((got["y"] - expected).norm() / expected.norm())
    assert errors["cal"] < 0.7 * errors["plain"], errors


def test_calibrate_needs_a_model(cli, toy_safetensors, tmp_path):
    torch.save(torch.randn(2, 4), tmp_path / "x.pt")
    r = cli("calibrate", toy_safetensors, tmp_path / "x.pt", tmp_path / "s.safetensors")
    assert r.code == 2 and "collect_activation_stats" in r.stderr
