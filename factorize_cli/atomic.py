"""Atomic writes: build the output under a temporary name in the destination folder, flush it to
disk, then rename it into place.

On any failure (an exception, Ctrl-C) the temporary is removed and nothing appears at the
destination. Replacing an existing folder takes two renames (the old one aside, the new one in);
a failure between them moves the old one back. A process killed outright leaves only dot-named
entries: the next write to the same destination removes a dead run's temporary and, if the
destination is missing, puts the folder it had moved aside back.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_entries(dest: Path, tag: str) -> list[Path]:
    prefix = f".{dest.name}.{tag}-"
    try:
        entries = sorted(dest.parent.iterdir())
    except OSError:
        return []
    dead = []
    for entry in entries:
        if entry.name.startswith(prefix):
            pid = entry.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                dead.append(entry)
    return dead


def sweep_stale(dest: Path) -> None:
    """Clean up after a killed run (SIGKILL, power loss) that was writing ``dest``: its temporary
    goes; a folder it had moved aside comes back when ``dest`` is missing, else it goes too."""
    for entry in _dead_entries(dest, "tmp"):
        _remove(entry)
    for entry in _dead_entries(dest, "old"):
        if not (dest.exists() or dest.is_symlink()):
            os.replace(entry, dest)
        else:
            _remove(entry)


@contextmanager
def atomic_path(dest: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (a folder when ``directory``); on success it is
    flushed to disk and replaces ``dest``."""
    sweep_stale(dest)
    # the destination's suffix is kept at the end: some writers (torch.export) insist on it
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dest.parent / f".{dest.name}.tmp-{tag}{dest.suffix}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if dest.is_dir() and not dest.is_symlink() or (directory and dest.exists()):
            _swap(tmp, dest, dest.parent / f".{dest.name}.old-{tag}")
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        _remove(tmp)
        raise


def _swap(new: Path, dest: Path, aside: Path) -> None:
    """Put ``new`` at ``dest`` when ``os.replace`` cannot (a folder on either side); undoable."""
    os.replace(dest, aside)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    _fsync_dir(dest.parent)
    _remove(aside)


def write_text_atomic(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _fsync_tree(path: Path) -> None:
    """Flush a written file, or every file of a written folder, to disk (whatever wrote it)."""
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
