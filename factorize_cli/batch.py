"""Many inputs: find the checkpoints, pair each with its output, run each, keep going.

- A file, a sharded checkpoint folder (it holds a shard index), a Hugging Face model folder (it
  holds a ``config.json``), or ``-`` (stdin) is one checkpoint.
- Any other directory is searched (sorted, recursively) for files matching the globs; a
  sharded or model folder found inside counts as one checkpoint and is not searched further.
- ``apply`` with one checkpoint writes to OUTPUT as given. With several (or a searched
  directory) OUTPUT is a folder that mirrors the inputs' relative paths: a single searched
  directory mirrors its contents, several inputs keep their own names under OUTPUT.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from factorize_cli.errors import InputError, UsageError
from factorize_cli.formats.hfmodel import is_model_folder
from factorize_cli.formats.sharded import is_sharded

STDIN = "-"
DEFAULT_GLOBS = ("*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.jit", "*.pt2")


@dataclass(frozen=True)
class Job:
    source: str  # a path, or "-" for stdin
    output: Path | None = None  # apply only
    report: Path | None = None  # apply only, when the default name would collide


def _one_checkpoint(directory: Path) -> bool:
    """A folder read as one checkpoint, never searched: shards with their index, or a model folder."""
    return is_sharded(directory) or is_model_folder(directory)


def _search(directory: Path, globs: Sequence[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(directory):
        here = Path(dirpath)
        dirnames.sort()
        keep = []
        for name in dirnames:
            child = here / name
            if name.startswith("."):
                continue  # our own temporaries, VCS folders
            if _one_checkpoint(child):
                yield child
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not name.startswith(".") and any(fnmatch.fnmatchcase(name, g) for g in globs):
                yield here / name


def discover(inputs: Sequence[str], globs: Sequence[str] = DEFAULT_GLOBS) -> tuple[list[tuple[str, str]], bool]:
    """``(source, relative name)`` per checkpoint in a stable order, and whether OUTPUT must be a folder."""
    found: list[tuple[str, str]] = []
    mirror = len(inputs) > 1
    for raw in inputs:
        if raw == STDIN:
            found.append((STDIN, "stdin"))
            continue
        path = Path(raw)
        if path.is_dir() and not _one_checkpoint(path):
            mirror = True
            hits = sorted(_search(path, globs))
            if not hits:
                raise InputError(f"{path}: no checkpoints found (looked for {', '.join(globs)})")
            base = path if len(inputs) == 1 else path.parent
            found.extend((str(hit), str(hit.relative_to(base))) for hit in hits)
        else:
            found.append((raw, path.name))
    if inputs.count(STDIN) > 1:
        raise UsageError("stdin ('-') can be read only once")
    return found, mirror


def apply_jobs(inputs: Sequence[str], output: Path, globs: Sequence[str] = DEFAULT_GLOBS) -> list[Job]:
    found, mirror = discover(inputs, globs)
    if not mirror:
        return [Job(found[0][0], output)]
    if STDIN in (source for source, _ in found):
        raise UsageError("stdin ('-') takes a single output file, not a folder of several inputs")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: several checkpoints need an output folder, and this is a file")
    from factorize_cli.outputs import check_apart

    check_apart(output, "output folder", [Path(raw) for raw in inputs] + [Path(source) for source, _ in found])
    from factorize_cli.outputs import default_report_path

    seen: dict[str, str] = {}
    for source, relative in found:
        if relative in seen:
            raise UsageError(f"{source} and {seen[relative]} would both be written to {output / relative}")
        seen[relative] = source
    reports = [default_report_path(output / relative) for _, relative in found]
    jobs = []
    for (source, relative), report in zip(found, reports):
        target = output / relative
        if reports.count(report) > 1:  # model.pt beside model.safetensors: name the report by the file
            report = target.with_name(f"{target.name}.factorize.json")
        jobs.append(Job(source, target, report if report != default_report_path(target) else None))
    return jobs


def plan_jobs(inputs: Sequence[str], globs: Sequence[str] = DEFAULT_GLOBS) -> list[Job]:
    found, _ = discover(inputs, globs)
    return [Job(source) for source, _ in found]


@contextmanager
def materialized(source: str) -> Iterator[str]:
    """A path to read ``source`` from: the path itself, or stdin's bytes spooled to a temporary file."""
    if source != STDIN:
        yield source
        return
    from factorize_cli.distributed import launched

    if launched():  # each process would need the whole stream, and torchrun gives it to none of them
        raise UsageError("'-' (stdin) cannot be read by the processes of a torchrun launch; give a path")
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("'-' reads a checkpoint from stdin, but stdin is a terminal; pipe one in")
    folder = tempfile.mkdtemp(prefix="factorize-stdin-")
    try:
        path = os.path.join(folder, "stdin")
        with open(path, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
