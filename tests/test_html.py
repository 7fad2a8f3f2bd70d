"""The HTML report: self-contained, one spectrum per factorized layer, the trade-off curve, same numbers."""

from __future__ import annotations

import json
import re

import pytest
import torch

from factorize_cli.html import sparkline
from tests.conftest import SMALL


def embedded(page: str) -> dict:
    data = re.search(r"<script type=application/json id=report-data>(.*?)</script>", page, re.S).group(1)
    return json.loads(data.replace("<\\/", "</"))


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_html_report(cli, toy_safetensors, tmp_path, command):
    page_path = tmp_path / "r.html"
    args = [toy_safetensors] if command == "plan" else [toy_safetensors, tmp_path / "o.safetensors"]
    r = cli(command, *args, *SMALL, "--rank-policy", "params:0.5", "--html", page_path, "--json", "-q")
    assert r.code == 0, r.stderr
    report, page = r.json, page_path.read_text()
    assert not re.search(r"https?://", page), "the page must open offline"
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", page)
    assert embedded(page) == report
    done = [e for e in report["layers"] if e["action"] == "factorize"]
    figures = re.findall(r'<figure class=spectrum data-layer="([^"]+)">\s*<svg', page)
    assert figures == [e["name"] for e in done] and len(done) == 2  # the budget keeps the third whole
    assert [e["reason"] for e in report["layers"] if e["action"] == "skip"].count("kept-whole") == 1
    assert page.count("<figure class=tradeoff><svg") == 1
    assert report["tradeoff"]["chosen"]["params_fraction"] <= 0.5
    for e in report["layers"]:  # the table shows the report's numbers
        row = re.search(rf'<tr class=\w+ data-layer="{re.escape(e["name"])}">(.*?)</tr>', page, re.S).group(1)
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert cells[5] == str(e["params_before"]) and cells[6] == str(e["params_after"])
        if e["action"] == "factorize":
            err = e["achieved_error"] if command == "apply" else e["predicted_error"]
            assert cells[3] == str(e["rank"]) and cells[7] == f"{100 * err:.2f}%"
    # the trade-off curve is monotone: more parameters, less error
    errors = [p["error"] for p in sorted(report["tradeoff"]["budget_curve"], key=lambda p: p["params_fraction"])]
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:]))


def test_plan_html_needs_spectra(cli, toy_safetensors, tmp_path):
    r = cli("plan", toy_safetensors, "--no-spectra", "--html", tmp_path / "r.html")
    assert r.code == 2 and "--no-spectra" in r.stderr


def test_missing_matplotlib_is_a_clear_error(cli, toy_safetensors, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = cli("plan", toy_safetensors, *SMALL, "--html", tmp_path / "r.html")
    assert r.code == 2 and "pip install 'factorize-cli[plot]'" in r.stderr


def test_sparkline_shows_decay_on_one_scale():
    flat = [[i, 1.0] for i in range(1, 101)]
    steep = [[i, 10.0 ** (-3 * (i - 1) / 99)] for i in range(1, 101)]
    assert sparkline(flat) == "█" * 12
    line = sparkline(steep)
    assert line[0] == "█" and line[-1] == "▁" and list(line) == sorted(line, reverse=True)
    assert sparkline(None) == "" and sparkline([[1, 0.0]]) == ""


def test_budget_totals_count_the_layers_kept_whole(cli, toy_safetensors):
    """The budget's total predicted error is over every budgeted layer: the ones kept whole add their
    energy and no error (checked against an independent float64 SVD of each weight)."""
    from safetensors.torch import load_file

    r = cli("plan", toy_safetensors, *SMALL, "--rank-policy", "params:0.5", "--json", "-q")
    assert r.code == 0, r.stderr
    layers = [e for e in r.json["layers"] if e["action"] == "factorize" or e["reason"] == "kept-whole"]
    assert {e["reason"] for e in layers} == {None, "kept-whole"}
    weights = load_file(str(toy_safetensors))
    dropped = energy = 0.0
    for e in layers:
        sigma = torch.linalg.svdvals(weights[e["weight_key"]].double().reshape(e["shape"][0], -1))
        energy += float(sigma.square().sum())
        dropped += float(sigma[e["rank"]:].square().sum()) if e["rank"] is not None else 0.0
    assert r.json["totals"]["predicted_error"] == pytest.approx((dropped / energy) ** 0.5, rel=1e-6)
