"""Writing a rewritten graph: the steps every graph format takes, around the few that differ.

Each planned layer is factorized, its result recorded and its factor pair put into the graph; the
graph is then saved to a temporary path, loaded back (a graph that saves can still fail to load), and
handed to ``before_commit`` before it appears at the output. A format supplies :class:`GraphSteps`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from factorize_cli.errors import InputError, describe


@dataclass(frozen=True)
class GraphSteps:
    """What one graph format does to put factors into its graph, save it, and load it back."""

    noun: str  # how messages name the output: "archive", "program"
    rewrite: Callable[[str, torch.Tensor, torch.Tensor], None]  # (layer, first, second) into the graph
    save: Callable[[Path], None]
    load: Callable[[Path], None]
    message: Callable[[BaseException], str] = describe  # torch's exception in one line


def write_graph(steps: GraphSteps, plan, factorize, results: dict, progress, output, *,
                    before_commit: Callable[[Path], None]) -> list[str]:
    """Factorize and rewrite every planned layer, save atomically, and check the output loads before
    committing it; nothing appears at ``output`` unless every step succeeded."""
    from factorize_cli.atomic import atomic_path

    for layer in plan.to_factorize:
        outcome, results[layer.name] = factorize(layer)
        try:
            steps.rewrite(layer.name, outcome.factors.first, outcome.factors.second)
        except RuntimeError as e:
            raise InputError(f"{layer.name}: the graph could not be rewritten ({steps.message(e)})") from e
        progress.advance(layer.name)
    with atomic_path(output) as tmp:
        for step, verb in ((steps.save, "save"), (steps.load, "load")):
            try:
                step(tmp)
            except Exception as e:  # torch raises many kinds; a source range torch cannot print among them
                raise InputError(f"{output}: the rewritten {steps.noun} does not {verb} ({steps.message(e)}); "
                                 "nothing was written") from e
        before_commit(tmp)
    return [str(output)]
