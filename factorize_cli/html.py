"""A report people can look at: one self-contained HTML file (inline SVG plots, no external files).

Plots are drawn with matplotlib (the optional ``plot`` extra); everything shown comes from the
JSON report, which the page also embeds.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from typing import Any

from factorize_cli.errors import UsageError

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}tr.skip{color:#888}
.grid{display:flex;flex-wrap:wrap;gap:.5em}figure{margin:0;border:1px solid #eee;padding:.3em}
figcaption{font-size:.75em;text-align:center}.note{color:#555;font-size:.85em}
"""


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--html needs matplotlib: pip install 'factorize-cli[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "factorize", "font.size": 8,
                                "path.simplify": True})
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)  # inline SVG in HTML needs no namespaces
    return text


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def _interpolate(curve: list[dict[str, float]], fraction: float) -> float | None:
    points = sorted((p["params_fraction"], p["error"]) for p in curve)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= fraction <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (fraction - x0) / (x1 - x0)
    return None


def _tradeoff_figure(plt, tradeoff: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    budget, uniform = tradeoff["budget_curve"], tradeoff["uniform_curve"]
    ax.plot([p["params_fraction"] for p in budget], [p["error"] for p in budget], label="global budget (params:P)")
    if uniform:
        ax.plot([p["params_fraction"] for p in uniform], [p["error"] for p in uniform], "--",
                label="uniform rank fraction")
    chosen = tradeoff["chosen"]
    ax.plot([chosen["params_fraction"]], [chosen["error"]], "o", color="crimson", label="this plan")
    for mark in (0.7, 0.8, 0.9):
        ax.axvline(mark, color="#bbb", lw=0.6)
    ax.set_xlabel("kept parameters of the factorized layers (fraction)")
    ax.set_ylabel("energy-weighted relative error")
    ax.grid(alpha=0.3)
    ax.legend()
    text = _svg(fig)
    plt.close(fig)
    return text


def _spectrum_figure(plt, entry: dict[str, Any]) -> str:
    sample = entry["spectrum_sample"]
    top = sample[0][1] or 1.0
    fig, ax = plt.subplots(figsize=(3.0, 1.9))
    ax.semilogy([i for i, _ in sample], [max(s / top, 1e-12) for _, s in sample], lw=1)
    if entry["rank"]:
        ax.axvline(entry["rank"], color="crimson", lw=1, label=f"rank {entry['rank']}")
    ax.axvline(entry["break_even_rank"], color="#888", lw=1, ls="--", label=f"break-even {entry['break_even_rank']}")
    ax.set_title(entry["name"], fontsize=7)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    text = _svg(fig)
    plt.close(fig)
    return text


def render_html(report: dict[str, Any]) -> str:
    plt = _matplotlib()
    esc = html.escape
    t = report["totals"]
    error = t["achieved_error"] if t["achieved_error"] is not None else t["predicted_error"]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>factorize {esc(report['command'])}: "
             f"{esc(report['input']['path'])}</title><style>{_STYLE}</style></head><body>",
             f"<h1>factorize {esc(report['command'])}: {esc(report['input']['path'])}</h1>",
             "<section id=totals><h2>Totals</h2><table>"]
    rows = [("layers factorized", f"{t['factorized']} of {t['candidates']}"),
            ("checkpoint parameters", f"{t['checkpoint_params_before']:,} → {t['checkpoint_params_after']:,}"),
            ("parameter reduction", _pct(t["param_reduction"])),
            ("candidate MACs per output position", f"{t['candidate_macs_before']:,} → {t['candidate_macs_after']:,}"),
            ("energy-weighted error", _pct(error)),
            ("rank policy", esc(json.dumps(report["settings"]["policy"])))]
    parts += [f"<tr><th>{k}</th><td data-total>{v}</td></tr>" for k, v in rows]
    parts.append("</table></section>")

    tradeoff = report.get("tradeoff")
    parts.append("<section id=tradeoff><h2>Error against size</h2>")
    if tradeoff:
        parts.append(f"<figure class=tradeoff>{_tradeoff_figure(plt, tradeoff)}</figure>")
        parts.append("<table><tr><th>kept parameters</th><th>global budget error</th><th>uniform ranks error</th></tr>")
        for mark in (0.5, 0.6, 0.7, 0.8, 0.9):
            parts.append(f"<tr><td>{mark:.0%}</td><td>{_pct(_interpolate(tradeoff['budget_curve'], mark))}</td>"
                         f"<td>{_pct(_interpolate(tradeoff['uniform_curve'], mark))}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=note>No spectra in this run (plan without --spectra, or a randomized engine).</p>")
    parts.append("</section>")

    parts.append("<section id=layers><h2>Layers</h2><table id=layer-table><tr><th>layer</th><th>kind</th>"
                 "<th>shape</th><th>rank</th><th>break-even</th><th>params before</th><th>params after</th>"
                 "<th>error</th><th>energy kept</th><th>status</th></tr>")
    for e in report["layers"]:
        done = e["action"] == "factorize"
        err = e["achieved_error"] if e["achieved_error"] is not None else e["predicted_error"]
        status = "factorize" if done else f"skip: {e['reason']} ({e['detail']})"
        parts.append(
            f"<tr class={'done' if done else 'skip'} data-layer=\"{esc(e['name'])}\"><td>{esc(e['name'])}</td>"
            f"<td>{e['kind']}</td><td>{'x'.join(map(str, e['shape']))}</td><td>{e['rank'] if done else ''}</td>"
            f"<td>{e['break_even_rank']}</td><td>{e['params_before']}</td><td>{e['params_after']}</td>"
            f"<td>{_pct(err) if done else ''}</td><td>{_pct(e['energy_kept']) if done else ''}</td>"
            f"<td>{esc(status)}</td></tr>")
    parts.append("</table></section><section id=spectra><h2>Singular values (normalised, log scale)</h2>"
                 "<div class=grid>")
    for e in report["layers"]:
        if e["action"] == "factorize" and e["spectrum_sample"]:
            parts.append(f"<figure class=spectrum data-layer=\"{esc(e['name'])}\">{_spectrum_figure(plt, e)}"
                         f"<figcaption>{esc(e['name'])}: rank {e['rank']} / break-even {e['break_even_rank']}"
                         f"</figcaption></figure>")
    data = json.dumps(report, allow_nan=False).replace("</", "<\\/")
    parts.append(f"</div></section><script type=application/json id=report-data>{data}</script></body></html>")
    return "\n".join(parts) + "\n"


def sparkline(sample: list[list[float]] | None, width: int = 12, decades: float = 3.0) -> str:
    """The spectrum as unicode blocks: sigma/sigma_1 at ``width`` evenly spaced ranks, on a log scale
    spanning ``decades`` (the same scale for every layer, so steeper decay shows as lower blocks)."""
    if not sample or sample[0][1] <= 0:
        return ""
    top, k = sample[0][1], sample[-1][0]
    blocks = "▁▂▃▄▅▆▇█"
    out = []
    for j in range(width):
        target = 1 + (k - 1) * j / max(width - 1, 1)
        _, s = min(sample, key=lambda p: abs(p[0] - target))
        level = 1 + math.log10(max(s / top, 10 ** -decades)) / decades  # 0 (floor) .. 1 (sigma_1)
        out.append(blocks[min(7, int(level * 7.999))])
    return "".join(out)
