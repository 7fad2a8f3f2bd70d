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
from factorize_cli.errors import UsageError
from factorize_cli.formats.base import Checkpoint


def carries_state(taps: Any, calls: Any) -> bool:
    """Whether a call changes the program's registered buffers (a .pt2 model's state; TorchScript state held
    in plain attributes is not seen): the first call is run and the buffers are put back as they were."""
    import torch

    root = getattr(taps, "root", None) or getattr(taps, "module", None)
    buffers = dict(root.named_buffers()) if root is not None else {}
    if not buffers or not len(calls):
        return False
    before = {name: b.detach().clone() for name, b in buffers.items()}
    taps.output(next(iter(calls)))
    changed = any(not torch.equal(b, before[name]) for name, b in buffers.items())
    with torch.no_grad():
        for name, b in buffers.items():
            b.copy_(before[name])
    return changed


@dataclass(frozen=True)
class GraphProgram:
    """A TorchScript archive or ``.pt2`` program, run on the calls ``factorize calibrate`` takes
    (:mod:`~factorize_cli.graphs.calls`; ``entry``: ``--method``/``--reset``)."""

    format: Any  # its GraphFormat
    source: Path

    def run(self, checkpoint: Checkpoint, config: Any, data: Path, *, sequential: bool, text: Any,
            progress: Any, entry: Any = None, group: Any = None) -> Ran:
        """Under torchrun (``group``) each rank runs the statistics on its share of whole sequences of calls
        (a sequence may carry state from call to call; with state that also carries from one sequence to the
        next, no --reset, the sequences cannot be dealt out and this is refused)."""
        from factorize_cli.distributed import SOLO
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
        group = group or SOLO
        if group.distributed and calls.entry.reset is None and (calls.stateful or carries_state(taps, calls)):
            raise UsageError(f"{data}: under torchrun the calls are dealt to the processes, so each must stand "
                             "alone (a list of calls is one sequence, whose state may carry from call to call): "
                             "give --reset METHOD to deal whole sequences, or run --data in one process")
        run = run_subject(subject, config, calls.dealt(group), swaps, sequential=sequential, progress=progress, group=group,
                          everything=calls)
        return Ran(run.plan, factors, run.results, {n: m.value for n, m in run.methods.items()}, run.notes)
