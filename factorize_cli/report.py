"""The JSON layer report: one entry per candidate, totals, and the resolved settings.

Its schema ships as ``report.schema.json`` beside this file. Everything that changes
between two identical runs (start time, durations) lives under ``"timing"``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from factorize_cli import __version__
from factorize_cli.formats.base import Checkpoint
from factorize_cli.config import Gates
from factorize_cli.selection import SkipReason
from factorize_cli.planning import LayerPlan, Plan

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerResult:
    """What executing one layer achieved, measured on the factors as written."""

    relative_error: float
    energy_kept: float
    norm: float
    engine: str
    spectrum: Any = None  # every singular value, when the engine computed them all (a float64 tensor)
    output_error: float | None = None  # ||(W - W') S|| / ||W S|| when whitened by activation statistics
    output_norm: float | None = None  # ||W S||
    fallback: str | None = None  # why a layer planned as calibrated got plain SVD after all (whitening failed)


def _spectrum(layer: LayerPlan, result: LayerResult | None) -> Any:
    if result is not None and result.spectrum is not None:
        return result.spectrum
    return layer.spectrum


def _layer_entry(layer: LayerPlan, result: LayerResult | None) -> dict[str, Any]:
    geo, cand = layer.geometry, layer.candidate
    sigma = _spectrum(layer, result)
    done = layer.factorized
    rank = layer.rank if done else None
    predicted, sample = None, None
    if sigma is not None:  # spectra mean torch is loaded already; a header-only plan never gets here
        from factorize_cli.factorization import spectrum_stats
        from factorize_cli.tradeoff import sample_spectrum

        sample = sample_spectrum(sigma, [m for m in (rank, geo.break_even_rank) if m])
        if done and layer.spectrum is not None:
            predicted = spectrum_stats(layer.spectrum, rank)
    weight_side = predicted if not layer.calibrated else None
    output_side = predicted if layer.calibrated else None
    fallback = result.fallback if result else None
    if not done:
        predicted_error, achieved_error, energy = 0.0, 0.0, 1.0  # the weight is kept as it is
        predicted_output, achieved_output = (0.0, 0.0) if layer.calibrated else (None, None)
    else:
        predicted_error = weight_side.relative_error if weight_side else None
        achieved_error = result.relative_error if result else None
        energy = result.energy_kept if result else (predicted.energy_kept if predicted else None)
        predicted_output = output_side.relative_error if output_side else None
        achieved_output = result.output_error if result else None
    norm = result.norm if result else (weight_side.norm if weight_side else None)
    output_norm = result.output_norm if result else (output_side.norm if output_side else None)
    if layer.reason is SkipReason.KEPT_WHOLE and layer.spectrum is not None:  # counts, error 0, in the totals
        whole_norm = float(layer.spectrum.double().square().sum().sqrt())
        norm, output_norm = (None, whole_norm) if layer.calibrated else (whole_norm, None)
    return {
        "name": layer.name,
        "kind": geo.kind.value,
        "orientation": "in-out" if geo.transposed else "out-in",
        "weight_key": cand.weight.key,
        "bias_key": cand.bias.key if cand.bias else None,
        "shape": list(cand.weight.shape),
        "dtype": cand.weight.dtype,
        "action": layer.action.value,
        "reason": layer.reason.value if layer.reason else None,
        "detail": fallback or layer.detail,
        "rank": layer.rank,
        "pinned": layer.pinned,
        "break_even_rank": geo.break_even_rank,
        "params_before": geo.params(),
        "params_after": geo.params(rank),
        "macs_before": geo.macs(),
        "macs_after": geo.macs(rank),
        "predicted_error": predicted_error,
        "achieved_error": achieved_error,
        "energy_kept": energy,
        "norm": norm,
        "calibrated": layer.calibrated and fallback is None,
        "predicted_output_error": predicted_output,
        "achieved_output_error": achieved_output,
        "output_norm": output_norm,
        "engine": result.engine if result else None,
        "spectrum_sample": sample,
        "sensitivity": layer.sensitivity,
    }


def build_report(*, command: str, checkpoint: Checkpoint, plan: Plan, results: dict[str, LayerResult],
                 output: dict[str, Any] | None, notes: list[str], timing: dict[str, Any]) -> dict[str, Any]:
    layers = [_layer_entry(layer, results.get(layer.name)) for layer in plan.layers]
    totals = _totals(checkpoint, layers)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "factorize", "version": __version__},
        "command": command,
        "input": {
            "path": checkpoint.path,
            "format": checkpoint.format,
            "container_key": ".".join(checkpoint.container_path) or None,
            "tensors": len(checkpoint.infos),
        },
        "output": output,
        "settings": plan.config.to_dict(),
        "layers": layers,
        "totals": totals,
        "gates": evaluate_gates(plan.config.gates, layers, totals),
        "tradeoff": _tradeoff(plan, results),
        "verify": None,
        "notes": list(plan.notes) + notes,
        "timing": timing,
    }


def _tradeoff(plan: Plan, results: dict[str, LayerResult]) -> dict[str, Any] | None:
    """Error-versus-size curves over the factorized layers, when all their spectra are known."""
    done = plan.to_factorize
    spectra = [_spectrum(layer, results.get(layer.name)) for layer in done]
    if not done or any(s is None for s in spectra):
        return None
    from factorize_cli.tradeoff import CurveLayer, budget_curve, chosen_point, uniform_curve

    layers = [CurveLayer(layer.geometry, s) for layer, s in zip(done, spectra)]
    return {
        "layers": [layer.name for layer in done],
        "budget_curve": budget_curve(layers, plan.config.rank_multiple),
        "uniform_curve": uniform_curve(layers),
        "chosen": chosen_point(layers, [layer.rank for layer in done]),
    }


def weighted_error(layers: list[dict], key: str, norm: str = "norm") -> float | None:
    """Energy-weighted relative error over the factorized layers and those a budget kept whole (error 0):
    sqrt(sum e_i^2 n_i^2 / sum n_i^2).

    For output errors only the calibrated layers count; None when a needed number is missing."""
    done = [e for e in layers if (e["action"] == "factorize" or e["reason"] == SkipReason.KEPT_WHOLE.value)
            and (norm == "norm" or e["calibrated"])]
    if not done:
        return 0.0 if norm == "norm" else None
    if any(e[key] is None or e[norm] is None for e in done):
        return None
    energy = sum(e[norm] ** 2 for e in done)
    return math.sqrt(sum((e[key] * e[norm]) ** 2 for e in done) / energy) if energy else 0.0


def _totals(checkpoint: Checkpoint, layers: list[dict]) -> dict:
    floats = sum(info.numel for info in checkpoint.infos if info.is_float)
    saved = sum(e["params_before"] - e["params_after"] for e in layers)
    return {
        "candidates": len(layers),
        "factorized": sum(e["action"] == "factorize" for e in layers),
        "skipped": dict(sorted(Counter(e["reason"] for e in layers if e["reason"]).items())),
        "candidate_params_before": sum(e["params_before"] for e in layers),
        "candidate_params_after": sum(e["params_after"] for e in layers),
        "candidate_macs_before": sum(e["macs_before"] for e in layers),
        "candidate_macs_after": sum(e["macs_after"] for e in layers),
        "checkpoint_params_before": floats,
        "checkpoint_params_after": floats - saved,
        "param_reduction": saved / floats if floats else 0.0,
        "predicted_error": weighted_error(layers, "predicted_error"),
        "achieved_error": weighted_error(layers, "achieved_error"),
        "predicted_output_error": weighted_error(layers, "predicted_output_error", "output_norm"),
        "achieved_output_error": weighted_error(layers, "achieved_output_error", "output_norm"),
    }


def best_error(entry: dict) -> float | None:
    """The error the layer was optimised for (output error when calibrated), achieved if executed."""
    if entry["calibrated"]:
        return entry["achieved_output_error"] if entry["achieved_output_error"] is not None \
            else entry["predicted_output_error"]
    return entry["achieved_error"] if entry["achieved_error"] is not None else entry["predicted_error"]


def evaluate_gates(gates: Gates, layers: list[dict], totals: dict) -> dict[str, Any]:
    """Check every gate and collect every violation (not just the first), one line each."""
    violations: list[str] = []
    checked: list[str] = []
    if gates.max_layer_error is not None:
        checked.append("max_layer_error")
        for e in layers:
            error = best_error(e)
            if error is not None and error > gates.max_layer_error:
                violations.append(f"layer {e['name']}: error {error:.4f} > --max-layer-error {gates.max_layer_error:g}")
    if gates.max_total_error is not None:
        checked.append("max_total_error")
        total = next((totals[k] for k in ("achieved_output_error", "predicted_output_error", "achieved_error",
                                           "predicted_error") if totals[k] is not None), None)
        if total is not None and total > gates.max_total_error:
            violations.append(f"total error {total:.4f} > --max-total-error {gates.max_total_error:g}")
    if gates.min_param_reduction is not None:
        checked.append("min_param_reduction")
        if totals["param_reduction"] < gates.min_param_reduction:
            violations.append(f"param reduction {totals['param_reduction']:.4f} < --min-param-reduction "
                              f"{gates.min_param_reduction:g}")
    return {"checked": checked, "passed": not violations, "violations": violations}


def load_schema() -> dict[str, Any]:
    return json.loads(resources.files("factorize_cli").joinpath("report.schema.json").read_text())


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def raise_for_gates(report: dict[str, Any]) -> None:
    from factorize_cli.errors import GateError

    if not report["gates"]["passed"]:
        raise GateError(report["gates"]["violations"], report)


def write_reports(report: dict[str, Any], report_path: str | Path | None, html_path: str | Path | None) -> None:
    """The JSON report and the HTML page, each written atomically where asked."""
    from factorize_cli.atomic import write_text_atomic

    if report_path:
        write_text_atomic(Path(report_path), dumps(report))
    if html_path:
        from factorize_cli.html import render_html

        write_text_atomic(Path(html_path), render_html(report))
