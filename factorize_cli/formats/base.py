"""What every format turns a checkpoint into: an ordered, lazily read tensor view."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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
    handler: Any = None  # the format's side of the pipeline (see Format); state dicts by default

    def __post_init__(self) -> None:
        self._by_key = {info.key: info for info in self.infos}
        if self.handler is None:
            from factorize_cli.formats.statedict import STATE_DICT

            self.handler = STATE_DICT

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


class Format(Protocol):
    """What the pipeline asks of an opened checkpoint's format, and never more: state dicts
    (:mod:`factorize_cli.formats.statedict`) and graph programs (:mod:`factorize_cli.graphs.format`)."""

    def candidates(self, checkpoint: Checkpoint, selection: Any) -> tuple[list, tuple[str, ...]]:
        """The layers that could be factorized, and notes on how they were found."""

    def output_kind(self, checkpoint: Checkpoint, output: Path) -> Any:
        """The output this input gives at ``output``; refuses, before any work, what cannot be written."""

    def output_tensors(self, checkpoint: Checkpoint, plan: Any) -> int:
        """How many tensors the output holds; refuses a plan the format cannot write."""

    def notes(self, checkpoint: Checkpoint, kind: Any) -> list[str]:
        """What the report should say about the output's format."""

    def write(self, checkpoint: Checkpoint, plan: Any, work: Any, output: Path, *, metadata: dict[str, str],
              before_commit: Callable[[Path], None]) -> list[str]:
        """Write the planned result atomically (``work`` factorizes each layer); the files written."""

    def shard_files(self, checkpoint: Checkpoint, plan: Any, output: Path) -> dict[str, list]:
        """The output's shard files, each with the tensors it holds (``rewrite.Placed``), when the output is
        a folder of shards that several processes can write side by side; {} otherwise."""

    def verifier(self, checkpoint: Checkpoint, source: Path) -> Callable[..., dict[str, Any]]:
        """A function running the original and a written result side by side (``--verify``)."""

    def calibrate(self, checkpoint: Checkpoint, batches: list, device: str) -> dict:
        """Each candidate layer's activation statistics from running the model on ``batches``."""

    def runnable(self, checkpoint: Checkpoint) -> Any:
        """What ``apply --data`` runs: an object whose ``run(checkpoint, config, data, *, sequential, text,
        progress)`` gives a :class:`factorize_cli.datarun.Ran`; refuses a checkpoint that cannot run."""


def prefetch(checkpoint: Checkpoint, keys: Iterator[str], depth: int = 2) -> Iterator[torch.Tensor]:
    """Read tensors ahead on a background thread while the caller computes (reads release the GIL).

    A caller that stops early (an error, a NaN weight) should ``close()`` the generator; one left to the
    garbage collector must not wait for the reader thread there: a collection that runs while a new
    thread is starting holds the lock ``Thread.join`` needs (CPython), and a ``with`` block's shutdown
    would wait forever (seen in CI: the test run hung). So the pool is shut down without waiting."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="factorize-read")
    try:
        pending: collections.deque = collections.deque()
        for key in keys:
            pending.append(pool.submit(checkpoint.get, key))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
