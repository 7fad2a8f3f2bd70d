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
from typing import Any

from factorize_cli import __version__
from factorize_cli.formats.base import Checkpoint
from factorize_cli.planning import LayerPlan, Plan

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerResult:
    """What executing one layer achieved, measured on the factors as written."""

    relative_error: float
    energy_kept: float
    norm: float
    engine: str


def _layer_entry(layer: LayerPlan, result: LayerResult | None) -> dict[str, Any]:
    geo, cand = layer.geometry, layer.candidate
    done = layer.factorized
    rank = layer.rank if done else None
    if result is not None:
        error, energy, source = result.relative_error, result.energy_kept, "achieved"
    elif done and layer.predicted_error is not None:
        error, energy, source = layer.predicted_error, layer.energy_kept, "predicted"
    elif done:
        error, energy, source = None, None, None
    else:
        error, energy, source = 0.0, 1.0, "unchanged"
    return {
        "name": layer.name,
        "kind": geo.kind.value,
        "weight_key": cand.weight.key,
        "bias_key": cand.bias.key if cand.bias else None,
        "shape": list(cand.weight.shape),
        "dtype": cand.weight.dtype,
        "action": layer.action.value,
        "reason": layer.reason.value if layer.reason else None,
        "detail": layer.detail,
        "rank": layer.rank,
        "break_even_rank": geo.break_even_rank,
        "params_before": geo.params(),
        "params_after": geo.params(rank),
        "macs_before": geo.macs(),
        "macs_after": geo.macs(rank),
        "relative_error": error,
        "energy_kept": energy,
        "error_source": source,
        "engine": result.engine if result else None,
    }


def build_report(*, command: str, checkpoint: Checkpoint, plan: Plan, results: dict[str, LayerResult],
                 output: dict[str, Any] | None, notes: list[str], timing: dict[str, Any]) -> dict[str, Any]:
    layers = [_layer_entry(layer, results.get(layer.name)) for layer in plan.layers]
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
        "totals": _totals(checkpoint, plan, layers, results),
        "notes": notes,
        "timing": timing,
    }


def _totals(checkpoint: Checkpoint, plan: Plan, layers: list[dict], results: dict[str, LayerResult]) -> dict:
    floats = sum(info.numel for info in checkpoint.infos if info.is_float)
    saved = sum(e["params_before"] - e["params_after"] for e in layers)
    weighted, energy = 0.0, 0.0
    for layer in plan.to_factorize:
        result = results.get(layer.name)
        norm = result.norm if result else layer.norm
        error = result.relative_error if result else layer.predicted_error
        if norm is None or error is None:
            weighted = energy = math.nan
            break
        weighted += (error * norm) ** 2
        energy += norm ** 2
    total_error = None if math.isnan(weighted) else (math.sqrt(weighted / energy) if energy else 0.0)
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
        "relative_error": total_error,
    }


def load_schema() -> dict[str, Any]:
    return json.loads(resources.files("factorize_cli").joinpath("report.schema.json").read_text())


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, allow_nan=False) + "\n"
