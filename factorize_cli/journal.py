"""Finished layers, kept beside the output: what ``--resume`` continues from, and how ranks hand their
layers to the rank that assembles the output.

``.<output name>.factorize-journal/`` in the output's folder holds

- ``journal.json``: what the run is (the input's files with sizes and times, the settings the factors
  depend on, the version); resuming from a journal of another run is refused;
- ``layers/<id>.safetensors``: one finished layer: its two factors exactly as they are written, its
  spectrum when the engine computed all of it, and in the metadata the layer's name, rank, geometry and
  the numbers the report gives;
- ``non-finite/<id>.json``: a layer found to hold NaN or Inf (planned again without it).

Each entry is written to a temporary name and renamed: a killed run leaves whole entries or none. The
journal goes once the output is in place (or a gate refused it); an interrupted or failed run keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factorize_cli.errors import InputError, OutputError, describe

if TYPE_CHECKING:
    from factorize_cli.config import FactorizeConfig
    from factorize_cli.planning import LayerPlan
    from factorize_cli.report import LayerResult

FORMAT = "factorize-journal/1"


def journal_path(output: Path) -> Path:
    return output.parent / f".{output.name}.factorize-journal"


def _files(path: Path) -> list[list[Any]]:
    """Every file a run reads from ``path``, with its size and modification time."""
    path = Path(os.path.abspath(path))
    found = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for p in found:
        st = p.stat()
        out.append([str(p.relative_to(path)) if p != path else p.name, st.st_size, st.st_mtime_ns])
    return out


def identity(source: Path, config: FactorizeConfig) -> dict[str, Any]:
    """What the factors of a run depend on beyond each layer's rank and geometry."""
    from factorize_cli import __version__

    import torch

    calibration = _files(Path(config.calibration)) if config.calibration else None
    return {"format": FORMAT, "factorize": __version__, "torch": torch.__version__,
            "input": os.path.abspath(source), "files": _files(source),
            "svd": config.svd, "seed": config.seed, "device": config.device.split(":")[0],
            "calibration": calibration}


def _layer_id(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:24]


def _key(layer: LayerPlan) -> dict[str, Any]:
    geo = layer.geometry
    return {"name": layer.name, "rank": layer.rank, "calibrated": layer.calibrated,
            "geometry": [geo.kind.value, geo.out_features, geo.in_features, list(geo.kernel), geo.transposed]}


class Journal:
    """One run's journal (see the module). Rank 0 creates it; every rank writes its own layers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.threads: int | None = None  # math threads per layer of the layers this process computes

    @classmethod
    def open(cls, output: Path, source: Path, config: FactorizeConfig, *, resume: bool) -> Journal:
        """The journal beside ``output`` (rank 0 sets it up; other ranks just construct it): continued with
        ``resume`` (refused if it is another run's), else started; without ``resume`` an existing one is
        refused rather than thrown away."""
        journal = cls(journal_path(output))
        wanted = identity(source, config)
        found = journal.path / "journal.json"
        if journal.path.exists():
            if not resume:
                raise OutputError(f"{journal.path}: an interrupted run of this output left its finished layers "
                                  "here; pass --resume to continue it, or delete the folder to start over")
            try:
                had = json.loads(found.read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"{found}: not a journal this tool can continue ({describe(e)}); delete "
                                 f"{journal.path} to start over") from e
            if had != wanted:
                changed = sorted(k for k in set(had) | set(wanted) if had.get(k) != wanted.get(k))
                raise InputError(f"{journal.path}: the journal is of another run ({', '.join(changed)} changed); "
                                 "rerun with the same input and flags, or delete it to start over")
            return journal
        tmp = journal.path.with_name(journal.path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "layers").mkdir(parents=True)
        (tmp / "non-finite").mkdir()
        (tmp / "journal.json").write_text(json.dumps(wanted, indent=1) + "\n")
        os.replace(tmp, journal.path)
        return journal

    def _entry(self, layer: LayerPlan) -> Path:
        return self.path / "layers" / f"{_layer_id(layer.name)}.safetensors"

    def done(self, layer: LayerPlan) -> bool:
        """Whether this layer, at this rank and geometry, is finished here."""
        entry = self._entry(layer)
        if not entry.is_file():
            return False
        from factorize_cli.formats.safetensors import SafetensorsFile

        try:
            f = SafetensorsFile(entry)
        except InputError:
            return False  # a damaged entry is computed again
        try:  # computed on another number of math threads: other bytes (BLAS), so computed again
            return json.loads(f.metadata.get("layer", "null")) == _key(layer) and \
                (self.threads is None or f.metadata.get("threads") == str(self.threads))
        finally:
            f.close()

    def save(self, layer: LayerPlan, factors: Any, result: LayerResult) -> None:
        """Record a finished layer (its factors as written and its result)."""
        from factorize_cli.atomic import _fsync_file
        from factorize_cli.formats.base import dtype_name
        from factorize_cli.formats.safetensors import OutputTensor, write_safetensors

        tensors = {"first": factors.first, "second": factors.second}
        if result.spectrum is not None:
            tensors["spectrum"] = result.spectrum
        numbers = {k: v for k, v in asdict(result).items() if k != "spectrum"}
        layout = [OutputTensor(k, tuple(t.shape), dtype_name(t.dtype)) for k, t in tensors.items()]
        entry = self._entry(layer)
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        write_safetensors(tmp, layout, (t.detach().cpu().contiguous() for t in tensors.values()),
                          {"layer": json.dumps(_key(layer)), "result": json.dumps(numbers),
                           "threads": str(self.threads)})
        _fsync_file(tmp)
        os.replace(tmp, entry)

    def load(self, layer: LayerPlan) -> tuple[Any, LayerResult]:
        """A finished layer's factors (``.first``/``.second``) and result."""
        from factorize_cli.execution import Given, GivenFactors

        return self._read(layer, lambda f: Given(GivenFactors(f.get("first"), f.get("second"))))

    def result(self, layer: LayerPlan) -> LayerResult:
        """A finished layer's result (its factors are not read)."""
        return self._read(layer, lambda f: None)[1]

    def _read(self, layer: LayerPlan, factors: Any) -> tuple[Any, LayerResult]:
        from factorize_cli.formats.safetensors import SafetensorsFile
        from factorize_cli.report import LayerResult

        f = SafetensorsFile(self._entry(layer))
        try:
            if json.loads(f.metadata.get("layer", "null")) != _key(layer):
                raise InputError(f"{self.path}: the entry of {layer.name} is not the planned layer's")
            spectrum = f.get("spectrum") if any(info.key == "spectrum" for info in f.infos) else None
            return factors(f), LayerResult(**json.loads(f.metadata["result"]), spectrum=spectrum)
        finally:
            f.close()

    def shards(self) -> Path:
        """Where the ranks put the output's shards they write, until rank 0 moves them into the output."""
        folder = self.path / "shards"
        folder.mkdir(exist_ok=True)
        return folder

    def mark_non_finite(self, name: str) -> None:
        entry = self.path / "non-finite" / f"{_layer_id(name)}.json"
        entry.write_text(json.dumps({"name": name}) + "\n")

    def non_finite(self) -> set[str]:
        found = set()
        for entry in sorted((self.path / "non-finite").glob("*.json")):
            try:
                found.add(json.loads(entry.read_text())["name"])
            except (OSError, ValueError, KeyError):
                continue
        return found

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
