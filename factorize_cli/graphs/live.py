"""``factorize apply PROGRAM OUT --data INPUTS`` for TorchScript archives and ``.pt2`` programs.

The live run of :mod:`factorize_cli.api` (:func:`~factorize_cli.api.run_subject`) on a program: the
layers are the format's candidates, their inputs reach the run through the format's taps
(:mod:`factorize_cli.graphs.calibrate`), and since a program's layers cannot be swapped for pairs, a
factorized layer's weight is replaced in place by its product ``second @ first``
(:class:`~factorize_cli.runs.WeightSwaps`): the factorized graph's function up to float rounding.
So the plan has whitened spectra and, under a budget, measured output sensitivities; sequential
factors come from the original program's inputs ``X`` and the partly factorized one's ``X'``. All of it
runs on a second copy of the program, loaded for the run and never written; the factors then go to
the format's own writer, which rewrites the checkpoint's program.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factorize_cli.datarun import Factors, Ran
from factorize_cli.formats.base import Checkpoint


@dataclass(frozen=True)
class GraphProgram:
    """A TorchScript archive or ``.pt2`` program, run on the calls ``factorize calibrate`` takes
    (:mod:`~factorize_cli.graphs.calls`; ``entry``: ``--method``/``--reset``)."""

    format: Any  # its GraphFormat
    source: Path

    def run(self, checkpoint: Checkpoint, config: Any, data: Path, *, sequential: bool, text: Any,
            progress: Any, entry: Any = None) -> Ran:
        from factorize_cli.api import Subject, run_subject
        from factorize_cli.graphs.calls import Entry, load_calls
        from factorize_cli.runs import WeightSwaps
        from factorize_cli.sensitivity import approximation

        calls = load_calls(data, entry or Entry(), config.device)
        container, _ = self.format.loader(self.source)  # the copy the run instruments and changes
        taps = self.format.tap(container, calls, config.device, f"{self.source}: running the program on {data}")
        swaps = WeightSwaps(taps.weights)
        factors: dict[str, Factors] = {}

        def install(layer: Any, first: Any, second: Any) -> None:
            factors[layer.name] = Factors(first, second)
            swaps.put(layer.name, approximation(taps.weights[layer.name], layer.geometry, first, second))

        candidates, notes = checkpoint.handler.candidates(checkpoint, config.selection)
        subject = Subject(tuple(candidates), taps.weights, taps, install, checkpoint.path, checkpoint.format, notes)
        run = run_subject(subject, config, calls, swaps, sequential=sequential, progress=progress)
        return Ran(run.plan, factors, run.results, {n: m.value for n, m in run.methods.items()}, run.notes)
