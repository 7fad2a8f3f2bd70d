"""Hugging Face model folders: a folder with a ``config.json`` is one model, read and written whole.

In: the weights transformers would load, in its order — ``model.safetensors``, its shard index,
``pytorch_model.bin``, its shard index — opened as one checkpoint (a hub-cache snapshot of symlinks
opens like any folder). Out, to a folder: the same weights layout (a single file under the same name,
shards with their index), every other file and subfolder copied byte for byte (links as real files),
and our marker listing all of it. Weight files we did not read (a ``pytorch_model.bin`` beside the
``model.safetensors`` we read, TensorFlow, Flax or ONNX exports) would be stale unfactorized copies
and are left out, with a note. The rank map goes in the safetensors metadata, the shard index, or,
for a single ``pytorch_model.bin`` (which has no metadata), the sidecar ``factorize-ranks.json``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factorize_cli.errors import InputError, UsageError
from factorize_cli.formats import OutputKind, write_checkpoint, write_shard_set
from factorize_cli.formats.base import Checkpoint
from factorize_cli.formats.sharded import INDEX_SUFFIXES
from factorize_cli.formats.statedict import StateDictFormat

if TYPE_CHECKING:
    from factorize_cli.execution import LayerWork
    from factorize_cli.planning import Plan

CONFIG_NAME = "config.json"
RANKS_SIDECAR = "factorize-ranks.json"  # the rank map of a single pytorch_model.bin output
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Weights of this model in another file or framework: stale once the weights we read are factorized.
STALE_TOP = ("model*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json",
             "tf_model*.h5", "*.h5.index.json", "flax_model*.msgpack", "*.msgpack.index.json")
STALE_ANYWHERE = ("*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.tflite")
NOT_COPIED = (".cache",)  # huggingface_hub's download metadata: it describes the original weight files


def is_model_folder(path: str | os.PathLike) -> bool:
    """A folder holding a ``config.json``: a Hugging Face model."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def weights_file(folder: Path) -> Path:
    """The weights transformers would read: the first of :data:`WEIGHTS` the folder holds."""
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: a model folder ({CONFIG_NAME}) without weights: none of {', '.join(WEIGHTS)}")


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder holds, by path relative to it: the weight files read, the ones left out
    as stale, and everything else (copied)."""

    root: Path
    weights: str  # the single weights file, or the shard index
    read: tuple[str, ...]  # the weights file, or the index and its shards
    stale: tuple[str, ...]
    others: tuple[str, ...]

    @property
    def sharded(self) -> bool:
        return self.weights.endswith(INDEX_SUFFIXES)

    def read_note(self) -> str | None:
        rivals = [name for name in WEIGHTS if name != self.weights and name in self.stale]
        if not rivals:
            return None
        return f"{self.weights} read (as transformers does); {', '.join(rivals)} beside it not read"


def _files(root: Path) -> list[str]:
    """Every file under ``root`` (links followed), relative, sorted; our own marker is not one of them."""
    from factorize_cli.outputs import MARKER

    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath).relative_to(root)
        if here == Path("."):
            dirnames[:] = [d for d in dirnames if d not in NOT_COPIED]
            filenames = [f for f in filenames if f not in (MARKER, RANKS_SIDECAR)]
        found += [(here / name).as_posix() for name in filenames]
    return sorted(found)


def describe_folder(root: Path, read: list[str], weights: str) -> ModelFolder:
    stale, others = [], []
    for rel in _files(root):
        if rel in read:
            continue
        name = rel.rsplit("/", 1)[-1]
        top = "/" not in rel and any(fnmatch.fnmatchcase(name, p) for p in STALE_TOP)
        (stale if top or any(fnmatch.fnmatchcase(name, p) for p in STALE_ANYWHERE) else others).append(rel)
    return ModelFolder(root, weights, tuple(read), tuple(stale), tuple(others))


def open_model_folder(folder: Path, *, unsafe_pickle: bool = False) -> Checkpoint:
    """The folder's weights as one checkpoint whose path is the folder and whose handler writes a folder."""
    from factorize_cli.formats import open_checkpoint
    from factorize_cli.formats.sharded import open_sharded

    weights = weights_file(folder)
    if weights.name.endswith(INDEX_SUFFIXES):
        checkpoint = open_sharded(folder, unsafe_pickle=unsafe_pickle, index_path=weights)
        read = [weights.name, *sorted(set(checkpoint.shard_of.values()))]
    else:
        checkpoint = open_checkpoint(weights, unsafe_pickle=unsafe_pickle)
        read = [weights.name]
    if not isinstance(checkpoint.handler, StateDictFormat):
        checkpoint.close()
        raise InputError(f"{weights}: a {checkpoint.format} program, not the state dict a model folder holds")
    checkpoint.path = str(folder)
    checkpoint.handler = ModelFolderFormat(describe_folder(folder, read, weights.name))
    return checkpoint


class ModelFolderFormat(StateDictFormat):
    """A state dict that lives in a model folder: a folder output is a model folder of the same shape;
    a file output (``.safetensors``, ``.bin``...) holds the weights alone, as for any state dict."""

    def __init__(self, folder: ModelFolder) -> None:
        self.folder = folder

    def candidates(self, checkpoint: Checkpoint, selection):
        found, notes = super().candidates(checkpoint, selection)
        read = self.folder.read_note()
        return found, (*notes, *([read] if read else []))

    def runnable(self, checkpoint: Checkpoint) -> Any:
        from factorize_cli.datarun import HfFolder

        return HfFolder(Path(checkpoint.path))

    def output_kind(self, checkpoint: Checkpoint, output: Path) -> OutputKind:
        try:
            kind = super().output_kind(checkpoint, output)
        except UsageError:  # no weights suffix (all-MiniLM-L6-v2.r0.8): a model folder is written as a folder
            if output.is_file():
                raise
            kind = OutputKind.SHARDED
        if kind not in (OutputKind.SHARDED, OutputKind.TORCH_SHARDED):
            return kind
        if not self.folder.sharded:
            super().output_kind(checkpoint, output / self.folder.weights)  # what the single file can hold
        return OutputKind.HF_MODEL

    def notes(self, checkpoint: Checkpoint, kind: OutputKind) -> list[str]:
        notes = super().notes(checkpoint, kind)
        if kind is OutputKind.HF_MODEL:
            notes.append(f"Hugging Face model folder: weights as {self.folder.weights}, "
                         f"{len(self.folder.others)} other file(s) copied as they are")
            if self.folder.stale:
                notes.append(f"not copied (weights this run did not read, stale once factorized): "
                             f"{', '.join(self.folder.stale)}")
        return notes

    def write(self, checkpoint: Checkpoint, plan: Plan, work: LayerWork, output: Path, *, metadata: dict[str, str],
              before_commit: Callable[[Path], None]) -> list[str]:
        if self.output_kind(checkpoint, output) is not OutputKind.HF_MODEL:
            return super().write(checkpoint, plan, work, output, metadata=metadata, before_commit=before_commit)
        from factorize_cli import __version__
        from factorize_cli.atomic import atomic_path
        from factorize_cli.outputs import write_marker
        from factorize_cli.rewrite import execute, output_layout, unwritten

        layout, ready = output_layout(checkpoint, plan), getattr(work, "ready_shards", None)
        entries, tensors = [p.entry for p in layout], execute(checkpoint, unwritten(checkpoint, layout, ready), work)
        with atomic_path(output, directory=True) as tmp:
            if self.folder.sharded:
                written = write_shard_set(checkpoint, entries, tensors, tmp, metadata, ready=ready)
            else:
                write_checkpoint(checkpoint, entries, tensors, tmp / self.folder.weights, metadata=metadata)
                written = [self.folder.weights]
                if not self.folder.weights.endswith(".safetensors"):  # a torch file has no metadata to hold it
                    (tmp / RANKS_SIDECAR).write_text(json.dumps({"metadata": metadata}, indent=2) + "\n")
                    written.append(RANKS_SIDECAR)
            for rel in self.folder.others:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.folder.root / rel, tmp / rel)  # a link's target, as a real file
            files = [*written, *self.folder.others]
            write_marker(tmp, files, f"factorize {__version__}")
            before_commit(tmp)
        return [str(output / rel) for rel in files]


    def shard_files(self, checkpoint: Checkpoint, plan: Plan, output: Path) -> dict[str, list]:
        if self.output_kind(checkpoint, output) is not OutputKind.HF_MODEL:
            return super().shard_files(checkpoint, plan, output)
        if not self.folder.sharded:
            return {}
        from factorize_cli.rewrite import output_layout, placed_shards

        return placed_shards(checkpoint, output_layout(checkpoint, plan))


def rank_map_source(folder: Path) -> tuple[Path, str]:
    """Where a folder output keeps its rank map: ``(file, "index"|"safetensors"|"sidecar")``."""
    from factorize_cli.formats.sharded import find_index, is_sharded

    if is_sharded(folder):
        return find_index(folder), "index"
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors", "safetensors"
    if (folder / RANKS_SIDECAR).is_file():
        return folder / RANKS_SIDECAR, "sidecar"
    raise InputError(f"{folder}: no rank map here (no shard index, model.safetensors or {RANKS_SIDECAR}); "
                     "pass the JSON report instead")
