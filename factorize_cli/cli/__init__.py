"""The thin Typer CLI. Nothing here imports torch at module level: ``--help`` stays fast."""

from __future__ import annotations

import sys

import typer

from factorize_cli import __version__

app = typer.Typer(
    name="factorize",
    help="Shrink PyTorch checkpoints by low-rank (truncated SVD) factorization of Linear, Conv1d and Conv2d weights.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"factorize {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
) -> None:
    """Exit codes: 0 done; 1 a gate failed; 2 usage error, unreadable input or refused output; 3 internal
    error; 130 interrupted. With several checkpoints: the worst of theirs (each failure is reported and the
    others still run)."""
    ctx.obj = {"debug": debug}


from factorize_cli.cli import apply as _apply_cmd  # noqa: E402,F401  (registers the command)
from factorize_cli.cli import calibrate as _calibrate_cmd  # noqa: E402,F401
from factorize_cli.cli import evaluate as _evaluate_cmd  # noqa: E402,F401
from factorize_cli.cli import plan as _plan_cmd  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and maps every error to one line and an exit code, here and only here."""
    from factorize_cli.memory import release_large_allocations

    args = sys.argv[1:] if argv is None else argv
    release_large_allocations()
    try:
        _main(args)
    finally:
        from factorize_cli import distributed

        distributed.close()


def _main(args: list[str]) -> None:
    from factorize_cli import distributed
    from factorize_cli.errors import FactorizeError, GateError

    debug = "--debug" in args
    try:
        code = app(args=args, prog_name="factorize", standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        _fail("aborted", 130)
    except GateError as e:  # one line per violation; the report has them too
        for violation in e.violations if not distributed.follower() else ():
            print(f"factorize: gate failed: {violation}", file=sys.stderr)
        sys.exit(e.exit_code)
    except FactorizeError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code, alone=not distributed.known_to_all(e))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except distributed.Terminated as e:
        _fail(e.message, e.exit_code)
    except MemoryError:
        _fail("out of memory", 2)
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}", 2, alone=not distributed.known_to_all(e))
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # Typer/Click usage errors
            if type(e).__name__ == "NoArgsIsHelpError":
                ctx = getattr(e, "ctx", None)
                print(ctx.get_help() if ctx else "Try 'factorize --help'.", file=sys.stderr)
                sys.exit(2)
            hint = f" (see 'factorize {e.ctx.info_name if getattr(e, 'ctx', None) else ''} --help')"
            _fail(e.format_message() + hint.replace("factorize factorize", "factorize"), e.exit_code)
        if debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e}; rerun with --debug for the traceback", 3,
              alone=not distributed.known_to_all(e))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int, *, alone: bool = False) -> None:
    """Print the one-line error and exit. Under torchrun rank 0 speaks for every rank, except for an
    error a rank met ``alone`` (outside the stages the ranks share), which only that rank knows."""
    from factorize_cli import distributed

    if alone or not distributed.follower():
        rank = f"rank {distributed.current().rank}: " if alone and distributed.follower() else ""
        print(f"factorize: error: {rank}{' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)
