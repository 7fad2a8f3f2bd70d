"""Work across processes: the process group torchrun sets up, and how ranks agree on failure.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the commands join one
``torch.distributed`` process group: gloo on CPUs, NCCL with ``--device cuda`` (each rank on its
``LOCAL_RANK`` GPU). Run without torchrun, :data:`SOLO` stands in and nothing changes.

Every stage that ranks run side by side ends in :meth:`Group.step`: each rank says whether its share
failed, and if one did, every rank raises that error (the rank that failed, its own; the others a
:class:`PeerFailed` naming it), so a bad shard on one rank stops the run everywhere instead of
leaving the others waiting. Collective calls time out after ``FACTORIZE_DIST_TIMEOUT`` seconds
(default 1800): a rank that dies without a word stops the others too.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from factorize_cli.errors import FactorizeError, GateError, UsageError, verdict

TIMEOUT_ENV = "FACTORIZE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class PeerFailed(FactorizeError):
    """Another rank failed; this one stops with that rank's error and exit code (rank 0 prints it, the
    others print nothing: one line per failure, not one per process)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def launched() -> bool:
    """Whether torchrun (or another launcher setting the same variables) started several processes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout in seconds") from None
    if not value > 0:
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: the timeout must be positive")
    return value


@dataclass(frozen=True)
class Group:
    """The ranks of one run. ``backend`` is None for a single process (no collective is ever called)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    objects: Any = None  # the group objects travel in: a gloo group beside NCCL (a CUDA fault cannot block it)
    owned: bool = True  # joined here (and left at exit), not a group the caller's program set up

    @property
    def lead(self) -> bool:
        """Rank 0: the one that plans the output's assembly, writes the report and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def device(self, requested: str) -> str:
        """``cuda`` means this rank's own GPU under torchrun."""
        return f"cuda:{self.local_rank}" if self.distributed and requested == "cuda" else requested

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (picklable objects)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.objects)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.lead else None]
        dist.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def all_reduce_(self, tensor: Any) -> Any:
        """Sum ``tensor`` over the ranks, in place (float64 stays float64). NCCL sums GPU tensors only: a
        CPU tensor (statistics are kept on the CPU) goes through this rank's GPU and back."""
        if self.distributed:
            import torch.distributed as dist

            if self.backend == "nccl" and tensor.device.type != "cuda":
                moved = tensor.to(f"cuda:{self.local_rank}")
                dist.all_reduce(moved, op=dist.ReduceOp.SUM)
                tensor.copy_(moved)
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def shared(self, tasks: Mapping[str, tuple[float, Callable[[], Any]]]) -> dict[str, Any]:
        """``{name: (cost, compute)}``: each task runs on one rank (dealt by cost) and every rank gets every
        result, in the tasks' order (tensors come back on the CPU). A failure on any rank fails all."""
        names = list(tasks)
        mine = {}
        with self.step():
            for i in self.share([tasks[n][0] for n in names]):
                mine[names[i]] = tasks[names[i]][1]()
        if not self.distributed:
            return mine
        every: dict[str, Any] = {}
        for part in self.gather({name: _on_cpu(value) for name, value in mine.items()}):
            every.update(part)
        return {name: every[name] for name in names}

    def share(self, costs: Sequence[float]) -> list[int]:
        """The indices of the items this rank takes (:func:`balanced` by cost, in their order): every rank
        computes the same deal, so the shares cover each item exactly once without a word exchanged."""
        if not self.distributed:
            return list(range(len(costs)))
        return [i for i, owner in enumerate(balanced(costs, self.world)) if owner == self.rank]

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run this rank's share of a stage; afterwards every rank knows whether all shares succeeded.
        A failure anywhere raises on every rank (a gate's failure is not a rank's: gates are decided on
        rank 0 after the shared stages). Interrupts are not exchanged: torchrun stops every rank."""
        failure: BaseException | None = None
        try:
            yield
        except (KeyboardInterrupt, GateError, Terminated):
            raise
        except BaseException as e:  # noqa: BLE001  (told to the other ranks, then raised again below)
            failure = e
        verdicts = self.gather(None if failure is None else verdict(failure))
        if failure is not None:
            failure.factorize_shared = True  # type: ignore[attr-defined]  (every rank raised at this step)
            raise failure
        failed = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
        if failed:
            rank, (code, message) = failed[0]
            peer = PeerFailed(f"rank {rank}: {message}", code)
            peer.factorize_shared = True  # type: ignore[attr-defined]
            raise peer


def _on_cpu(value: Any) -> Any:
    """``value`` with its tensors moved to the CPU (a pickled CUDA tensor would land on the sender's GPU)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*map(_on_cpu, value))
    if isinstance(value, (list, tuple)):
        return type(value)(map(_on_cpu, value))
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _on_cpu(getattr(value, f.name)) for f in fields(value) if f.init})
    return value


SOLO = Group()
_current: Group | None = None


def current(device: str = "cpu") -> Group:
    """This process's group: joined on first use when launched by torchrun (NCCL when that first use
    computes on ``cuda``, else gloo), else :data:`SOLO`."""
    global _current
    if _current is None:
        _current = _join(device) if launched() else SOLO
    return _current


def _join(device: str) -> Group:
    import datetime

    import torch
    import torch.distributed as dist
    # Before the group exists: torch.distributed.nn (imported by torch._dynamo, hence by transformers and
    # torch.export) binds the world group as the default argument of its functions when imported after
    # it, so destroy_process_group cannot free the group; gloo's worker threads then outlive the
    # interpreter and one still dropping a finished collective's tensors aborts the process at exit
    # ("terminate called without an active exception", exit -6, about one folder calibrate in five).
    import torch.distributed.nn  # noqa: F401

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as e:
        raise UsageError(f"torchrun's environment is incomplete ({e}); launch with torchrun") from None
    timeout = datetime.timedelta(seconds=_timeout_s())
    if dist.is_initialized():  # the caller's program (a torchrun script calling our API) set it up: use it
        backend = dist.get_backend()
        objects = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        return Group(dist.get_rank(), dist.get_world_size(), local, backend, objects, owned=False)
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
    objects = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    return Group(rank, world, local, backend, objects)


class Terminated(BaseException):
    """torchrun ended this process (SIGTERM), as it does to every rank when one of them fails or dies. Not
    an Exception: nothing may go on (the next checkpoint of a batch, a collective with the others)."""

    exit_code = 128 + 15
    message = ("stopped: torchrun ended this process (SIGTERM), as it does when another rank fails or dies; "
               "the finished layers are kept beside the output, rerun with --resume")


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def known_to_all(error: BaseException) -> bool:
    """Whether every rank raised ``error`` at the same point (at a :meth:`Group.step`), so that they can go
    on together (to a batch's next checkpoint); always in one process. An error one rank met alone ends
    the run: the others cannot know where it left off."""
    return _current is None or not _current.distributed or getattr(error, "factorize_shared", False)


def follower() -> bool:
    """Whether this process is a rank other than 0 of a joined group (it prints nothing)."""
    return _current is not None and not _current.lead


def close() -> None:
    """Leave the process group (at exit), so torch does not warn about a group left open."""
    global _current
    if _current is not None and _current.distributed and _current.owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _current = None


def balanced(costs: Sequence[float], bins: int) -> list[int]:
    """The bin of each item: the costliest first, each into the bin with the least so far (ties: the
    lowest bin). Deterministic, so every rank computes the same assignment."""
    load = [0.0] * bins
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(bins), key=lambda b: (load[b], b))
        owner[i] = b
        load[b] += costs[i]
    return owner
