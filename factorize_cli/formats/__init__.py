"""Formats at the edges: bytes on disk <-> one :class:`Checkpoint` view.

Input formats are recognised by content, not by name. A state dict's output format follows the
output path (``.safetensors``, a ``torch.save`` file that keeps the input's container, or a
directory of shards: the input's shard format and names when it was sharded, else safetensors;
a Hugging Face model folder, :mod:`factorize_cli.formats.hfmodel`, gives a model folder);
a TorchScript archive or a ``.pt2`` program is written back in its own format. Each opened
checkpoint carries its format's ``handler`` (:class:`factorize_cli.formats.base.Format`).
"""

from __future__ import annotations

import itertools
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from pathlib import Path

from factorize_cli.errors import InputError, OutputError, UsageError, describe
from factorize_cli.formats.base import Checkpoint, TensorInfo

__all__ = ["Checkpoint", "TensorInfo", "OutputKind", "check_output", "open_checkpoint", "output_kind",
           "write_checkpoint"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".jit")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# The legacy (pre-zip) torch.save format opens with a pickled magic number (protocol 2, LONG1 of 10 bytes).
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class OutputKind(str, Enum):
    SAFETENSORS = "safetensors"
    SHARDED = "safetensors-sharded"
    TORCH_SHARDED = "torch-sharded"
    TORCH = "torch"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch-export"
    HF_MODEL = "hf-model"  # a Hugging Face model folder: its weights in their own layout, every other file copied


def sniff(path: Path) -> str:
    """Which reader a file needs: 'torch-zip', 'torch-legacy', 'safetensors', 'torchscript' or 'torch-export'."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: damaged zip archive (a member name marked UTF-8 is not UTF-8: "
                             f"{e.object!r:.60})") from e
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise InputError(f"{path}: damaged zip archive ({describe(e)})") from e
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("serialized_exported_program.json") or n.endswith("/archive_format") for n in names):
            return "torch-export"
        return "torch-zip"
    if head[8:9] == b"{" or path.suffix == ".safetensors":
        return "safetensors"  # its reader validates the header and says what is wrong
    if head.startswith(LEGACY_MAGIC):
        return "torch-legacy"
    if head[:1] == b"\x80":
        raise InputError(f"{path}: a plain pickle, not a torch.save checkpoint")
    raise InputError(f"{path}: not a checkpoint this tool reads "
                     "(expected a torch.save file, a .safetensors file, a TorchScript or .pt2 program, or a sharded "
                     "checkpoint folder)")


def open_checkpoint(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        from factorize_cli.formats.hfmodel import is_model_folder, open_model_folder
        if is_model_folder(path):
            return open_model_folder(path, unsafe_pickle=unsafe_pickle)
        from factorize_cli.formats.sharded import open_sharded
        return open_sharded(path, unsafe_pickle=unsafe_pickle)
    try:
        kind = sniff(path)
    except PermissionError as e:
        raise InputError(f"{path}: permission denied") from e
    if kind == "safetensors":
        from factorize_cli.formats.safetensors import open_safetensors_file
        return open_safetensors_file(path)
    if kind in ("torchscript", "torch-export"):
        from factorize_cli.graphs.format import BY_NAME
        return BY_NAME[kind].open(path)
    from factorize_cli.formats.torchfile import open_torch_file
    return open_torch_file(path, unsafe_pickle=unsafe_pickle)


def output_kind(path: Path) -> OutputKind:
    if path.suffix == ".safetensors":
        return OutputKind.SAFETENSORS
    if path.suffix == ".pt2":
        return OutputKind.TORCH_EXPORT
    if path.suffix in TORCH_SUFFIXES:
        return OutputKind.TORCH
    if path.is_dir() or path.suffix == "":
        return OutputKind.SHARDED
    raise UsageError(f"{path}: cannot tell the output format from the name; use .safetensors, "
                     f"{'/'.join(TORCH_SUFFIXES)}, or a directory for sharded safetensors")


def write_checkpoint(checkpoint: Checkpoint, layout: Sequence, tensors: Iterator, dest: Path,
                     *, metadata: dict[str, str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     before_commit: Callable[[Path], None] = lambda tmp: None,
                     ready: dict[str, Path] | None = None) -> list[str]:
    """Write ``tensors`` (in ``layout`` order) to ``dest`` atomically; return the files written.

    ``before_commit`` runs once everything is written but before it appears at ``dest``; an
    exception from it (a failed gate) leaves nothing behind. ``ready``: for a folder of shards, the
    shards already written by other processes (``tensors`` then holds only the other shards').
    """
    from factorize_cli.atomic import atomic_path

    kind = output_kind(dest)
    if kind is OutputKind.SHARDED and (checkpoint.index_name or "").endswith(".bin.index.json"):
        kind = OutputKind.TORCH_SHARDED
    check_output(checkpoint, kind)
    if kind is OutputKind.TORCH:
        import torch  # noqa: F401  (torch files need it; kept local for the --help path)

        from factorize_cli.formats.torchfile import build_container, save_torch
        state = {entry.key: tensor for entry, tensor in zip(layout, tensors, strict=True)}
        if checkpoint.passthrough:
            state.update(checkpoint.passthrough)
        with atomic_path(dest) as tmp:
            save_torch(build_container(checkpoint, state), tmp)
            before_commit(tmp)
        return [str(dest)]

    if kind is OutputKind.SAFETENSORS:
        from factorize_cli.formats.safetensors import write_safetensors
        with atomic_path(dest) as tmp:
            write_safetensors(tmp, layout, tensors, {**checkpoint.metadata, **metadata})
            before_commit(tmp)
        return [str(dest)]

    return _write_shards(checkpoint, layout, tensors, dest, metadata, max_shard_bytes, before_commit, ready)


def _write_shards(checkpoint: Checkpoint, layout: Sequence, tensors: Iterator, dest: Path, metadata: dict[str, str],
                  max_shard_bytes: int, before_commit: Callable[[Path], None],
                  ready: dict[str, Path] | None) -> list[str]:
    """A folder of shards in the input's shard format, its index, and our marker."""
    from factorize_cli import __version__
    from factorize_cli.atomic import atomic_path
    from factorize_cli.outputs import write_marker

    with atomic_path(dest, directory=True) as tmp:
        names = write_shard_set(checkpoint, layout, tensors, tmp, metadata, max_shard_bytes, ready)
        write_marker(tmp, names, f"factorize {__version__}")
        before_commit(tmp)
    return [str(dest / name) for name in names]


def write_shard_set(checkpoint: Checkpoint, layout: Sequence, tensors: Iterator, folder: Path,
                    metadata: dict[str, str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    ready: dict[str, Path] | None = None) -> list[str]:
    """Shards in the input's shard format (``torch.save`` shards for a ``.bin`` index) and their index,
    written into ``folder`` (already a temporary); the names written, index last. ``ready``: shards other
    processes already wrote (:func:`write_shard`), moved in; ``tensors`` holds only the others'."""
    from factorize_cli.formats.sharded import DEFAULT_INDEX, write_index

    index_name = checkpoint.index_name or DEFAULT_INDEX
    shards = assign_shards(checkpoint, layout, max_shard_bytes)
    weight_map = {}
    for name, entries in shards.items():
        if ready and name in ready:
            os.replace(ready[name], folder / name)
        else:
            write_shard(checkpoint, folder / name, entries, itertools.islice(tensors, len(entries)), metadata)
        weight_map.update({e.key: name for e in entries})
    write_index(folder / index_name, weight_map, sum(e.nbytes for e in layout), metadata)
    return [*shards, index_name]


def write_shard(checkpoint: Checkpoint, path: Path, entries: Sequence, tensors: Iterable,
                metadata: dict[str, str]) -> None:
    """One shard of a shard set, in the input's shard format."""
    from factorize_cli.formats.sharded import TORCH_INDEX

    if (checkpoint.index_name or "").endswith(TORCH_INDEX):
        from factorize_cli.formats.torchfile import save_torch
        save_torch({e.key: t for e, t in zip(entries, tensors, strict=True)}, path)
    else:
        from factorize_cli.formats.safetensors import write_safetensors
        write_safetensors(path, entries, tensors, {**checkpoint.metadata, **metadata})


def assign_shards(checkpoint: Checkpoint, layout: Sequence, max_shard_bytes: int) -> dict[str, list]:
    """Keep the input's shard of each tensor; otherwise fill shards greedily up to ``max_shard_bytes``."""
    if checkpoint.shard_of:
        shards: dict[str, list] = {}
        for entry in layout:
            shards.setdefault(checkpoint.shard_of[entry.source], []).append(entry)
        return dict(sorted(shards.items()))
    groups: list[list] = [[]]
    size = 0
    for entry in layout:
        if groups[-1] and size + entry.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def check_output(checkpoint: Checkpoint, kind: OutputKind) -> None:
    """Refuse, before any work, what the output format cannot hold."""
    if kind in (OutputKind.SAFETENSORS, OutputKind.SHARDED) and checkpoint.passthrough:
        key = next(iter(checkpoint.passthrough))
        raise UsageError(f"{checkpoint.path}: entry {key!r} is not a tensor and cannot be stored in "
                         "safetensors; write a .pt output instead")
    if kind in (OutputKind.TORCH, OutputKind.TORCH_SHARDED):
        from factorize_cli.formats.safetensors import is_raw

        raw = next((info for info in checkpoint.infos if is_raw(info.dtype)), None)
        if raw is not None:
            raise UsageError(f"{checkpoint.path}: tensor {raw.key} has dtype {raw.dtype.removeprefix('raw:')}, "
                             "which torch cannot hold; write a .safetensors output instead")
