"""Apply across processes (torchrun), and resumable: each rank factorizes its share of the layers into
the journal beside the output (:mod:`factorize_cli.journal`), then rank 0 writes the output from it.

Every rank opens the checkpoint and makes the same plan from its headers. The planned layers are dealt
to the ranks by predicted cost (``Geometry.cost``), costliest first, each to the least loaded rank, so
each rank reads only its own layers' weights. Each layer is factorized exactly as a one-process
run would (same engine, seed, precision and number of math threads per layer) and saved as written; rank
0 then runs the format's own writer with those factors (:class:`~factorize_cli.execution.GivenWork`): the
output's bytes do not depend on how many ranks computed them. With ``--resume`` the layers already in
the journal are not computed again, whoever computed them.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factorize_cli.distributed import SOLO, Group, balanced
from factorize_cli.execution import GivenWork, LayerWork, NonFiniteWeight
from factorize_cli.errors import GateError
from factorize_cli.journal import Journal
from factorize_cli.pipeline import ApplyRun

if TYPE_CHECKING:
    from factorize_cli.formats.base import Checkpoint
    from factorize_cli.planning import LayerPlan, Plan
    from factorize_cli.whitening import Whitener


def shares(layers: list[LayerPlan], world: int) -> list[list[LayerPlan]]:
    """Each rank's layers (balanced by cost), each share in the checkpoint's order."""
    owners = balanced([layer.geometry.cost for layer in layers], world)
    return [[layer for layer, owner in zip(layers, owners) if owner == rank] for rank in range(world)]


def factorize_into(checkpoint: Checkpoint, layers: list[LayerPlan], work: LayerWork, journal: Journal) -> set[str]:
    """Factorize ``layers`` (weights read ahead, in order) into ``journal``, as many at a time and on as
    many math threads each as a one-process apply uses; the layers found to hold NaN or Inf."""
    import torch

    from factorize_cli.formats.base import prefetch
    from factorize_cli.rewrite import split_cores

    workers, threads = split_cores(work)
    weights = prefetch(checkpoint, (layer.candidate.weight.key for layer in layers))
    pending: collections.deque = collections.deque()
    bad: set[str] = set()

    def finish() -> None:
        layer, future = pending.popleft()
        try:
            outcome, result = future.result()
        except NonFiniteWeight:
            journal.mark_non_finite(layer.name)
            bad.add(layer.name)
        else:
            journal.save(layer, outcome.factors, result)
        work.progress.advance(layer.name)

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="factorize-math") as pool:
            try:
                for layer in layers:
                    pending.append((layer, pool.submit(work.factorize, layer, next(weights))))
                    if len(pending) >= workers:
                        finish()
                while pending:
                    finish()
            finally:
                for _, future in pending:
                    future.cancel()
    finally:
        weights.close()
        torch.set_num_threads(saved)
    return bad


@dataclass
class SharedApply(ApplyRun):
    """An apply whose layers are computed into the journal first: by every rank of a torchrun launch, or
    by one process with ``--resume``; rank 0 writes the output and the report."""

    resume: bool = False
    execution: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.journal: Journal | None = None

    def prepare(self, checkpoint: Checkpoint, whitener: Whitener) -> tuple[Plan, LayerWork]:
        if self.journal is None:
            with self.group.step():  # rank 0 starts or continues the journal; a refusal stops every rank
                if self.group.lead:
                    Journal.open(self.output, self.source, self.config, resume=self.resume, create=True)
            self.journal = Journal.open(self.output, self.source, self.config, resume=True, create=False)
            self.non_finite |= self.journal.non_finite()  # found by the interrupted run
        return super().prepare(checkpoint, whitener)

    def compute(self, checkpoint: Checkpoint, plan: Plan, work: LayerWork) -> GivenWork | None:
        group, journal = self.group, self.journal
        assert journal is not None
        mine = shares(list(plan.to_factorize), group.world)[group.rank]
        journal.threads = _threads_per_layer(work)
        with group.step():
            todo = [layer for layer in mine if not journal.done(layer)]
            if group.lead:
                self.progress.start(f"factorizing (rank 0 of {group.world})" if group.distributed
                                    else "factorizing", len(todo))
            try:
                bad = factorize_into(checkpoint, todo, work, journal)
            finally:
                self.progress.stop()
        counts = group.gather((len(mine), len(mine) - len(todo), sorted(bad)))
        found = {name for *_, names in counts for name in names}
        if found - self.non_finite:
            raise NonFiniteWeight(*sorted(found))
        shards = checkpoint.handler.shard_files(checkpoint, plan, self.output) if group.distributed else {}
        ready = self._write_shards(checkpoint, plan, shards) if shards else None
        if not group.lead:
            return None
        self.execution = {"processes": group.world, "backend": group.backend or "none",
                          "threads_per_layer": _threads_per_layer(work),
                          "layers_per_process": [n for n, _, _ in counts],
                          "resumed_layers": sum(r for _, r, _ in counts), "journal": str(journal.path)}
        if ready:
            self.execution["shards_per_process"] = [sum(1 for o in self._shard_owners if o == r)
                                                    for r in range(group.world)]
        results = {layer.name: journal.result(layer) for layer in plan.to_factorize}
        return GivenWork(journal.load, self.progress, results=results, ready_shards=ready)

    def _write_shards(self, checkpoint: Checkpoint, plan: Plan, shards: dict[str, list]) -> dict[str, Path]:
        """Each rank writes its share of a folder output's shards (balanced by bytes) from the journal and
        the input, into the journal's folder; rank 0's writer moves them into the output."""
        from factorize_cli.atomic import _fsync_file
        from factorize_cli.formats import write_shard
        from factorize_cli.pipeline import output_metadata
        from factorize_cli.rewrite import execute

        group, journal = self.group, self.journal
        assert journal is not None
        names = list(shards)
        self._shard_owners = balanced([sum(p.entry.nbytes for p in shards[n]) for n in names], group.world)
        folder, metadata = journal.shards(), output_metadata(plan)
        with group.step():
            for name, owner in zip(names, self._shard_owners):
                if owner != group.rank:
                    continue
                placed, tmp = shards[name], folder / f".{name}.tmp-{os.getpid()}"
                write_shard(checkpoint, tmp, [p.entry for p in placed],
                            execute(checkpoint, placed, GivenWork(journal.load)), metadata)
                _fsync_file(tmp)
                os.replace(tmp, folder / name)
        return {name: folder / name for name in names}

    def _run(self, checkpoint: Checkpoint, whitener: Whitener) -> dict[str, Any] | None:
        try:
            report = super()._run(checkpoint, whitener)
        except GateError:  # the run ended (the gates refused it): nothing to resume
            if self.group.lead and self.journal is not None:
                self.journal.remove()
            raise
        if report is not None and self.journal is not None:
            self.journal.remove()  # the output is in place
        return report

    def decorate(self, report: dict[str, Any]) -> dict[str, Any]:
        if self.execution:
            report["execution"] = self.execution
        return report


def _threads_per_layer(work: LayerWork) -> int:
    from factorize_cli.rewrite import split_cores

    return split_cores(work)[1]
