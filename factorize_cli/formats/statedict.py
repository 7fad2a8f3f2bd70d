"""State dicts, whatever file holds them (``torch.save``, safetensors, sharded folders, memory).

Candidates come from keys and shapes (and a ``config.json`` beside the weights); the output is the
same tensors with each factorized weight replaced by its pair (:mod:`factorize_cli.rewrite`),
written in the format the output path names.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factorize_cli.errors import UsageError
from factorize_cli.formats import OutputKind, check_output, output_kind, write_checkpoint
from factorize_cli.formats.base import Checkpoint

if TYPE_CHECKING:
    from factorize_cli.config import SelectionConfig
    from factorize_cli.execution import LayerWork
    from factorize_cli.planning import Plan
    from factorize_cli.selection import Candidate


class StateDictFormat:
    """Tensors by key: the format of every checkpoint that carries no code."""

    def candidates(self, checkpoint: Checkpoint, selection: SelectionConfig) -> tuple[list[Candidate], tuple[str, ...]]:
        from factorize_cli.orientation import read_structure
        from factorize_cli.selection import candidates_from_keys

        structure = read_structure(checkpoint.path) if checkpoint.format != "memory" else None
        found = candidates_from_keys(checkpoint, selection, structure)
        return list(found.candidates), found.notes

    def output_kind(self, checkpoint: Checkpoint, output: Path) -> OutputKind:
        kind = output_kind(output)
        if kind is OutputKind.TORCH_EXPORT:
            raise UsageError(f"{output}: a .pt2 output needs a .pt2 input; this is a {checkpoint.format} state dict")
        if kind is OutputKind.SHARDED and checkpoint.format == "torch-sharded":
            kind = OutputKind.TORCH_SHARDED  # a folder output keeps the input's shard format
        check_output(checkpoint, kind)
        return kind

    def output_tensors(self, checkpoint: Checkpoint, plan: Plan) -> int:
        """How many tensors the output holds; refuses a plan whose keys would collide."""
        from factorize_cli.rewrite import output_layout

        return len(output_layout(checkpoint, plan))

    def notes(self, checkpoint: Checkpoint, kind: OutputKind) -> list[str]:
        if not checkpoint.container_path:
            return []
        where = ".".join(checkpoint.container_path)
        return [f"state dict found under {where!r}; other entries kept" if kind is OutputKind.TORCH else
                f"state dict found under {where!r}; the other container entries are not written to safetensors"]

    def write(self, checkpoint: Checkpoint, plan: Plan, work: LayerWork, output: Path, *, metadata: dict[str, str],
              before_commit: Callable[[Path], None]) -> list[str]:
        from factorize_cli.rewrite import execute, output_layout, unwritten

        layout, ready = output_layout(checkpoint, plan), getattr(work, "ready_shards", None)
        return write_checkpoint(checkpoint, [p.entry for p in layout],
                                execute(checkpoint, unwritten(checkpoint, layout, ready), work), output,
                                metadata=metadata, before_commit=before_commit, ready=ready)

    def shard_files(self, checkpoint: Checkpoint, plan: Plan, output: Path) -> dict[str, list]:
        """The output's shards, each with what it holds (rewrite.Placed), when the output is a folder of
        shards (which the ranks of a torchrun launch write side by side); {} for any other output."""
        from factorize_cli.rewrite import output_layout, placed_shards

        if self.output_kind(checkpoint, output) not in (OutputKind.SHARDED, OutputKind.TORCH_SHARDED):
            return {}
        return placed_shards(checkpoint, output_layout(checkpoint, plan))

    def state_dict(self, checkpoint: Checkpoint, plan: Plan, work: LayerWork) -> collections.OrderedDict:
        """The factorized state dict in memory (the Python API)."""
        from factorize_cli.rewrite import execute, output_layout

        layout = output_layout(checkpoint, plan)
        out = collections.OrderedDict(
            (p.entry.key, t) for p, t in zip(layout, execute(checkpoint, layout, work), strict=True))
        out.update(checkpoint.passthrough or {})
        return out

    def verifier(self, checkpoint: Checkpoint, source: Path) -> Callable[..., dict[str, Any]]:
        raise UsageError("--verify runs models: it needs a TorchScript or .pt2 input")

    def runnable(self, checkpoint: Checkpoint) -> Any:
        raise UsageError(f"{checkpoint.path}: --data runs the model, which needs a Hugging Face model folder "
                         "(config.json beside the weights), a TorchScript archive or a .pt2 program; for other "
                         "checkpoints run `factorize calibrate` and pass --calibration")

    def calibrate(self, checkpoint: Checkpoint, batches: list, device: str) -> dict:
        raise UsageError(f"{checkpoint.path}: calibrate runs a model (TorchScript or .pt2); for a state dict, "
                         "collect statistics with factorize_cli.collect_activation_stats on the live model")


STATE_DICT = StateDictFormat()
