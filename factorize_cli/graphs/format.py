"""TorchScript archives and ``.pt2`` programs behind the one format interface.

They carry code: candidates come from their module structure, the output is the same program with
each factorized layer call rewritten into two, and the program can be run (calibration, ``--verify``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factorize_cli.errors import UsageError
from factorize_cli.formats import OutputKind, output_kind

if TYPE_CHECKING:
    from factorize_cli.config import SelectionConfig
    from factorize_cli.execution import LayerWork
    from factorize_cli.formats.base import Checkpoint
    from factorize_cli.graphs.calls import Calls
    from factorize_cli.planning import Plan
    from factorize_cli.selection import Candidate


def _load_torchscript(path: Path) -> tuple[Any, dict]:
    from factorize_cli.graphs.torchscript import load_archive

    archive = load_archive(path)
    return archive, archive.module.state_dict()


def _load_exported(path: Path) -> tuple[Any, dict]:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.load(str(path))
        state = dict(program.state_dict)
        program.validate()
    return program, state


@dataclass(frozen=True)
class GraphFormat:
    name: str  # the checkpoint format it opens, e.g. "torchscript"
    what: str  # for messages: "TorchScript archive"
    loader: Callable[[Path], tuple[Any, dict]]  # the loaded program and its state dict
    module: str  # the graph pass: factorize_cli.graphs.<module>
    taps: str  # its taps in factorize_cli.graphs.calibrate
    output: OutputKind  # what it writes
    accepted: OutputKind  # the output path's kind that names it
    suffixes: str  # for the error message
    module_of: Callable[[Any], Any]  # the runnable module of a loaded program

    def _pass(self) -> Any:
        return import_module(f"factorize_cli.graphs.{self.module}")

    def open(self, path: Path) -> Checkpoint:
        """The loaded program is the container, its state dict the tensors; damage is one input error."""
        from factorize_cli.errors import FactorizeError, InputError
        from factorize_cli.formats.base import Checkpoint, TensorInfo, dtype_name
        from factorize_cli.formats.torchfile import MappingReader
        from factorize_cli.graphs.torchscript import torch_message

        try:
            container, state = self.loader(path)
        except FactorizeError:
            raise
        except Exception as e:  # torch's loaders and compiler raise many kinds on damaged archives
            raise InputError(f"{path}: not a loadable {self.what} ({torch_message(e)})") from e
        infos = [TensorInfo(key, tuple(t.shape), dtype_name(t.dtype)) for key, t in state.items()]
        return Checkpoint(path=str(path), format=self.name, infos=infos, reader=MappingReader(state),
                          container=container, handler=self)

    def candidates(self, checkpoint: Checkpoint, selection: SelectionConfig) -> tuple[list[Candidate], tuple[str, ...]]:
        return list(self._pass().candidates(checkpoint.container)), ()

    def output_kind(self, checkpoint: Checkpoint, output: Path) -> OutputKind:
        if output_kind(output) is not self.accepted:
            raise UsageError(f"{output}: a {self.name} input is written back in its own format; "
                             f"give a {self.suffixes} output path")
        return self.output

    def output_tensors(self, checkpoint: Checkpoint, plan: Plan) -> int:
        return len(checkpoint.infos)

    def notes(self, checkpoint: Checkpoint, kind: OutputKind) -> list[str]:
        return []

    def write(self, checkpoint: Checkpoint, plan: Plan, work: LayerWork, output: Path, *, metadata: dict[str, str],
              before_commit: Callable[[Path], None]) -> list[str]:
        return self._pass().write_rewritten(
            checkpoint.container, plan, lambda layer: work.factorize(layer, checkpoint.get(layer.candidate.weight.key)),
            work.results, work.progress, output, before_commit=before_commit)

    def shard_files(self, checkpoint: Checkpoint, plan: Plan, output: Path) -> dict[str, list]:
        return {}  # one archive or program: rank 0 writes it

    def verifier(self, checkpoint: Checkpoint, source: Path) -> Callable[..., dict[str, Any]]:
        from factorize_cli.graphs.verify import verify

        def run(written: Path, inputs: Any, tolerance: float) -> dict[str, Any]:
            inputs.calls.check(self.module_of(checkpoint.container), self.what, source)
            return verify(self.name, source, written, inputs, tolerance)

        return run

    def runnable(self, checkpoint: Checkpoint) -> Any:
        from factorize_cli.graphs.live import GraphProgram

        return GraphProgram(self, Path(checkpoint.path))

    def calibrate(self, checkpoint: Checkpoint, calls: Calls, device: str) -> dict:
        from factorize_cli.graphs import calibrate

        return calibrate.collect(self.tap(checkpoint.container, calls, device,
                                          f"{checkpoint.path}: running the model on its inputs"), calls)

    def tap(self, container: Any, calls: Calls, device: str, label: str = "running the program") -> Any:
        """The taps of a loaded program (instrumented: give a copy that is not written), on ``device``, for
        ``calls`` (checked against the program's methods first)."""
        from factorize_cli.graphs import calibrate

        calls.check(self.module_of(container), self.what, calls.source)
        layers = {c.name: c.weight.shape for c in self._pass().candidates(container) if c.unsafe is None}
        return getattr(calibrate, self.taps)(container, layers, calls, device, label)


TORCHSCRIPT = GraphFormat("torchscript", "TorchScript archive", _load_torchscript, "torchscript",
                          "TorchScriptTaps", OutputKind.TORCHSCRIPT, OutputKind.TORCH, ".pt or .jit",
                          lambda archive: archive.module)
TORCH_EXPORT = GraphFormat("torch-export", "torch.export program", _load_exported, "export", "ExportTaps",
                           OutputKind.TORCH_EXPORT, OutputKind.TORCH_EXPORT, ".pt2",
                           lambda program: program.module())
BY_NAME = {f.name: f for f in (TORCHSCRIPT, TORCH_EXPORT)}
