"""One error hierarchy; the CLI maps it to exit codes in one place (``cli.main``).

Every message is a single line that names the file or tensor at fault and, where
there is one, the next step for the user.
"""

from __future__ import annotations


class FactorizeError(Exception):
    """Base class of every error the tool reports to a user."""

    exit_code = 2


class UsageError(FactorizeError):
    """Options that contradict each other or cannot be parsed."""


class InputError(FactorizeError):
    """An input checkpoint that is missing, unreadable or not understood."""


class UnsafePickleError(InputError):
    """A pickle that ``weights_only=True`` refuses to load."""


class OutputError(FactorizeError):
    """An output path that cannot be written (exists, is the input, ...)."""


class GateError(FactorizeError):
    """A requested quality or size gate failed; the report is still written."""

    exit_code = 1

    def __init__(self, violations: list[str], report: dict | None = None) -> None:
        super().__init__("; ".join(violations))
        self.violations = list(violations)
        self.report = report  # the report that holds the violations


def describe(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for embedding in a one-line error."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def verdict(e: BaseException) -> tuple[int, str]:
    """The exit code and one-line message of a failure that is not a gate's, as the CLI reports it (a
    checkpoint of a batch, another rank's failure under torchrun)."""
    if isinstance(e, FactorizeError):
        return e.exit_code, str(e)
    if isinstance(e, OSError):
        return 2, (f"{e.filename}: " if e.filename else "") + f"{e.strerror or e}"
    if isinstance(e, MemoryError):
        return 2, "out of memory"
    return 3, f"internal error: {type(e).__name__}: {e}; rerun with --debug for the traceback"
