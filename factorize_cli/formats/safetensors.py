"""``.safetensors`` files and sharded directories: memory-mapped reads, streamed writes.

The writer is our own: the plan knows every output tensor's shape and dtype before
the first byte is written, so the header goes first and each tensor is written as
it is produced; nothing holds the whole output in memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from factorize_cli.errors import InputError, describe
from factorize_cli.formats.base import Checkpoint, TensorInfo

_TO_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}
_TO_ST = {v: k for k, v in _TO_TORCH.items()}

INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class OutputTensor:
    key: str
    shape: tuple[int, ...]
    dtype: str
    source: str = ""  # the input key it comes from (the weight, for factors)

    @property
    def nbytes(self) -> int:
        n = getattr(torch, self.dtype).itemsize
        for s in self.shape:
            n *= s
        return n


class _SafetensorsReader:
    def __init__(self, files: dict[str, Path]) -> None:
        self._handles = {}
        self._where: dict[str, str] = {}
        self._file_order: dict[str, list[str]] = {}
        try:
            for name, path in files.items():
                handle = safe_open(str(path), framework="pt", device="cpu")
                self._handles[name] = handle
                self._file_order[name] = _keys_in_file_order(path, handle.keys())
        except Exception as e:
            self.close()
            raise InputError(f"{path}: not a readable safetensors file ({describe(e)})") from e

    def infos(self, name: str) -> list[TensorInfo]:
        handle = self._handles[name]
        out = []
        for key in self._file_order[name]:
            piece = handle.get_slice(key)
            dtype = piece.get_dtype()
            if dtype not in _TO_TORCH:
                raise InputError(f"{key}: safetensors dtype {dtype} is not supported")
            out.append(TensorInfo(key, tuple(piece.get_shape()), _TO_TORCH[dtype]))
            self._where[key] = name
        return out

    def metadata(self, name: str) -> dict[str, str]:
        return dict(self._handles[name].metadata() or {})

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def _keys_in_file_order(path: Path, keys: Iterable[str]) -> list[str]:
    """Keys in the order their data lies in the file (``safe_open.keys()`` sorts them by name).

    Called after ``safe_open`` has validated the header, so the header parses.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return sorted(keys, key=lambda k: (header[k]["data_offsets"][0], header[k]["data_offsets"][1], k))


def open_safetensors_file(path: Path) -> Checkpoint:
    reader = _SafetensorsReader({path.name: path})
    infos = reader.infos(path.name)
    return Checkpoint(path=str(path), format="safetensors", infos=infos, reader=reader,
                      metadata=reader.metadata(path.name))


def find_index(directory: Path) -> Path:
    indexes = sorted(directory.glob("*" + INDEX_SUFFIX))
    if not indexes:
        raise InputError(f"{directory}: a directory input must hold a sharded safetensors checkpoint, "
                         f"but no *{INDEX_SUFFIX} was found")
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise InputError(f"{directory}: several safetensors indexes ({names}); give one shard set per directory")
    return indexes[0]


def open_sharded(directory: Path) -> Checkpoint:
    index_path = find_index(directory)
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index_path}: not a valid safetensors index ({describe(e)})") from e
    root = directory.resolve()
    files: dict[str, Path] = {}
    for name in sorted(set(weight_map.values())):
        shard = (directory / str(name)).resolve()
        if not isinstance(name, str) or shard.parent != root:
            raise InputError(f"{index_path}: shard {name!r} lies outside {directory}; refusing it")
        if not shard.is_file():
            raise InputError(f"{index_path}: shard {name} is missing")
        files[name] = shard
    reader = _SafetensorsReader(files)
    infos: list[TensorInfo] = []
    shard_of: dict[str, str] = {}
    for name in files:  # validate every shard against the index before any work
        for info in reader.infos(name):
            if weight_map.get(info.key) != name:
                raise InputError(f"{index_path}: tensor {info.key} is in shard {name} "
                                 f"but the index says {weight_map.get(info.key)!r}")
            infos.append(info)
            shard_of[info.key] = name
    missing = sorted(set(weight_map) - set(shard_of))
    if missing:
        raise InputError(f"{index_path}: {len(missing)} indexed tensors are in no shard, e.g. {missing[0]}")
    metadata = reader.metadata(next(iter(files))) if files else {}
    return Checkpoint(path=str(directory), format="safetensors-sharded", infos=infos, reader=reader,
                      metadata=metadata, shard_of=shard_of)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes (little-endian hosts)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def write_safetensors(path: Path, layout: Sequence[OutputTensor], tensors: Iterable[torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in ``layout`` order) to ``path``: header first, then one tensor at a time."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for entry in layout:
        if entry.dtype not in _TO_ST:
            raise InputError(f"{entry.key}: dtype {entry.dtype} cannot be stored in safetensors")
        header[entry.key] = {"dtype": _TO_ST[entry.dtype], "shape": list(entry.shape),
                             "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        count = 0
        for entry, tensor in zip(layout, tensors, strict=True):
            if tuple(tensor.shape) != entry.shape or str(tensor.dtype) != f"torch.{entry.dtype}":
                raise RuntimeError(f"internal error: {entry.key} is {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"planned {entry.shape} {entry.dtype}")
            tensor = tensor.detach().to("cpu").contiguous()
            f.write(_tensor_bytes(tensor))
            count += 1
        f.flush()
        os.fsync(f.fileno())
