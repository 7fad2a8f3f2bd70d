"""Running one command over many checkpoints: per-input status, JSON lines, the worst exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from factorize_cli.batch import Job
from factorize_cli.errors import FactorizeError, GateError

OK, GATE_FAILED, FAILED = "ok", "gate-failed", "error"
EXIT = {OK: 0, GATE_FAILED: 1, FAILED: 2}


def run_jobs(jobs: list[Job], work: Callable[[Job], dict[str, Any]], *, quiet: bool, jsonl: bool,
             json_out: bool) -> int:
    """Run ``work`` on each job, keep going after failures, and return the worst exit code.

    Humans get the table (unless ``quiet``) and one error line per failure on stderr; machines
    get the report (``json_out``, one input) or one JSON object per input (``jsonl``) on stdout.
    """
    from factorize_cli.cli.render import show
    from factorize_cli.report import dumps

    counts = {OK: 0, GATE_FAILED: 0, FAILED: 0}
    for job in jobs:
        report: dict[str, Any] | None = None
        error: str | None = None
        try:
            report = work(job)
            status = OK
        except GateError as e:
            report, status = e.report, GATE_FAILED
            for violation in e.violations:
                print(f"factorize: gate failed: {job.source}: {violation}", file=sys.stderr)
        except FactorizeError as e:
            status, error = FAILED, str(e)
            print(f"factorize: error: {' '.join(error.split())}", file=sys.stderr)
        counts[status] += 1
        if report is not None:
            show(report, quiet=quiet)
            if json_out:
                sys.stdout.write(dumps(report))
        if jsonl:
            sys.stdout.write(json.dumps(_line(job, status, report, error), allow_nan=False) + "\n")
            sys.stdout.flush()
    if len(jobs) > 1 and not (quiet and not any(counts[s] for s in (GATE_FAILED, FAILED))):
        print(f"factorize: {len(jobs)} checkpoints: {counts[OK]} done, {counts[GATE_FAILED]} failed a gate, "
              f"{counts[FAILED]} failed", file=sys.stderr)
    return max((EXIT[s] for s, n in counts.items() if n), default=0)


def _line(job: Job, status: str, report: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    out = report["output"] if report else None
    return {
        "input": job.source,
        "status": status,
        "exit_code": EXIT[status],
        "output": out["path"] if out and out.get("written") else None,
        "report": out["report"] if out else None,
        "totals": report["totals"] if report else None,
        "gates": report["gates"] if report else None,
        "error": error,
    }
