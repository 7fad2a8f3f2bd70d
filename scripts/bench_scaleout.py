"""One process versus torchrun: `factorize apply` on the 1.1B LLaMA-like checkpoint (built by scripts/bench.py).

    python scripts/bench_scaleout.py                 # the whole 1.1B-like checkpoint
    python scripts/bench_scaleout.py --slice         # its first two decoder layers (a quick check)
    python scripts/bench_scaleout.py --extra '--device cuda'   # on GPUs (one rank per GPU)

Runs, each in a fresh process (peak RSS from wait4: for torchrun, the largest of its ranks):
1 process on 1 thread; torchrun with 2 processes of 1 thread each (``OMP_NUM_THREADS=1``); and, for
reference, 1 process on 2 threads (what a plain run does on two cores). Every output is compared byte
for byte with the first. Writes the "Scaling out" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import BUILD, FACTORIZE, build, cpu_of, llama_spec, run  # noqa: E402

HEADING = "## Scaling out (torchrun)"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def measure(label: str, cmd: list[str], threads: int, out: Path, runs: Path) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    log = runs / f"scaleout-{label.replace(' ', '-')}.log"
    seconds, rss, _ = run(cmd, log)
    return {"label": label, "seconds": seconds, "rss": rss, "cpu": cpu_of(log), "sha": sha256(out)}


def section(rows: list[dict], label: str, command: str) -> str:
    base = rows[0]
    lines = [HEADING, "",
             f"`{command}` on {label}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}; every command in a fresh process, in the same run. Peak RSS for "
             "torchrun is its largest rank's (each rank holds one layer at a time; rank 0 also writes).", "",
             "| run | seconds | vs 1 process | CPU seconds | peak RSS | output |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        same = "identical bytes" if r["sha"] == base["sha"] else "DIFFERS"
        lines.append(f"| {r['label']} | {r['seconds']:.1f} | {base['seconds'] / r['seconds']:.2f}x | "
                     f"{r['cpu']:.0f} | {r['rss'] / 2**30:.2f} GiB | {same} |")
    lines += ["", "Outputs are compared with the first row's by SHA-256: bit-identical whatever the number of "
                  "processes, as long as each layer gets the same number of math threads (1 here: one process "
                  "on two threads factorizes two layers at a time on one thread each).", ""]
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    head, _, _ = old.partition(HEADING)
    path.write_text(head.rstrip("\n") + "\n\n" + text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slice", action="store_true", help="the 2-layer slice instead of the whole model")
    ap.add_argument("--extra", default="", help="extra flags for factorize apply, e.g. '--device cuda'")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if args.slice:
        source, label = build(BUILD / "llama-slice.safetensors", llama_spec(2, False), torch.bfloat16), \
            "the 1.1B LLaMA-like slice (2 layers, bf16)"
    else:
        source, label = build(BUILD / "llama-1.1b.safetensors", llama_spec(22), torch.bfloat16), \
            "the whole 1.1B LLaMA-like checkpoint (bf16, 2.2 GB)"
    runs = BUILD / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    extra = args.extra.split()
    rows = []
    for name, launcher, threads in (("1 process, 1 thread", FACTORIZE, 1),
                                    ("torchrun, 2 processes x 1 thread", [*TORCHRUN, "2", "-m", "factorize_cli"], 1),
                                    ("1 process, 2 threads", FACTORIZE, 2)):
        out = runs / f"scaleout-{len(rows)}.safetensors"
        rows.append(measure(name, [*launcher, "apply", str(source), str(out), "--force", "-q", *extra],
                            threads, out, runs))
        print(f"{name}: {rows[-1]['seconds']:.1f} s, {rows[-1]['rss'] / 2**30:.2f} GiB", file=sys.stderr)
    command = "python scripts/bench_scaleout.py" + (" --slice" if args.slice else "") + \
        (f" --extra '{args.extra}'" if args.extra else "")
    text = section(rows, label, command)
    write(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
