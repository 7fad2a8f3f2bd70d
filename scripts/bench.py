"""Benchmark `factorize apply` against the naive baseline on synthetic checkpoints of realistic shape.

    python scripts/bench.py                 # everything: BERT-base-like, 1.1B LLaMA-like slice and whole
    python scripts/bench.py --quick         # BERT-base-like and the slice only

Checkpoints (built once under build/bench/, decaying spectra sigma_i ~ i^-alpha):
- bert-base: 12 layers, hidden 768, MLP 3072, float32 (~110 M params);
- llama-1.1b: 22 layers, hidden 2048, MLP 5632, GQA k/v 256x2048, vocab 32000, bfloat16 (~1.1 B params);
- llama-slice: its first two decoder layers.
Every measured command runs in a fresh process; peak RSS comes from wait4's rusage. Ratios are
against the baseline timed in the same run (these machines are shared and noisy). Writes
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factorize_cli.formats import open_checkpoint  # noqa: E402
from factorize_cli.formats.safetensors import OutputTensor, write_safetensors  # noqa: E402

BUILD = ROOT / "build" / "bench"
FACTORIZE = [sys.executable, "-m", "factorize_cli"]


def decaying(out: int, fan_in: int, alpha: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A matrix whose singular values fall off like i^-alpha (Gaussian bases, scaled like a trained layer)."""
    k = min(out, fan_in)
    left = torch.randn(out, k, generator=gen) / k ** 0.5
    right = torch.randn(k, fan_in, generator=gen) / fan_in ** 0.5
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    w = (left * sigma) @ right
    return (w * ((2.0 / (out + fan_in)) ** 0.5 / w.std())).to(dtype)


def bert_spec():
    h, f = 768, 3072
    yield "embeddings.word_embeddings.weight", (30522, h), None
    yield "embeddings.position_embeddings.weight", (512, h), None
    for i in range(12):
        p = f"encoder.layer.{i}"
        for name, alpha in (("attention.self.query", 0.6), ("attention.self.key", 0.6),
                            ("attention.self.value", 0.4), ("attention.output.dense", 0.4)):
            yield f"{p}.{name}.weight", (h, h), alpha
            yield f"{p}.{name}.bias", (h,), None
        yield f"{p}.intermediate.dense.weight", (f, h), 0.35
        yield f"{p}.intermediate.dense.bias", (f,), None
        yield f"{p}.output.dense.weight", (h, f), 0.35
        yield f"{p}.output.dense.bias", (h,), None
        yield f"{p}.output.LayerNorm.weight", (h,), None


def llama_spec(layers: int, with_embeddings: bool = True):
    h, f, kv, vocab = 2048, 5632, 256, 32000
    if with_embeddings:
        yield "model.embed_tokens.weight", (vocab, h), None
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape, alpha in (("self_attn.q_proj", (h, h), 0.5), ("self_attn.k_proj", (kv, h), 0.5),
                                   ("self_attn.v_proj", (kv, h), 0.3), ("self_attn.o_proj", (h, h), 0.3),
                                   ("mlp.gate_proj", (f, h), 0.3), ("mlp.up_proj", (f, h), 0.3),
                                   ("mlp.down_proj", (h, f), 0.3)):
            yield f"{p}.{name}.weight", shape, alpha
        yield f"{p}.input_layernorm.weight", (h,), None
        yield f"{p}.post_attention_layernorm.weight", (h,), None
    if with_embeddings:
        yield "model.norm.weight", (h,), None
        yield "lm_head.weight", (vocab, h), None


def build(path: Path, spec, dtype: torch.dtype) -> Path:
    """Write the checkpoint tensor by tensor (the whole never sits in memory)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = list(spec)
    gen = torch.Generator().manual_seed(0)
    name = str(dtype).removeprefix("torch.")

    def tensors():
        for key, shape, alpha in entries:
            if alpha is not None:
                yield decaying(shape[0], shape[1], alpha, gen, dtype)
            elif len(shape) == 1:
                yield torch.ones(shape, dtype=dtype) if key.endswith("weight") else torch.zeros(shape, dtype=dtype)
            else:
                yield (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    tmp = path.with_suffix(".tmp")
    write_safetensors(tmp, [OutputTensor(k, tuple(s), name) for k, s, _ in entries], tensors(), {"format": "pt"})
    tmp.rename(path)
    return path


def run(cmd: list[str], log: Path) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of a command in a fresh process, launched by scripts/measure.py."""
    with open(log, "w") as out:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "measure.py"), "--", *cmd], stdout=out,
                       stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    result = json.loads(log.read_text().strip().splitlines()[-1])
    if result["exit_code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result['exit_code']}); see {log}")
    return result["seconds"], result["max_rss"]


def optimum_errors(path: Path, report: dict) -> dict[str, float]:
    """Eckart-Young optimum per factorized layer, from float64 singular values."""
    out = {}
    with open_checkpoint(path) as ckpt:
        for e in report["layers"]:
            if e["action"] == "factorize":
                s = torch.linalg.svdvals(ckpt.get(e["weight_key"]).to(torch.float64))
                out[e["name"]] = float(s[e["rank"]:].square().sum().sqrt() / s.square().sum().sqrt())
    return out


def baseline_errors(source: Path, output: Path, names: list[str]) -> dict[str, float]:
    out = {}
    with open_checkpoint(source) as a, open_checkpoint(output) as b:
        for name in names:
            w = a.get(f"{name}.weight").to(torch.float64)
            approx = b.get(f"{name}.module1.weight").to(torch.float64) @ b.get(f"{name}.module0.weight").to(torch.float64)
            out[name] = float((w - approx).norm() / w.norm())
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compare(label: str, source: Path, extra: list[str], rows: list[dict], *, baseline: bool, errors: bool,
            twice: bool = False) -> None:
    work = BUILD / "runs"
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{label}.factorize.safetensors"
    report_path = work / f"{label}.report.json"
    cmd = [*FACTORIZE, "apply", str(source), str(out), "--force", "--report", str(report_path), "-q", *extra]
    row: dict = {"checkpoint": label, "size_gb": source.stat().st_size / 1e9}
    if baseline:
        row["baseline_s"], row["baseline_rss"] = run(
            [sys.executable, "scripts/naive_baseline.py", str(source), str(work / f"{label}.naive.safetensors")],
            work / f"{label}.naive.log")
    row["tool_s"], row["tool_rss"] = run(cmd, work / f"{label}.log")
    report = json.loads(report_path.read_text())
    row["layers"] = report["totals"]["factorized"]
    row["engines"] = sorted({e["engine"] for e in report["layers"] if e["engine"]})
    if twice:
        first = sha256(out)
        run(cmd, work / f"{label}.again.log")
        row["identical"] = first == sha256(out)
    if errors:
        best = optimum_errors(source, report)
        ours = {e["name"]: e["achieved_error"] for e in report["layers"] if e["action"] == "factorize"}
        row["excess"] = max(ours[n] / best[n] - 1 for n in best)
        if baseline:
            theirs = baseline_errors(source, work / f"{label}.naive.safetensors", list(best))
            row["baseline_excess"] = max(theirs[n] / best[n] - 1 for n in best)
    rows.append(row)
    print(json.dumps(row), flush=True)


def plan_time(source: Path, label: str, rows: list[dict]) -> None:
    seconds, rss = run([sys.executable, "-m", "factorize_cli", "plan", str(source), "-q", "--json"],
                       BUILD / "runs" / f"{label}.plan.log")
    rows.append({"checkpoint": f"{label} (plan, headers only)", "size_gb": source.stat().st_size / 1e9,
                 "tool_s": seconds, "tool_rss": rss})
    print(json.dumps(rows[-1]), flush=True)


def markdown(rows: list[dict], command: str) -> str:
    def gb(x):
        return f"{x / 2**30:.2f} GiB" if x else ""

    def pct(x):
        return "" if x is None else f"{100 * x:.4f}%"

    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        "Synthetic checkpoints with decaying spectra; `apply` at ratio 0.25 (defaults). Each command ran in a",
        "fresh process; the baseline (`scripts/naive_baseline.py`: load everything, float32 `torch.linalg.svd`",
        "per weight, save) ran in the same run. Error excess: worst layer's achieved relative error over the",
        "Eckart-Young optimum from float64 singular values.",
        "",
        "| checkpoint | size | baseline | factorize | speed-up | baseline peak RSS | factorize peak RSS | "
        "worst error excess (factorize / baseline) | engines | identical bytes on rerun |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['baseline_s'] / r['tool_s']:.1f}x" if "baseline_s" in r else ""
        base = f"{r['baseline_s']:.1f} s" if "baseline_s" in r else ""
        excess = pct(r.get("excess"))
        if "baseline_excess" in r:
            excess += f" / {pct(r['baseline_excess'])}"
        same = {True: "yes", False: "NO"}.get(r.get("identical"), "")
        lines.append(f"| {r['checkpoint']} | {r['size_gb']:.2f} GB | {base} | {r['tool_s']:.1f} s | {speed} | "
                     f"{gb(r.get('baseline_rss'))} | {gb(r['tool_rss'])} | {excess} | "
                     f"{', '.join(r.get('engines', []))} | {same} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the whole 1.1B checkpoint")
    ap.add_argument("--extra", default="", help="extra flags for factorize apply, e.g. '--device cuda'")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    extra = args.extra.split()
    rows: list[dict] = []
    bert = build(BUILD / "bert-base.safetensors", bert_spec(), torch.float32)
    compare("bert-base (fp32)", bert, extra, rows, baseline=True, errors=True)
    piece = build(BUILD / "llama-slice.safetensors", llama_spec(2, with_embeddings=False), torch.bfloat16)
    compare("llama-1.1b slice, 2 layers (bf16)", piece, extra, rows, baseline=True, errors=True, twice=True)
    if not args.quick:
        whole = build(BUILD / "llama-1.1b.safetensors", llama_spec(22), torch.bfloat16)
        compare("llama-1.1b whole (bf16)", whole, extra, rows, baseline=False, errors=False)
        plan_time(whole, "llama-1.1b whole", rows)
    command = "python scripts/bench.py" + (" --quick" if args.quick else "") + (f" --extra '{args.extra}'" if extra else "")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(rows, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
