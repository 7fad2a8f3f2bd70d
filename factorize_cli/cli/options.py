"""Options shared by ``plan`` and ``apply``, declared once and folded into a FactorizeConfig."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Callable

import typer

SELECTION = "Selection (Composer's Factorize flags)"
RANKS = "Ranks"
INPUT = "Input"


def _shared_parameters() -> list[inspect.Parameter]:
    def opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    return [
        opt("factorize_linears", Annotated[bool, typer.Option(
            "--factorize-linears/--no-factorize-linears", rich_help_panel=SELECTION,
            help="Consider Linear (2-D) weights.")], True),
        opt("factorize_convs", Annotated[bool, typer.Option(
            "--factorize-convs/--no-factorize-convs", rich_help_panel=SELECTION,
            help="Consider Conv2d (4-D) weights.")], True),
        opt("min_features", Annotated[int, typer.Option(
            "--min-features", min=1, rich_help_panel=SELECTION,
            help="Skip Linears with min(in, out) below this.")], 512),
        opt("min_channels", Annotated[int, typer.Option(
            "--min-channels", min=1, rich_help_panel=SELECTION,
            help="Skip convs with min(in, out) channels below this.")], 512),
        opt("include", Annotated[list[str], typer.Option(
            "--include", metavar="GLOB", rich_help_panel=SELECTION,
            help="Only layers whose name matches (repeatable); overrides the embedding heuristic.")], []),
        opt("exclude", Annotated[list[str], typer.Option(
            "--exclude", metavar="GLOB", rich_help_panel=SELECTION,
            help="Never layers whose name matches (repeatable).")], []),
        opt("latent_features", Annotated[str, typer.Option(
            "--latent-features", metavar="F|R", rich_help_panel=RANKS,
            help="Linear rank: a fraction < 1 of min(in, out), or an absolute rank >= 1.")], "0.25"),
        opt("latent_channels", Annotated[str, typer.Option(
            "--latent-channels", metavar="F|R", rich_help_panel=RANKS,
            help="Conv rank: a fraction < 1 of min(in, out) channels, or an absolute rank >= 1.")], "0.25"),
        opt("unsafe_pickle", Annotated[bool, typer.Option(
            "--unsafe-pickle", rich_help_panel=INPUT,
            help="Load torch.save files with full pickle: EXECUTES CODE FROM THE FILE. Only for files you trust.")],
            False),
    ]


_SHARED = _shared_parameters()
_NAMES = [p.name for p in _SHARED]


def factorize_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared options to ``command``'s signature; it receives ``config`` and ``unsafe_pickle``."""
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(command).parameters.values() if p.name != "config"]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        shared = {name: kwargs.pop(name) for name in _NAMES}
        unsafe = shared.pop("unsafe_pickle")
        return command(config=build_config(**shared), unsafe_pickle=unsafe,
                       **{k: v for k, v in kwargs.items() if k != "unsafe_pickle"})

    params = [p for p in own if p.name != "unsafe_pickle"] + _SHARED
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # Typer must read the merged signature, not the original
    return wrapper


def build_config(*, factorize_linears: bool, factorize_convs: bool, min_features: int, min_channels: int,
                 include: list[str], exclude: list[str], latent_features: str, latent_channels: str) -> Any:
    from factorize_cli.config import FactorizeConfig, Latent, RatioPolicy, SelectionConfig

    return FactorizeConfig(
        selection=SelectionConfig(factorize_linears=factorize_linears, factorize_convs=factorize_convs,
                                  min_features=min_features, min_channels=min_channels,
                                  include=tuple(include), exclude=tuple(exclude)),
        policy=RatioPolicy(latent_features=Latent.parse(latent_features),
                           latent_channels=Latent.parse(latent_channels)),
    )


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No table, no progress; errors only.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout.")]
ReportPath = Annotated[str | None, typer.Option("--report", metavar="PATH", help="Write the JSON report here.")]
