"""Sharded checkpoints: a folder of shards and the index that maps every tensor to its shard.

Both Hugging Face layouts are read as one checkpoint: ``model.safetensors.index.json`` with
safetensors shards, and ``pytorch_model.bin.index.json`` with ``torch.save`` shards. Shard names
are checked as names (no ``..``, not absolute); where a shard resolves to does not matter, so a
hub-cache snapshot, whose shards are symbolic links into ``../../blobs/``, opens like any folder.
Every shard is validated against the index before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from factorize_cli.errors import InputError, describe
from factorize_cli.formats.base import Checkpoint, TensorInfo

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = ".safetensors.index.json"
TORCH_INDEX = ".bin.index.json"
INDEX_SUFFIXES = (SAFETENSORS_INDEX, TORCH_INDEX)
DEFAULT_INDEX = "model" + SAFETENSORS_INDEX


def is_sharded(directory: Path) -> bool:
    try:
        return any(p.name.endswith(INDEX_SUFFIXES) for p in directory.iterdir())
    except OSError:
        return False


def find_index(directory: Path) -> Path:
    indexes = sorted(p for p in directory.iterdir() if p.name.endswith(INDEX_SUFFIXES))
    if not indexes:
        raise InputError(f"{directory}: a directory input must hold a sharded checkpoint, but no "
                         f"*{SAFETENSORS_INDEX} or *{TORCH_INDEX} was found")
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise InputError(f"{directory}: several shard indexes ({names}); give one shard set per directory")
    return indexes[0]


def _shard_path(directory: Path, index_path: Path, name: object) -> Path:
    """The shard's path by name; a name that is absolute or climbs out of the folder is refused."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InputError(f"{index_path}: shard name {name!r} is not a plain file name (it would lie outside "
                         f"{directory}); refusing it")
    shard = directory / name
    if not shard.is_file():
        raise InputError(f"{index_path}: shard {name} is missing")
    return shard


class _ShardReader:
    def __init__(self, files: dict) -> None:
        self.files = files
        self._where = {info.key: name for name, f in files.items() for info in f.infos}

    def get(self, key: str) -> torch.Tensor:
        return self.files[self._where[key]].get(key)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def open_sharded(directory: Path, *, unsafe_pickle: bool = False, index_path: Path | None = None) -> Checkpoint:
    index_path = index_path or find_index(directory)
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index_path}: not a valid shard index ({describe(e)})") from e
    torch_shards = index_path.name.endswith(TORCH_INDEX)
    files = {name: _shard_path(directory, index_path, name) for name in sorted(set(map(str, weight_map.values())))}
    opened: dict = {}
    try:
        for name, shard in files.items():
            opened[name] = _open_shard(shard, torch_shards, unsafe_pickle)
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    reader = _ShardReader(opened)
    try:
        infos, shard_of = _validate(index_path, weight_map, opened)
    except BaseException:
        reader.close()
        raise
    first = next(iter(opened.values()), None)
    return Checkpoint(path=str(directory), format="torch-sharded" if torch_shards else "safetensors-sharded",
                      infos=infos, reader=reader, metadata=getattr(first, "metadata", {}) or {},
                      shard_of=shard_of, index_name=index_path.name,
                      tied=_tied(opened) if torch_shards else {})


def _open_shard(path: Path, torch_shards: bool, unsafe_pickle: bool):
    if torch_shards:
        return TorchShard(path, unsafe_pickle=unsafe_pickle)
    from factorize_cli.formats.safetensors import SafetensorsFile
    return SafetensorsFile(path)


def _validate(index_path: Path, weight_map: dict, opened: dict) -> tuple[list[TensorInfo], dict[str, str]]:
    infos: list[TensorInfo] = []
    shard_of: dict[str, str] = {}
    for name, f in opened.items():
        for info in f.infos:
            if weight_map.get(info.key) != name:
                raise InputError(f"{index_path}: tensor {info.key} is in shard {name} "
                                 f"but the index says {weight_map.get(info.key)!r}")
            infos.append(info)
            shard_of[info.key] = name
    missing = sorted(set(weight_map) - set(shard_of))
    if missing:
        raise InputError(f"{index_path}: {len(missing)} indexed tensors are in no shard, e.g. {missing[0]}")
    return infos, shard_of


def _tied(opened: dict) -> dict[str, str]:
    from factorize_cli.formats.base import shared_storage

    tied: dict[str, str] = {}
    for f in opened.values():
        tied.update(shared_storage(f.tensors))
    return tied


class TorchShard:
    """One ``torch.save`` shard of a flat state dict (memory-mapped when it is a zip file)."""

    def __init__(self, path: Path, *, unsafe_pickle: bool) -> None:
        from factorize_cli.formats.torchfile import load_torch_object
        from factorize_cli.formats.base import dtype_name
        import torch

        obj = load_torch_object(path, unsafe_pickle=unsafe_pickle)
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
            raise InputError(f"{path}: a shard must hold a flat state dict of tensors")
        self.path = path
        self.tensors = obj
        self.infos = [TensorInfo(k, tuple(t.shape), dtype_name(t.dtype)) for k, t in obj.items()]
        self.metadata: dict[str, str] = {}

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def close(self) -> None:
        self.tensors = {}


def write_index(path: Path, weight_map: dict[str, str], total_size: int, metadata: dict[str, str]) -> None:
    index = {"metadata": {"total_size": total_size, **metadata}, "weight_map": weight_map}
    path.write_text(json.dumps(index, indent=2) + "\n")
