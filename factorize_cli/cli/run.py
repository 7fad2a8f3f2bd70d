"""Running one command over many checkpoints: per-input status, JSON lines, the worst exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from factorize_cli.batch import Job
from factorize_cli.errors import FactorizeError, GateError, verdict

OK, GATE_FAILED, FAILED, INTERNAL = "ok", "gate-failed", "error", "internal-error"
EXIT = {OK: 0, GATE_FAILED: 1, FAILED: 2, INTERNAL: 3}


def run_jobs(jobs: list[Job], work: Callable[[Job], dict[str, Any]], *, quiet: bool, jsonl: bool,
             json_out: bool) -> int:
    """Run ``work`` on each job, keep going after any failure, and return the worst exit code.

    Every failure of one checkpoint (ours, the system's such as a full disk, or a bug) becomes
    that checkpoint's error line and status; only an interrupt (Ctrl-C: exit 130) stops the batch,
    and under torchrun a failure one rank met alone (the ranks could not go on in step).

    Humans get the table (unless ``quiet``) and one error line per failure on stderr; machines
    get the report (``json_out``, one input) or one JSON object per input (``jsonl``) on stdout.
    """
    from factorize_cli import distributed
    from factorize_cli.cli.render import show
    from factorize_cli.report import dumps

    counts = dict.fromkeys(EXIT, 0)
    debug = _debug()
    for job in jobs:
        report: dict[str, Any] | None = None
        error: str | None = None
        try:
            report = work(job)
            status = OK
        except GateError as e:  # rank 0's alone at commit, after the ranks' last exchange; else every rank's
            report, status = e.report, GATE_FAILED
            for violation in e.violations if not distributed.follower() else ():  # joined by work()
                print(f"factorize: gate failed: {job.source}: {violation}", file=sys.stderr)
        except Exception as e:
            if not distributed.known_to_all(e):  # under torchrun, one rank's own failure ends the run
                raise
            status, error = _failure(e, debug)
        counts[status] += 1
        if distributed.follower():  # under torchrun rank 0 prints; the other ranks' failures reach it
            continue
        if error is not None:
            error = " ".join(error.split())
            print(f"factorize: error: {error}", file=sys.stderr)
        if report is not None:
            show(report, quiet=quiet)
            if json_out:
                sys.stdout.write(dumps(report))
        if jsonl:
            sys.stdout.write(json.dumps(_line(job, status, report, error), allow_nan=False) + "\n")
            sys.stdout.flush()
    if len(jobs) > 1 and not distributed.follower() and not (quiet and not any(counts[s] for s in (GATE_FAILED, FAILED, INTERNAL))):
        print(f"factorize: {len(jobs)} checkpoints: {counts[OK]} done, {counts[GATE_FAILED]} failed a gate, "
              f"{counts[FAILED] + counts[INTERNAL]} failed", file=sys.stderr)
    return max((EXIT[s] for s, n in counts.items() if n), default=0)


def _failure(e: Exception, debug: bool) -> tuple[str, str]:
    """A checkpoint's failure: its status and one-line error (a bug re-raised with --debug)."""
    code, message = verdict(e)
    if code >= 3 and debug and not isinstance(e, FactorizeError):
        raise e
    return (FAILED if code < 3 else INTERNAL), message


def _debug() -> bool:
    """Whether ``--debug`` was given (tracebacks wanted): set on the root command's context."""
    import click

    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and isinstance(ctx.obj, dict) and ctx.obj.get("debug"))


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
