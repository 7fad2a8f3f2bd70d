"""``factorize apply MODEL OUT --data DATA``: calibrate and factorize a runnable model in one command.

What can run is the format's to say (``handler.runnable(checkpoint)``): a Hugging Face folder
(:class:`HfFolder`, below), a TorchScript archive or a ``.pt2`` program
(:mod:`factorize_cli.graphs.live`); a runnable's :class:`Ran` is the plan and the factors, which
:class:`GivenWork` hands to the format's own writer.

The Hugging Face folder is loaded as its transformers model (:func:`factorize_cli.hf.load_pretrained`),
DATA is tokenized with the folder's tokenizer (:mod:`factorize_cli.textdata`), and
:func:`factorize_cli.api.run_live` plans and factorizes the live model: whitened spectra, budgets
weighed by each layer's measured effect on the model output, and (unless ``--no-sequential``) layer by
layer in forward order, each layer's factors refit to the original outputs from the inputs the
already factorized layers give it. The plan and the factors it produced are then carried over to the
checkpoint's own names and written in the checkpoint's own shape by the same writer as every other
apply (atomic, through the one output rule), with the same report plus each layer's ``method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from factorize_cli.errors import UsageError
from factorize_cli.execution import Given, GivenFactors as Factors, GivenWork
from factorize_cli.formats.base import Checkpoint
from factorize_cli.pipeline import ApplyRun
from factorize_cli.planning import Action, LayerPlan, Plan
from factorize_cli.report import LayerResult
from factorize_cli.selection import SkipReason
from factorize_cli.textdata import TextDataConfig


@dataclass(frozen=True)
class Ran:
    """What a runnable's live run gives the writer: the plan on the checkpoint's candidates, each
    planned layer's factors and result, each layer's method, and the run's notes."""

    plan: Plan
    factors: dict[str, Factors]
    results: dict[str, LayerResult]
    methods: dict[str, str]
    notes: list[str]


@dataclass
class ApplyWithData(ApplyRun):
    """An apply whose plan and factors come from running the model on DATA."""

    data: Path = Path()
    text: TextDataConfig = field(default_factory=TextDataConfig)
    sequential: bool = True
    methods: dict[str, Any] = field(default_factory=dict)
    entry: Any = None  # a program's --method/--reset (factorize_cli.graphs.calls.Entry)

    def prepare(self, checkpoint: Checkpoint, whitener: Any) -> tuple[Plan, Any]:
        runnable = checkpoint.handler.runnable(checkpoint)
        ran = runnable.run(checkpoint, self.config, self.data, sequential=self.sequential, text=self.text,
                           progress=self.progress, entry=self.entry, group=self.group)
        self.live_notes, self.methods = ran.notes, ran.methods
        return ran.plan, GivenWork(lambda layer: (Given(ran.factors[layer.name]), ran.results[layer.name]),
                                   self.progress)

    def decorate(self, report: dict[str, Any]) -> dict[str, Any]:
        report["notes"] = [*getattr(self, "live_notes", []), *report["notes"]]
        for entry in report["layers"]:
            entry["method"] = self.methods.get(entry["name"])
        return report


@dataclass(frozen=True)
class HfFolder:
    """A Hugging Face model folder, run as its transformers model on text."""

    source: Path

    def run(self, checkpoint: Checkpoint, config: Any, data: Path, *, sequential: bool, text: TextDataConfig,
            progress: Any, entry: Any = None, group: Any = None) -> Ran:
        """Under torchrun (``group``) every rank loads the model and all the text, and runs the statistics
        on its share of the batches (:func:`~factorize_cli.api.run_subject`)."""
        from factorize_cli.api import run_live
        from factorize_cli.distributed import SOLO
        from factorize_cli.hf import load_pretrained
        from factorize_cli.runs import Swaps
        from factorize_cli.textdata import my_batches, text_batches

        if entry is not None and not entry.is_default:
            raise UsageError("--method and --reset are for TorchScript and .pt2 programs, not model folders")
        model = load_pretrained(self.source, device=config.device)
        batches = text_batches(self.source, data, text, device=config.device)
        names = _checkpoint_names(model, checkpoint, config)
        group = group or SOLO
        mine = my_batches(batches, group)  # a rank may get none: the sums still add up, probes use all
        run = run_live(model, config, mine, Swaps(model), sequential=sequential, progress=progress, group=group,
                       everything=batches)
        plan = _carried(run.plan, checkpoint, config, names)
        factors = {}
        for name, file_name in names.items():
            if name in run.results:
                pair = model.get_submodule(name)
                factors[file_name] = Factors(pair.module0.weight.detach(), pair.module1.weight.detach())
        return Ran(plan, factors, {names[n]: r for n, r in run.results.items() if n in names},
                   {names[n]: m.value for n, m in run.methods.items() if n in names}, run.notes)


def _checkpoint_names(model: Any, checkpoint: Checkpoint, config: Any) -> dict[str, str]:
    """Live module name -> the checkpoint's layer name (the base model's prefix added or dropped)."""
    candidates, _ = checkpoint.handler.candidates(checkpoint, config.selection)
    known = {c.name for c in candidates}
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, _ in model.named_modules():
        for option in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                       f"{prefix}.{name}" if prefix else None):
            if option in known:
                out[name] = option
                break
    return out


def _carried(live: Plan, checkpoint: Checkpoint, config: Any, names: dict[str, str]) -> Plan:
    """The live plan on the checkpoint's candidates: each layer's decision, rank, spectrum and sensitivity
    as the live run planned them; a candidate the model has no module for is skipped and says so."""
    candidates, notes = checkpoint.handler.candidates(checkpoint, config.selection)
    decided = {names[layer.name]: layer for layer in live.layers if layer.name in names}
    layers = []
    for candidate in candidates:
        layer = decided.get(candidate.name)
        if layer is None:
            layers.append(LayerPlan(candidate, Action.SKIP, None, SkipReason.MODULE_TYPE,
                                    "no module of the loaded model holds this weight"))
        else:
            layers.append(replace(layer, candidate=candidate))
    return Plan(source=str(checkpoint.path), format=checkpoint.format, config=config, layers=tuple(layers),
                notes=(*notes, *live.notes))

