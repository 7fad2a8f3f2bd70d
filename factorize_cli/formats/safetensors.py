"""``.safetensors`` files: positional reads of a validated header, streamed writes.

The writer is our own: the plan knows every output tensor's shape and dtype before
the first byte is written, so the header goes first and each tensor is written as
it is produced; nothing holds the whole output in memory.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from factorize_cli.errors import InputError, describe
from factorize_cli.formats.base import Checkpoint, TensorInfo

if TYPE_CHECKING:  # torch is imported where tensors are made: reading headers needs none
    import torch

_TO_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}
_TO_ST = {v: k for k, v in _TO_TORCH.items()}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
             "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}

@dataclass(frozen=True)
class OutputTensor:
    key: str
    shape: tuple[int, ...]
    dtype: str
    source: str = ""  # the input key it comes from (the weight, for factors)

    @property
    def nbytes(self) -> int:
        n = _ITEMSIZE[_TO_ST[self.dtype]]
        for s in self.shape:
            n *= s
        return n


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


class SafetensorsFile:
    """One ``.safetensors`` file: a validated header and positional reads (``pread``).

    Reads go through ``os.preadv`` into fresh tensors rather than a memory map, so the
    process holds only the tensors in flight: reading a checkpoint end to end does not grow
    the resident set with the file's pages. Reads are thread-safe (one reader thread
    prefetches while the main thread computes).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise InputError(f"{path}: cannot open ({e.strerror})") from e
        try:
            self.infos, self.metadata, self._spans = self._parse()
        except BaseException:
            self.close()
            raise
        self._by_key = {info.key: info for info in self.infos}

    def _bad(self, why: str) -> InputError:
        return InputError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse(self) -> tuple[list[TensorInfo], dict[str, str], dict[str, tuple[int, int]]]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._bad("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise self._bad(f"header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except (UnicodeDecodeError, ValueError) as e:
            raise self._bad(f"header is not JSON ({describe(e)})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._bad("__metadata__ must map strings to strings")
        data_start, data_size = 8 + length, size - 8 - length
        spans = []
        for key, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise self._bad(f"tensor {key!r} has a malformed entry") from None
            if dtype not in _TO_TORCH:
                raise self._bad(f"tensor {key!r} has unsupported dtype {dtype!r}")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise self._bad(f"tensor {key!r} has a malformed shape {shape!r}")
            nbytes = math.prod(shape) * _ITEMSIZE[dtype]
            if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size
                    and end - begin == nbytes):
                raise self._bad(f"tensor {key!r}: offsets [{begin}, {end}] do not fit shape {shape} {dtype} "
                                f"in {data_size} data bytes")
            spans.append((begin, end, key, TensorInfo(key, tuple(shape), _TO_TORCH[dtype])))
        spans.sort(key=lambda s: (s[0], s[1], s[2]))
        position = 0
        for begin, end, key, _ in spans:
            if begin != position and end != begin:  # empty tensors may sit anywhere
                raise self._bad(f"tensor {key!r} does not start where the previous one ends")
            position = max(position, end)
        if position != data_size:
            raise self._bad(f"data is {data_size} bytes but the tensors cover {position}")
        offsets = {key: (data_start + begin, end - begin) for begin, end, key, _ in spans}
        return [info for *_, info in spans], dict(metadata), offsets

    def get(self, key: str) -> torch.Tensor:
        import torch

        info = self._by_key[key]
        start, nbytes = self._spans[key]
        tensor = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
        view, done = _tensor_bytes(tensor), 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], start + done)
            if got <= 0:
                raise InputError(f"{self.path}: file ended while reading {key}")
            done += got
        return tensor

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)


def open_safetensors_file(path: Path) -> Checkpoint:
    f = SafetensorsFile(path)
    return Checkpoint(path=str(path), format="safetensors", infos=f.infos, reader=f, metadata=f.metadata)


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
