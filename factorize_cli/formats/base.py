"""What every format turns a checkpoint into: an ordered, lazily read tensor view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one tensor: enough to plan without reading its data."""

    key: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Checkpoint:
    """An opened checkpoint: tensors in their stored order, read one at a time.

    ``container_path`` names the keys that led from the loaded object to the state
    dict (``("state_dict",)`` for a Lightning file, ``()`` for a flat one).
    ``tied`` maps a key to another key whose storage it shares.
    ``shard_of`` maps a key to its shard file name for sharded checkpoints, and ``index_name``
    names their index file.
    """

    path: str
    format: str
    infos: list[TensorInfo]
    reader: Any  # an object with .get(key) -> torch.Tensor and .close()
    metadata: dict[str, str] = field(default_factory=dict)
    container_path: tuple[str, ...] = ()
    container: Any = None  # the loaded torch.save object, kept whole for torch outputs
    passthrough: Mapping[str, Any] | None = None  # non-tensor state-dict entries, kept as they were
    tied: dict[str, str] = field(default_factory=dict)
    shard_of: dict[str, str] = field(default_factory=dict)
    index_name: str | None = None

    def __post_init__(self) -> None:
        self._by_key = {info.key: info for info in self.infos}

    def info(self, key: str) -> TensorInfo | None:
        return self._by_key.get(key)

    def get(self, key: str) -> torch.Tensor:
        return self.reader.get(key)

    def close(self) -> None:
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shared_storage(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each key whose storage another key also uses to the first such key (and that key to the second).

    Every format whose loader keeps storage sharing (torch.save, TorchScript, torch.export) finds tied
    weights this way: factorizing one name of a shared tensor would keep the other name's full copy.
    """
    first: dict[tuple[str, int], str] = {}
    tied: dict[str, str] = {}
    for key, t in tensors.items():
        if t.numel() == 0 or t.device.type == "meta":
            continue
        ident = (t.device.type, t.untyped_storage().data_ptr())
        if ident in first:
            tied[key] = first[ident]
            tied.setdefault(first[ident], key)
        else:
            first[ident] = key
    return tied


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
