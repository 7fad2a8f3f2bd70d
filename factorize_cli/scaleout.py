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

import os
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factorize_cli.distributed import balanced
from factorize_cli.execution import GivenWork, LayerWork, NonFiniteWeight, each_layer, split_cores
from factorize_cli.errors import GateError
from factorize_cli.journal import Journal, journal_path
from factorize_cli.pipeline import ApplyRun

if TYPE_CHECKING:
    from factorize_cli.formats.base import Checkpoint
    from factorize_cli.planning import LayerPlan, Plan
    from factorize_cli.whitening import Whitener


def factorize_into(checkpoint: Checkpoint, layers: list[LayerPlan], work: LayerWork, journal: Journal) -> set[str]:
    """Factorize ``layers`` into ``journal`` as a one-process apply would (:func:`each_layer`); the layers
    found to hold NaN or Inf."""
    bad: set[str] = set()
    with closing(each_layer(checkpoint, layers, work.factorize, work)) as done:
        for layer, future in done:
            try:
                outcome, result = future.result()
            except NonFiniteWeight:
                journal.mark_non_finite(layer.name)
                bad.add(layer.name)
            else:
                journal.save(layer, outcome.factors, result)
            work.progress.advance(layer.name)
    return bad


@dataclass
class SharedApply(ApplyRun):
    """An apply whose layers are computed into the journal first: by every rank of a torchrun launch, or
    by one process with ``--resume``; rank 0 writes the output and the report."""

    resume: bool = False
    execution: dict[str, Any] = field(default_factory=dict)
    journal: Journal | None = field(default=None, init=False)

    def prepare(self, checkpoint: Checkpoint, whitener: Whitener) -> tuple[Plan, LayerWork]:
        if self.journal is None:
            with self.group.step():  # rank 0 starts or continues the journal; a refusal stops every rank
                if self.group.lead:
                    Journal.open(self.output, self.source, self.config, resume=self.resume)
            self.journal = Journal(journal_path(self.output))
            self.non_finite |= self.journal.non_finite()  # found by the interrupted run
        return super().prepare(checkpoint, whitener)

    def compute(self, checkpoint: Checkpoint, plan: Plan, work: LayerWork) -> GivenWork | None:
        group, journal = self.group, self.journal
        assert journal is not None
        layers = list(plan.to_factorize)
        mine = [layers[i] for i in group.share([layer.geometry.cost for layer in layers])]
        journal.threads = split_cores(work)[1]
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
        ready, shard_counts = self._write_shards(checkpoint, plan, shards) if shards else (None, None)
        if not group.lead:
            return None
        self.execution = {"processes": group.world, "backend": group.backend or "none",
                          "threads_per_layer": journal.threads,
                          "layers_per_process": [n for n, _, _ in counts],
                          "resumed_layers": sum(r for _, r, _ in counts), "journal": str(journal.path)}
        if ready:  # the writer moves every shard in and reads no layer: the results come from here
            self.execution["shards_per_process"] = shard_counts
            return GivenWork(journal.load, self.progress, ready_shards=ready,
                             results={layer.name: journal.result(layer) for layer in layers})
        return GivenWork(journal.load, self.progress)

    def _write_shards(self, checkpoint: Checkpoint, plan: Plan, shards: dict[str, list]
                      ) -> tuple[dict[str, Path], list[int]]:
        """Each rank writes its share of a folder output's shards (balanced by bytes) from the journal and
        the input, into the journal's folder; rank 0's writer moves them into the output. The shards'
        paths, and how many each rank wrote."""
        from factorize_cli.atomic import _fsync_file
        from factorize_cli.formats import write_shard
        from factorize_cli.pipeline import output_metadata
        from factorize_cli.rewrite import execute

        group, journal = self.group, self.journal
        assert journal is not None
        names = list(shards)
        owners = balanced([sum(p.entry.nbytes for p in shards[n]) for n in names], group.world)
        folder, metadata = journal.shards(), output_metadata(plan)
        with group.step():
            for name, owner in zip(names, owners):
                if owner != group.rank:
                    continue
                placed, tmp = shards[name], folder / f".{name}.tmp-{os.getpid()}"
                write_shard(checkpoint, tmp, [p.entry for p in placed],
                            execute(checkpoint, placed, GivenWork(journal.load)), metadata)
                _fsync_file(tmp)
                os.replace(tmp, folder / name)
        return {name: folder / name for name in names}, [owners.count(rank) for rank in range(group.world)]

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

