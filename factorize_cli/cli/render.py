"""Everything a person sees, in one place, on stderr: the layer table, totals, progress."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from factorize_cli.html import sparkline


def console() -> Console:
    # Logs (not a terminal) get a wide, plain table instead of one folded to 80 columns.
    tty = sys.stderr.isatty()
    return Console(stderr=True, highlight=False, no_color="NO_COLOR" in os.environ or not tty,
                   width=None if tty else 200)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def layer_table(report: dict[str, Any]) -> Table:
    table = Table(title=escape(f"{report['command']}: {report['input']['path']}"), title_justify="left",
                  pad_edge=False, box=box.SIMPLE_HEAD)
    spectra = any(e["spectrum_sample"] for e in report["layers"])
    for column, justify in (("layer", "left"), ("kind", "left"), ("shape", "left"), ("rank/BE", "right"),
                            ("params", "right"), ("MACs", "right"), ("error", "right"),
                            ("energy", "right"), ("spectrum", "left"), ("status", "left")):
        if column != "spectrum" or spectra:
            table.add_column(column, justify=justify, overflow="fold")
    for e in report["layers"]:
        done = e["action"] == "factorize"
        rank = f"{e['rank']}/{e['break_even_rank']}" if e["rank"] else f"-/{e['break_even_rank']}"
        rank += "*" if e["pinned"] else ""
        params = f"{_count(e['params_before'])}→{_count(e['params_after'])}" if done else _count(e["params_before"])
        macs = f"{_count(e['macs_before'])}→{_count(e['macs_after'])}" if done else _count(e["macs_before"])
        status = "[green]factorize[/]" if done else f"[yellow]skip[/] {e['reason']} [dim]({escape(e['detail'])})[/]"
        kind = e["kind"] + (" (in x out)" if e.get("orientation") == "in-out" else "")
        cells = [escape(e["name"] or "(root)"), kind, "x".join(map(str, e["shape"])), rank, params, macs,
                 _pct(_error(e)) if done else "", _pct(e["energy_kept"]) if done else ""]
        if spectra:
            cells.append(sparkline(e["spectrum_sample"]))
        table.add_row(*cells, status)
    return table


def summary(report: dict[str, Any]) -> str:
    t = report["totals"]
    before, after = t["checkpoint_params_before"], t["checkpoint_params_after"]
    line = (f"{t['factorized']}/{t['candidates']} layers factorized; params {_count(before)} → {_count(after)} "
            f"({_pct(t['param_reduction'])} fewer); candidate MACs {_count(t['candidate_macs_before'])} → "
            f"{_count(t['candidate_macs_after'])}")
    if t["achieved_error"] is not None and t["factorized"]:
        line += f"; weighted error {_pct(t['achieved_error'])}"
    elif t["predicted_error"] is not None and t["factorized"]:
        line += f"; predicted weighted error {_pct(t['predicted_error'])}"
    return line


def _error(entry: dict[str, Any]) -> float | None:
    return entry["achieved_error"] if entry["achieved_error"] is not None else entry["predicted_error"]


def show(report: dict[str, Any], *, quiet: bool) -> None:
    if quiet:
        return
    out = console()
    with out.capture() as captured:
        out.print(layer_table(report))
        out.print(summary(report))
        for note in report["notes"]:
            out.print(f"note: {note}")
        gates = report["gates"]
        if gates["checked"]:
            out.print(f"gates ({', '.join(gates['checked'])}): " + ("passed" if gates["passed"] else
                      f"[red]{len(gates['violations'])} violation(s)[/]"))
        if report.get("output") and report["output"]["written"]:
            out.print(f"wrote {report['output']['path']} and {report['output']['report']}")
    text = captured.get()
    if not sys.stderr.isatty():  # logs: no padding to the console width
        text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    sys.stderr.write(text)


class RichProgress:
    """A rich progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled and sys.stderr.isatty()
        self._bar: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int) -> None:
        from factorize_cli import distributed

        if not self._enabled or total == 0 or distributed.follower():  # under torchrun, rank 0's bars only
            return
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("{task.fields[layer]}"),
                             console=console(), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, layer="")

    def advance(self, label: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, layer=label)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
