"""How long work reports its progress: a protocol the CLI renders (rich, on stderr) and a silent default."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...
    def advance(self, label: str) -> None: ...
    def stop(self) -> None: ...


class Silent:
    """Progress that shows nothing (the Python API, tests, ``--quiet``)."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, label: str) -> None:
        pass

    def stop(self) -> None:
        pass
