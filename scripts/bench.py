"""Benchmark `factorize apply` against the naive baseline on synthetic checkpoints of realistic shape.

    python scripts/bench.py                 # everything: BERT-base-like, 1.1B LLaMA-like slice and whole
    python scripts/bench.py --quick         # BERT-base-like and the slice only
    python scripts/bench.py --calibrated slice [--before DIR]   # only the calibrated runs, on the slice

``--calibrated`` runs `apply --calibration` with synthetic statistics (identical for q/k/v and for
gate/up, which read the same input; ``xtx = A^T A`` of random anisotropic rows) beside the plain run,
and rewrites only the calibrated section of docs/benchmarks.md. ``--before DIR`` also runs the same
commands from another checkout (e.g. ``git worktree add /tmp/orig <commit>``), with a format /1 copy
of the statistics, for a before/after comparison.

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

from factorize_cli.calibration import ActivationStats, StatsFile, save_activation_stats  # noqa: E402
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


def cpu_of(log: Path) -> float:
    """CPU seconds (user + system) of the command that wrote ``log``."""
    return json.loads(log.read_text().strip().splitlines()[-1])["cpu_seconds"]


def run(cmd: list[str], log: Path, code: Path = ROOT, limit: int | None = None) -> tuple[float, int, bool]:
    """Wall time, peak RSS (bytes) and whether ``limit`` (seconds) stopped it, of a command in a fresh
    process launched by scripts/measure.py; ``code``: the checkout whose factorize_cli runs. The CPU
    time is in the log's last line."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    with open(log, "w") as out:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "measure.py"), "--",
                        *(["timeout", str(limit)] if limit else []), *cmd], stdout=out,
                       stderr=subprocess.STDOUT, cwd=code, env=env, check=False)
    result = json.loads(log.read_text().strip().splitlines()[-1])
    stopped = bool(limit) and result["exit_code"] == 124
    if result["exit_code"] != 0 and not stopped:
        raise SystemExit(f"{' '.join(cmd)} failed ({result['exit_code']}); see {log}")
    return result["seconds"], result["max_rss"], stopped


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
            twice: bool = False, plain_s: float | None = None) -> dict:
    work = BUILD / "runs"
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{label}.factorize.safetensors"
    report_path = work / f"{label}.report.json"
    cmd = [*FACTORIZE, "apply", str(source), str(out), "--force", "--report", str(report_path), "-q", *extra]
    row: dict = {"checkpoint": label, "size_gb": source.stat().st_size / 1e9}
    if baseline:
        row["baseline_s"], row["baseline_rss"], _ = run(
            [sys.executable, "scripts/naive_baseline.py", str(source), str(work / f"{label}.naive.safetensors")],
            work / f"{label}.naive.log")
    row["tool_s"], row["tool_rss"], _ = run(cmd, work / f"{label}.log")
    row["tool_cpu"] = cpu_of(work / f"{label}.log")
    if plain_s:
        row["vs_plain"] = row["tool_s"] / plain_s
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
    return row


def plan_time(source: Path, label: str, rows: list[dict]) -> None:
    seconds, rss, _ = run([sys.executable, "-m", "factorize_cli", "plan", str(source), "-q", "--json"],
                       BUILD / "runs" / f"{label}.plan.log")
    rows.append({"checkpoint": f"{label} (plan, headers only)", "size_gb": source.stat().st_size / 1e9,
                 "tool_s": seconds, "tool_rss": rss})
    print(json.dumps(rows[-1]), flush=True)


def markdown(rows: list[dict], command: str) -> str:
    def gb(x):
        return f"{x / 2**30:.2f} GiB" if x else ""

    def pct(x):
        return "" if x is None else f"{100 * x:.4f}%"

    def busy(r):
        return f"{100 * r['tool_cpu'] / r['tool_s'] / os.cpu_count():.0f}%" if "tool_cpu" in r else ""

    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        "Synthetic checkpoints with decaying spectra; `apply` at ratio 0.25 (defaults). Each command ran in a",
        "fresh process; the baseline (`scripts/naive_baseline.py`: load everything, float32 `torch.linalg.svd`",
        "per weight, save) ran in the same run. Error excess: worst layer's achieved relative error over the",
        "Eckart-Young optimum from float64 singular values. CPU use: the command's CPU seconds over its wall",
        f"seconds and the {os.cpu_count()} cores (100% = every core busy for the whole run, start-up included).",
        "The calibrated row runs `--calibration` with synthetic statistics (as in the section below) and is",
        "compared with the plain row of the same checkpoint in the same run; the section below is an older",
        "before/after comparison (`--calibrated`), kept until it is rerun.",
        "",
        "| checkpoint | size | baseline | factorize | speed-up | baseline peak RSS | factorize peak RSS | "
        "worst error excess (factorize / baseline) | engines | identical bytes on rerun | CPU use |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['baseline_s'] / r['tool_s']:.1f}x" if "baseline_s" in r else ""
        if "vs_plain" in r:
            speed = f"{r['vs_plain']:.2f}x the plain time"
        base = f"{r['baseline_s']:.1f} s" if "baseline_s" in r else ""
        excess = pct(r.get("excess"))
        if "baseline_excess" in r:
            excess += f" / {pct(r['baseline_excess'])}"
        same = {True: "yes", False: "NO"}.get(r.get("identical"), "")
        lines.append(f"| {r['checkpoint']} | {r['size_gb']:.2f} GB | {base} | {r['tool_s']:.1f} s | {speed} | "
                     f"{gb(r.get('baseline_rss'))} | {gb(r['tool_rss'])} | {excess} | "
                     f"{', '.join(r.get('engines', []))} | {same} | "
                     f"{busy(r)} |")
    return "\n".join(lines + [""] + bars(rows)) + "\n"


# Issue 14's bars (a checkpoint's label, what it asks, the number it reads from the row, the test)
BARS = (("llama-1.1b slice, 2 layers (bf16)", "at least 6x the naive loop", lambda r: r["baseline_s"] / r["tool_s"],
         lambda v: v >= 6, "{:.1f}x"),
        ("llama-1.1b slice, 2 layers (bf16)", "every layer within 0.1% of the optimum", lambda r: r["excess"],
         lambda v: v <= 1e-3, "worst {:.4%}"),
        ("bert-base (fp32)", "at least 3x the naive loop", lambda r: r["baseline_s"] / r["tool_s"],
         lambda v: v >= 3, "{:.1f}x"),
        ("llama-1.1b whole (bf16)", "under 60 s", lambda r: r["tool_s"], lambda v: v < 60, "{:.1f} s"),
        ("llama-1.1b whole (bf16)", "peak RSS at most the 0.76 GiB before the speed work",
         lambda r: r["tool_rss"] / 2**30, lambda v: v <= 0.76, "{:.2f} GiB"),
        ("llama-1.1b slice, calibrated", "within 1.5x of the plain apply", lambda r: r["vs_plain"],
         lambda v: v <= 1.5, "{:.2f}x"),
        ("llama-1.1b slice, 2 layers (bf16)", "byte-identical reruns", lambda r: r["identical"],
         lambda v: v is True, "{}"))


def bars(rows: list[dict]) -> list[str]:
    """Issue 14's bars against this run's rows, each met or not (on this machine, in this run)."""
    by_label = {r["checkpoint"]: r for r in rows}
    lines = ["Issue 14's bars in this run:", ""]
    for label, asks, read, ok, shown in BARS:
        row = by_label.get(label)
        if row is None:
            continue
        value = read(row)
        lines.append(f"- {label}: {asks}: {shown.format(value)}, {'met' if ok(value) else 'not met'}")
    return lines


LLAMA_INPUTS = (("self_attn", 2048, ("q_proj", "k_proj", "v_proj")), ("o", 2048, ("o_proj",)),
                ("mlp", 2048, ("gate_proj", "up_proj")), ("down", 5632, ("down_proj",)))


def build_stats(path: Path, layers: int, rows: int = 6144) -> Path:
    """Synthetic statistics of the LLaMA-like decoder layers: one random anisotropic input per distinct
    input (q/k/v share one, gate/up another), ``xtx = A^T A`` of ``rows`` rows, written by the tool."""
    if path.exists():
        return path
    gen = torch.Generator().manual_seed(1)
    stats = {}
    for i in range(layers):
        for source, width, readers in LLAMA_INPUTS:
            scale = torch.logspace(0, -2, width, dtype=torch.float64)[torch.randperm(width, generator=gen)]
            a = torch.randn(rows, width, generator=gen, dtype=torch.float64) * scale
            xtx, total = a.T @ a, a.sum(0)
            part = "self_attn" if source in ("self_attn", "o") else "mlp"
            for reader in readers:  # one object per layer, as the forward hooks make them (tensors shared)
                stats[f"model.layers.{i}.{part}.{reader}"] = ActivationStats(xtx, total, rows)
    tmp = path.with_suffix(".tmp")
    save_activation_stats(stats, tmp, {"data": "synthetic"})
    tmp.rename(path)
    return path


def legacy_stats(path: Path) -> Path:
    """A format /1 copy (every layer its own tensors), for code from before aliases."""
    out = path.with_name(path.stem + ".v1.safetensors")
    if out.exists():
        return out
    with StatsFile(path) as stats:
        names = sorted(stats)
        layout = [OutputTensor(f"{n}.{part}", shape, dtype) for n in names for part, shape, dtype in (
            ("xtx", (stats.fan_in(n),) * 2, "float64"), ("sum", (stats.fan_in(n),), "float64"), ("count", (), "int64"))]

        def tensors():
            for n in names:
                s = stats.read(n)
                yield from (s.xtx, s.total, torch.tensor(s.count, dtype=torch.int64))

        tmp = out.with_suffix(".tmp")
        write_safetensors(tmp, layout, tensors(), {"format": "factorize-activation-stats/1",
                                                   "layers": json.dumps(names)})
    tmp.rename(out)
    return out


CALIBRATED_RUNS = (("plain", []), ("calibrated, ratio 0.25", ["--calibration"]),
                   ("calibrated, --rank-policy params:0.8", ["--calibration", "--rank-policy", "params:0.8"]))


def calibrated(label: str, source: Path, stats: Path, extra: list[str], before: Path | None, *,
               runs=CALIBRATED_RUNS, before_limit: int | None = None) -> list[dict]:
    """Plain and calibrated applies of one checkpoint, after (this checkout) and before (``before``,
    stopped after ``before_limit`` seconds if given: its peak RSS is then a lower bound)."""
    work = BUILD / "runs"
    work.mkdir(parents=True, exist_ok=True)
    old_stats = legacy_stats(stats) if before else None
    rows = []
    for name, flags in runs:
        row = {"checkpoint": label, "run": name}
        for when, code, stats_file in (("after", ROOT, stats), ("before", before, old_stats)):
            if code is None:
                continue
            tag = f"{label}.{when}.{len(rows)}".replace(" ", "_").replace(",", "")
            out, report = work / f"{tag}.safetensors", work / f"{tag}.report.json"
            args = [a if a != "--calibration" else f"--calibration={stats_file}" for a in flags]
            cmd = [*FACTORIZE, "apply", str(source), str(out), "--force", "--report", str(report), "-q", *args, *extra]
            limit = before_limit if when == "before" and flags else None
            row[f"{when}_s"], row[f"{when}_rss"], row[f"{when}_stopped"] = run(cmd, work / f"{tag}.log", code, limit)
            row[f"{when}_cpu"] = json.loads((work / f"{tag}.log").read_text().strip().splitlines()[-1])["cpu_seconds"]
            row[f"{when}_sha"] = None if row[f"{when}_stopped"] else sha256(out)
            out.unlink(missing_ok=True)
        row["identical"] = row["after_sha"] == row["before_sha"] if before and row["before_sha"] else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def stages(source: Path) -> str:
    """scripts/stages.py on the slice's gate_proj: where the time of one 2048x5632 matrix goes."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "stages.py"), str(source)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    return "\n".join(["## Where the time of one matrix goes", "",
                      "`scripts/stages.py` (run by `make bench` after the table): one 2048x5632 bf16 matrix at rank 512 in one",
                      "process, best of three, against the naive float32 SVD in the same process; then what a calibrated",
                      "layer adds for a 5632-wide input (once per distinct input for the Cholesky factor).", "", "```",
                      out.rstrip(), "```", ""])


CALIBRATED_HEADING = "## Calibrated runs (`--calibration`)"


def calibrated_markdown(rows: list[dict], sizes: dict[str, str], command: str) -> str:
    def gb(x):
        return f"{x / 2**30:.2f} GiB" if x else ""

    lines = [CALIBRATED_HEADING, "",
             f"Produced by `{command}`, {time.strftime('%Y-%m-%d')}.",
             "Synthetic statistics (`xtx = A^T A`, 6144 random anisotropic rows per distinct input; q/k/v and",
             "gate/up share theirs). *Before*: the code before lazy statistics (every layer's float64 `xtx`",
             "loaded at once, one whitening per layer, planned spectra by float64 SVD). Statistics files: "
             + "; ".join(f"{k}: {v}" for k, v in sizes.items()) + ".", "",
             "Times are wall (CPU) seconds on a shared machine: identical runs can differ by 2x (the plain rows run",
             "the same code before and after), so compare peak RSS, and times only within large factors.", "",
             "| checkpoint | run | before | after | before peak RSS | after peak RSS | identical output |",
             "|---|---|---|---|---|---|---|"]

    def seconds(r, when):
        if f"{when}_s" not in r:
            return ""
        cpu = f" ({r[f'{when}_cpu']:.0f} s CPU)" if f"{when}_cpu" in r else ""
        return (f"stopped at {r[f'{when}_s']:.0f} s" if r.get(f"{when}_stopped") else f"{r[f'{when}_s']:.1f} s") + cpu

    for r in rows:
        same = {True: "yes", False: "no"}.get(r.get("identical"), "")
        lines.append(f"| {r['checkpoint']} | {r['run']} | {seconds(r, 'before')} | {seconds(r, 'after')} | "
                     f"{'>= ' if r.get('before_stopped') else ''}{gb(r.get('before_rss'))} | {gb(r['after_rss'])} | "
                     f"{same} |")
    return "\n".join(lines) + "\n"


SCALEOUT_HEADING = "## Scaling out (torchrun)"


def write_section(path: Path, main: str | None, section: str | None) -> None:
    """Replace the main table or the calibrated section of the benchmarks page, keeping the other."""
    text = path.read_text() if path.exists() else ""
    text, scaleout, rest = text.partition(SCALEOUT_HEADING)  # scripts/bench_scaleout.py's section stays
    head, _, tail = text.partition(CALIBRATED_HEADING)
    old_section = CALIBRATED_HEADING + tail if tail else ""
    parts = [main if main is not None else head.rstrip("\n") + "\n", section if section is not None else old_section]
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(p for p in parts if p).rstrip("\n") + "\n"  # no blank lines piling up run after run
    path.write_text(body + ("\n" + scaleout + rest if scaleout else ""))


CALIBRATED_CHECKPOINTS = {  # label, layers, runs (the whole model: ~45 min a calibrated run on two cores)
    "slice": ("llama-1.1b slice, 2 layers (bf16)", 2, CALIBRATED_RUNS),
    "whole": ("llama-1.1b whole (bf16)", 22, CALIBRATED_RUNS[:2]),
}


def calibrated_main(args: argparse.Namespace, extra: list[str]) -> None:
    """Run the calibrated comparisons asked for; rows of earlier invocations (kept in build/bench/) are
    merged, so the slice and the whole model can be measured separately."""
    which = ["slice"] if args.calibrated == "all" and args.quick else \
        ["slice", "whole"] if args.calibrated == "all" else [args.calibrated]
    store = BUILD / "calibrated-rows.json"
    saved = json.loads(store.read_text()) if store.exists() else {"rows": [], "sizes": {}, "commands": {}}
    if args.before:
        commit = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    command = f"python scripts/bench.py --calibrated {' '.join(which) if len(which) == 1 else ''}".rstrip() + \
        (f" --before <checkout of {commit or args.before}>" if args.before else "") + \
        (f" --before-limit {args.before_limit}" if args.before_limit and "whole" in which else "") + \
        (f" --extra '{args.extra}'" if extra else "")
    for key in which:
        label, layers, runs = CALIBRATED_CHECKPOINTS[key]
        stem = "llama-slice" if key == "slice" else "llama-1.1b"
        source = build(BUILD / f"{stem}.safetensors", llama_spec(layers, with_embeddings=key == "whole"),
                       torch.bfloat16)
        stats = build_stats(BUILD / f"{stem}.stats.safetensors", layers)
        saved["sizes"][stem] = f"{stats.stat().st_size / 1e9:.2f} GB" + (
            f" (/1: {legacy_stats(stats).stat().st_size / 1e9:.2f} GB)" if args.before else "")
        rows = calibrated(label, source, stats, extra, args.before.resolve() if args.before else None,
                          runs=runs, before_limit=args.before_limit if key == "whole" else None)
        saved["rows"] = [r for r in saved["rows"] if r["checkpoint"] != label] + rows
        saved["commands"][label] = command
        store.write_text(json.dumps(saved, indent=1))
    order = [c[0] for c in CALIBRATED_CHECKPOINTS.values()]
    saved["rows"].sort(key=lambda r: order.index(r["checkpoint"]))
    commands = "; ".join(sorted(set(saved["commands"].values())))
    write_section(Path(args.out), None, calibrated_markdown(saved["rows"], saved["sizes"], commands))
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the whole 1.1B checkpoint")
    ap.add_argument("--extra", default="", help="extra flags for factorize apply, e.g. '--device cuda'")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--calibrated", nargs="?", const="all", choices=["all", "slice", "whole"],
                    help="only the calibrated runs: of the slice, the whole model, or both (all; --quick: the slice)")
    ap.add_argument("--before", type=Path, help="with --calibrated: also run a checkout of older code, for comparison")
    ap.add_argument("--before-limit", type=int, help="stop the older code's calibrated runs of the whole model after "
                    "this many seconds (its peak RSS, reached while loading the statistics, is then a lower bound)")
    args = ap.parse_args()
    extra = args.extra.split()
    if args.calibrated:
        calibrated_main(args, extra)
        return
    rows: list[dict] = []
    bert = build(BUILD / "bert-base.safetensors", bert_spec(), torch.float32)
    compare("bert-base (fp32)", bert, extra, rows, baseline=True, errors=True)
    piece = build(BUILD / "llama-slice.safetensors", llama_spec(2, with_embeddings=False), torch.bfloat16)
    plain = compare("llama-1.1b slice, 2 layers (bf16)", piece, extra, rows, baseline=True, errors=True, twice=True)
    stats = build_stats(BUILD / "llama-slice.stats.safetensors", 2)
    compare("llama-1.1b slice, calibrated", piece, [f"--calibration={stats}", *extra], rows, baseline=False,
            errors=False, plain_s=plain["tool_s"])
    if not args.quick:
        whole = build(BUILD / "llama-1.1b.safetensors", llama_spec(22), torch.bfloat16)
        compare("llama-1.1b whole (bf16)", whole, extra, rows, baseline=False, errors=False)
        plan_time(whole, "llama-1.1b whole", rows)
    command = "python scripts/bench.py" + (" --quick" if args.quick else "") + (f" --extra '{args.extra}'" if extra else "")
    write_section(Path(args.out), markdown(rows, command) + "\n" + stages(piece), None)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
