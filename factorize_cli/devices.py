"""Where the math runs: ``--device cpu|cuda|cuda:N``, checked once before any work."""

from __future__ import annotations

from factorize_cli.errors import UsageError


def resolve_device(requested: str) -> tuple[str, str | None]:
    """The device to compute on, and a note when the request cannot be met (CUDA absent)."""
    if requested == "cpu":
        return "cpu", None
    import torch

    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            return "cpu", f"--device {requested}: CUDA is not available here; computing on the CPU"
        try:
            torch.empty(0, device=requested)
        except (RuntimeError, AssertionError) as e:
            raise UsageError(f"--device {requested}: {e}") from None
        return requested, None
    raise UsageError(f"--device {requested!r}: use cpu, cuda or cuda:N")


def check_device(device: str) -> None:
    """Refuse a device that cannot be used as given (the CLI resolves fallbacks before this)."""
    resolved, note = resolve_device(device)
    if note is not None or resolved != device:
        raise UsageError(note or f"device {device} unavailable")
