"""Whitening calibrated layers by their input statistics, one distinct input at a time.

A layer's whitening ``(S, S^-1)`` (:func:`factorize_cli.factorization.cholesky_whitening`: the
float64 Cholesky factor of its input second moment, ``S S^T = C``, and no inverse: factors are mapped
back by a triangular solve) costs a ``fan_in^3 / 3`` factorization and one ``fan_in^2`` matrix, held
in the precision layers compute in (float32 for bf16/fp16/fp32 weights): 0.13 GB and under a second
for a 5632-wide input on two cores (a symmetric root and its inverse by ``eigh`` took a minute and a
half and four times the memory). The
:class:`Whitener` computes it once per distinct input (layers that read the same input, q/k/v or
gate/up, share their statistics: see :mod:`factorize_cli.calibration`) and holds at most one pair
in memory. A pair evicted while more uses of it are due (planning whitened the layer's spectrum and
apply needs the pair again, or layers sharing an input are not consecutive) is spilled to a
temporary directory, which is deleted when the whitener closes.

A layer whose whitening fails (a zero or non-finite second moment, a LAPACK error) gets plain SVD;
the whitener says why, and the report carries it.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from factorize_cli.errors import describe

if TYPE_CHECKING:  # torch is imported where statistics are read: --help and header-only plans need none
    import torch

    from factorize_cli.calibration import StatsFile
    from factorize_cli.factorization import WhitenedOutcome
    from factorize_cli.planning import LayerPlan

Pair = tuple["torch.Tensor", "torch.Tensor"]  # (S, S^-1)
Reason = str  # why a layer is not whitened after all: it gets plain SVD
PLAIN = ": plain SVD"


class Whitener:
    """Each calibrated layer's whitening from the statistics file at ``path`` (none: every layer plain).

    ``keep_for_apply``: planning's pairs are wanted again by apply (spill them rather than recompute).
    Announce the uses with :meth:`begin_planning` and :meth:`begin_apply`; unannounced uses still
    work, they just cannot be kept when evicted.
    """

    def __init__(self, path: str | None, *, keep_for_apply: bool = False) -> None:
        self.stats: StatsFile | None = None
        if path:
            from factorize_cli.calibration import StatsFile

            self.stats = StatsFile(path)
        self.keep_for_apply = keep_for_apply
        self._current: tuple[str, Pair] | None = None  # (canonical layer, its pair)
        self._due: Counter[str] = Counter()  # announced uses still to come, by canonical layer
        self._spilled: dict[str, Path] = {}
        self._failed: dict[str, Reason] = {}
        self._spill_dir: Path | None = None
        self._spills = 0
        self._lock = threading.Lock()  # layers are factorized two at a time: one pair computed at a time

    @property
    def active(self) -> bool:
        return self.stats is not None

    def why_not(self, layer: LayerPlan) -> Reason | None:
        """None when the statistics cover the layer, else why not; reads headers and the row count only."""
        name, fan_in = layer.name, layer.geometry.fan_in
        if self.stats is None or name not in self.stats:
            return "no calibration statistics for this layer" + PLAIN
        if self.stats.count(name) == 0:
            return "calibration statistics saw no inputs" + PLAIN
        if self.stats.fan_in(name) != fan_in:
            return f"calibration statistics have {self.stats.fan_in(name)} input features, the layer {fan_in}" + PLAIN
        return None

    def sensitivity(self, name: str) -> float | None:
        """The layer's measured output sensitivity from the statistics file, if it holds one."""
        return self.stats.sensitivity(name) if self.stats is not None else None

    def begin_planning(self, names: Iterable[str]) -> None:
        """Planning will whiten these layers' spectra (apply then needs them once more if ``keep_for_apply``)."""
        with self._lock:
            self._expect(names, 2 if self.keep_for_apply else 1)

    def begin_apply(self, names: Iterable[str]) -> None:
        """Apply will whiten exactly these layers: what planning kept for any other is dropped."""
        with self._lock:
            self._begin_apply(names)

    def _begin_apply(self, names: Iterable[str]) -> None:
        self._due.clear()
        self._expect(names, 1)
        for canonical in [c for c in self._spilled if not self._due[c]]:
            self._spilled.pop(canonical).unlink(missing_ok=True)
        if self._current is not None and not self._due[self._current[0]]:
            self._current = None

    def _expect(self, names: Iterable[str], times: int) -> None:
        if self.stats is not None:
            for name in names:
                if name in self.stats:
                    self._due[self.stats.canonical(name)] += times

    def pair(self, name: str, dtype: torch.dtype | None = None) -> Pair | Reason:
        """``(S, S^-1)`` for the layer's input, or why it cannot be whitened (thread-safe). ``dtype``: the
        precision the caller computes in; a float64 pair is then held in it from here on (float32: half the
        memory, and one conversion per input instead of one per layer), and a float64 request after that
        recomputes the pair from the statistics."""
        with self._lock:
            got = self._pair(name)
            if isinstance(got, str) or dtype is None or got[0].dtype == dtype:
                return got
            assert self._current is not None
            if dtype.itemsize >= got[0].dtype.itemsize:
                fresh = self._compute(self._current[0])
                if isinstance(fresh, str):
                    return fresh
                got = fresh
            got = tuple(t if t is None else t.to(dtype) for t in got)  # type: ignore[assignment]
            self._current = (self._current[0], got)
            return got

    def _pair(self, name: str) -> Pair | Reason:
        assert self.stats is not None, "pair() of a whitener without statistics"
        canonical = self.stats.canonical(name)
        self._due[canonical] = max(self._due[canonical] - 1, 0)
        if canonical in self._failed:
            return self._failed[canonical]
        if self._current is None or self._current[0] != canonical:
            self._evict()  # before the next pair exists: one in memory at a time
            got = self._restore(canonical) if canonical in self._spilled else self._compute(canonical)
            if isinstance(got, str):
                return got
            self._current = (canonical, got)
        if not self._due[canonical] and canonical in self._spilled:
            self._spilled.pop(canonical).unlink(missing_ok=True)
        return self._current[1]

    def _compute(self, canonical: str) -> Pair | Reason:
        import torch

        from factorize_cli import factorization

        assert self.stats is not None
        moment = self.stats.second_moment(canonical)
        try:
            return factorization.cholesky_whitening(moment)
        except (ValueError, torch.linalg.LinAlgError) as e:
            self._failed[canonical] = f"whitening failed ({describe(e)})" + PLAIN
            return self._failed[canonical]

    def _evict(self) -> None:
        if self._current is None:
            return
        canonical, pair = self._current
        self._current = None
        if self._due[canonical] and canonical not in self._spilled:
            import torch

            if self._spill_dir is None:
                self._spill_dir = Path(tempfile.mkdtemp(prefix="factorize-whitening-"))
            self._spills += 1
            path = self._spill_dir / f"{self._spills}.pt"
            torch.save({"root": pair[0], "inverse": pair[1]}, path)
            self._spilled[canonical] = path

    def _restore(self, canonical: str) -> Pair:
        import torch

        saved = torch.load(self._spilled[canonical], weights_only=True)
        return saved["root"], saved["inverse"]

    def spectrum(self, weight: torch.Tensor, layer: LayerPlan, *, engine: str,
                 device: str) -> torch.Tensor | Reason:
        """The singular values of ``W S`` (the spectrum apply truncates), or why the layer gets plain SVD."""
        import torch

        from factorize_cli.factorization import whitened_singular_values

        got = self.pair(layer.name, torch.float64)  # the spectrum is computed in float64
        if isinstance(got, str):
            return got
        try:
            return whitened_singular_values(weight, layer.geometry, got[0], engine=engine, device=device,
                                            lower=got[1] is None)
        except torch.linalg.LinAlgError as e:
            return f"the whitened spectrum failed ({describe(e)})" + PLAIN

    def factorize(self, weight: torch.Tensor, layer: LayerPlan, *, engine: str, seed: int,
                  device: str) -> WhitenedOutcome | Reason:
        """The whitened factors of a planned layer, or why it gets plain SVD."""
        import torch

        from factorize_cli.factorization import factorize_whitened

        from factorize_cli.factorization import working_dtype

        got = self.pair(layer.name, working_dtype(weight, "exact" if engine == "exact" else "gram"))
        if isinstance(got, str):
            return got
        assert layer.rank is not None
        try:
            return factorize_whitened(weight, layer.geometry, layer.rank, *got, engine=engine, seed=seed,
                                      device=device)
        except torch.linalg.LinAlgError as e:
            return f"the whitened SVD failed ({describe(e)})" + PLAIN

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        self._current = None
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir, self._spilled = None, {}
        if self.stats is not None:
            self.stats.close()

    def __enter__(self) -> Whitener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
