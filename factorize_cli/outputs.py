"""The one rule for every path the tool writes (checkpoint, report, HTML, statistics, batch folders).

Checked before any work, for every target together:

- never an input, never inside an input folder, never a folder that holds an input
  (compared both as given and with symbolic links resolved), even with ``--force``;
- two targets of one run are never the same path;
- an existing file or folder only with ``--force``; and an existing *folder* only when it is an
  earlier output of this tool (it carries our marker, or is a sharded checkpoint whose index we
  wrote) holding nothing we did not write: anything else is refused with the reason.

Writes themselves go through :func:`factorize_cli.atomic.atomic_path` (temporary, flush, rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from factorize_cli.errors import OutputError, UsageError
from factorize_cli.formats.sharded import INDEX_SUFFIXES

MARKER = ".factorize-output.json"  # written into every folder output: what we wrote there
RANKS_METADATA_KEY = "factorize.ranks"


def _forms(path: Path) -> set[Path]:
    """The path as given (absolute, not resolved) and with links resolved."""
    return {Path(os.path.abspath(path)), path.resolve()}


def _within(inner: set[Path], outer: set[Path]) -> bool:
    return any(o == i or o in i.parents for i in inner for o in outer)


def default_report_path(output: Path) -> Path:
    """``<stem>.factorize.json`` beside the output: the suffix of a checkpoint file dropped, a folder's whole
    name kept (``small.v0.9/`` -> ``small.v0.9.factorize.json``)."""
    from factorize_cli.formats import TORCH_SUFFIXES

    known = (".safetensors", ".pt2", *TORCH_SUFFIXES)
    stem = output.stem if output.suffix in known and not output.is_dir() else output.name
    return output.parent / f"{stem}.factorize.json"


def check_targets(targets: Mapping[str, Path | None], inputs: Iterable[Path], *, force: bool) -> None:
    """Refuse the run unless every target (``{what: path}``; ``None`` entries are ignored) may be written."""
    chosen = {what: Path(p) for what, p in targets.items() if p is not None}
    sources = [Path(s) for s in inputs]
    seen: dict[Path, str] = {}
    for what, path in chosen.items():
        forms = _forms(path)
        for form in forms:
            if form in seen:
                raise UsageError(f"{path}: the {what} and the {seen[form]} would be the same file")
        seen.update(dict.fromkeys(forms, what))
        check_apart(path, what, sources)
        _check_existing(path, what, force=force)


def check_apart(path: Path, what: str, inputs: Iterable[Path]) -> None:
    """Refuse a target that is an input, lies inside an input folder, or holds an input."""
    forms = _forms(path)
    for source in inputs:
        source_forms = _forms(Path(source))
        if forms & source_forms:
            raise OutputError(f"{path}: the {what} would overwrite the input {source}; choose another path")
        if _within(forms, {f for f in source_forms if f.is_dir()}):
            raise OutputError(f"{path}: the {what} would be written inside the input folder {source}; "
                              "choose a path outside it")
        if _within(source_forms, forms):
            raise OutputError(f"{path}: the {what} would replace a folder that holds the input {source}; "
                              "choose another path")


def _check_existing(path: Path, what: str, *, force: bool) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: folder for the {what} does not exist")
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise OutputError(f"{path}: already exists; pass --force to replace it")
    if path.is_dir() and not path.is_symlink():
        why = not_an_earlier_output(path)
        if why is not None:
            raise OutputError(f"{path}: --force replaces only a folder that factorize wrote, and {why}; "
                              "remove it yourself or choose another path")


def not_an_earlier_output(folder: Path) -> str | None:
    """None when ``folder`` is an earlier output of this tool holding nothing else; else why not."""
    try:
        files, folders = _tree(folder)
    except OSError as e:
        return f"it cannot be listed ({e.strerror})"
    top = {name for name in files | folders if "/" not in name}
    ours = _listed_in_marker(folder) if MARKER in files else _listed_in_index(folder, top)
    if ours is None:
        return "this folder is not one of its outputs"
    others = sorted(files - ours - {MARKER})
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        return f"it holds {others[0]!r}{more}, which factorize did not write"
    holding = {p.as_posix() for name in ours for p in Path(name).parents if p != Path(".")}
    extra = sorted(folders - holding)
    if extra:
        return f"it holds a folder {extra[0]!r}"
    return None


def _tree(folder: Path) -> tuple[set[str], set[str]]:
    """Relative paths of the files (links included) and of the real folders under ``folder``."""
    files: set[str] = set()
    folders: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise):
        here = Path(dirpath).relative_to(folder)
        for name in list(dirnames):
            if (Path(dirpath) / name).is_symlink():
                dirnames.remove(name)
                filenames.append(name)
            else:
                folders.add((here / name).as_posix())
        files.update((here / name).as_posix() for name in filenames)
    return files, folders


def _raise(error: OSError) -> None:
    raise error


def _listed_in_marker(folder: Path) -> set[str] | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) and _relative(f) for f in files):
        return None
    return set(files)


def _relative(name: str) -> bool:
    """A plain relative path inside the folder (a model folder's copied subfolders: ``1_Pooling/config.json``)."""
    parts = name.split("/")
    return bool(name) and "\\" not in name and all(part not in ("", ".", "..") for part in parts)


def _listed_in_index(folder: Path, entries: set[str]) -> set[str] | None:
    """Outputs written before the marker existed: one index whose metadata carries our rank map."""
    indexes = [name for name in entries if name.endswith(INDEX_SUFFIXES)]
    if len(indexes) != 1:
        return None
    try:
        index = json.loads((folder / indexes[0]).read_text())
        if RANKS_METADATA_KEY not in index.get("metadata", {}):
            return None
        return {indexes[0], *map(str, index["weight_map"].values())}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def write_marker(folder: Path, files: Iterable[str], producer: str) -> None:
    """Record, inside a folder output, which files we wrote (checked before a later --force replace)."""
    names = sorted(set(files))
    (folder / MARKER).write_text(json.dumps({"producer": producer, "files": names}, indent=2) + "\n")
