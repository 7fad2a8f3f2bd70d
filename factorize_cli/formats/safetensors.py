"""``.safetensors`` files: positional reads of a validated header, streamed writes.

The writer is our own: the plan knows every output tensor's shape and dtype before
the first byte is written, so the header goes first and each tensor is written as
it is produced; nothing holds the whole output in memory.

Every dtype of the format is accepted. One that this torch cannot hold (``F4``, ``F6_*``, or
``F8_E8M0`` on an older torch) is read as a :class:`RawTensor`, its bytes as they are: such tensors are
never candidates and pass through to a safetensors output byte for byte. The format is
little-endian; on a big-endian host reading and writing are refused rather than silently wrong.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from factorize_cli.errors import InputError, UsageError, describe
from factorize_cli.formats.base import Checkpoint, TensorInfo, dtype_name

if TYPE_CHECKING:  # torch is imported where tensors are made: reading headers needs none
    import torch

# The safetensors dtypes and their width in bits.
_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
         "U16": 16, "U32": 32, "U64": 64, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "C64": 64,
         "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}
# Those torch has a dtype for, by its name; the others are named "raw:<code>" in a TensorInfo.
_TO_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
_TO_ST = {v: k for k, v in _TO_TORCH.items()}
RAW = "raw:"


def is_raw(dtype: str) -> bool:
    """Whether a TensorInfo dtype name is one this torch cannot hold (read and written as bytes)."""
    if dtype.startswith(RAW):
        return True
    import torch

    return not isinstance(getattr(torch, dtype, None), torch.dtype)


def _code(dtype: str) -> str | None:
    """The safetensors code of a TensorInfo dtype name (None: the format cannot hold it)."""
    return dtype[len(RAW):] if dtype.startswith(RAW) else _TO_ST.get(dtype)


def _check_byte_order() -> None:
    if sys.byteorder != "little":
        raise UsageError("safetensors data is little-endian and this host is big-endian: not supported")


@dataclass(frozen=True)
class RawTensor:
    """A tensor of a dtype this torch cannot hold: its shape, its TensorInfo dtype name, its bytes."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes

@dataclass(frozen=True)
class OutputTensor:
    key: str
    shape: tuple[int, ...]
    dtype: str
    source: str = ""  # the input key it comes from (the weight, for factors)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _BITS[_code(self.dtype)] // 8


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


class SafetensorsFile:
    """One ``.safetensors`` file: a validated header and positional reads (``pread``).

    Reads go through ``os.preadv`` into fresh tensors rather than a memory map, so the
    process holds only the tensors in flight: reading a checkpoint end to end does not grow
    the resident set with the file's pages. Reads are thread-safe (one reader thread
    prefetches while the main thread computes).
    """

    def __init__(self, path: Path) -> None:
        _check_byte_order()
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
            if dtype not in _BITS:
                raise self._bad(f"tensor {key!r} has unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise self._bad(f"tensor {key!r} has a malformed shape {shape!r}")
            nbytes, rest = divmod(math.prod(shape) * _BITS[dtype], 8)
            if rest:
                raise self._bad(f"tensor {key!r}: {shape} {dtype} is not a whole number of bytes")
            if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size
                    and end - begin == nbytes):
                raise self._bad(f"tensor {key!r}: offsets [{begin}, {end}] do not fit shape {shape} {dtype} "
                                f"in {data_size} data bytes")
            spans.append((begin, end, key, TensorInfo(key, tuple(shape), _TO_TORCH.get(dtype, RAW + dtype))))
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

    def get(self, key: str) -> torch.Tensor | RawTensor:
        import torch

        info = self._by_key[key]
        start, nbytes = self._spans[key]
        dtype = getattr(torch, info.dtype, None) if not info.dtype.startswith(RAW) else None
        if not isinstance(dtype, torch.dtype):
            data = bytearray(nbytes)
            self._read_into(memoryview(data), start, key)
            return RawTensor(info.shape, info.dtype, bytes(data))
        tensor = torch.empty(info.shape, dtype=dtype)
        self._read_into(_tensor_bytes(tensor), start, key)
        return tensor

    def _read_into(self, view: memoryview, start: int, key: str) -> None:
        done, nbytes = 0, len(view)
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], start + done)
            if got <= 0:
                raise InputError(f"{self.path}: file ended while reading {key}")
            done += got

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


def write_safetensors(path: Path, layout: Sequence[OutputTensor], tensors: Iterable[torch.Tensor | RawTensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (in ``layout`` order) to ``path``: header first, then one tensor at a time."""
    _check_byte_order()
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for entry in layout:
        if _code(entry.dtype) is None:
            raise InputError(f"{entry.key}: dtype {entry.dtype} cannot be stored in safetensors")
        header[entry.key] = {"dtype": _code(entry.dtype), "shape": list(entry.shape),
                             "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for entry, tensor in zip(layout, tensors, strict=True):
            raw = isinstance(tensor, RawTensor)
            dtype = tensor.dtype if raw else dtype_name(tensor.dtype)
            if tuple(tensor.shape) != entry.shape or dtype != entry.dtype:
                raise RuntimeError(f"internal error: {entry.key} is {tuple(tensor.shape)} {dtype}, "
                                   f"planned {entry.shape} {entry.dtype}")
            if raw:
                f.write(tensor.data)
            else:
                tensor = tensor.detach().to("cpu").contiguous()  # held: the view below borrows its memory
                f.write(_tensor_bytes(tensor))
