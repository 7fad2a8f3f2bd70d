"""Options shared by ``plan`` and ``apply``, declared once and folded into a FactorizeConfig."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Callable

import typer

SELECTION = "Selection (Composer's Factorize flags)"
RANKS = "Ranks"
COMPUTE = "Compute"
GATES = "Gates (exit 1 when one fails; the report is still written)"
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
            help="Consider Conv1d (3-D) and Conv2d (4-D) weights.")], True),
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
        opt("transposed", Annotated[list[str], typer.Option(
            "--transposed", metavar="GLOB", rich_help_panel=SELECTION,
            help="2-D weights whose name matches are stored in x out, like transformers Conv1D (GPT-2's c_attn, "
                 "c_proj) (repeatable). Orientation comes from a config.json beside the checkpoint when "
                 "transformers is installed, else from the biases; this decides the ones nothing proves.")], []),
        opt("not_transposed", Annotated[list[str], typer.Option(
            "--not-transposed", metavar="GLOB", rich_help_panel=SELECTION,
            help="2-D weights whose name matches are stored out x in, like nn.Linear (repeatable).")], []),
        opt("latent_features", Annotated[str, typer.Option(
            "--latent-features", metavar="F|R", rich_help_panel=RANKS,
            help="Linear rank: a fraction < 1 of min(in, out), or an absolute rank >= 1.")], "0.25"),
        opt("latent_channels", Annotated[str, typer.Option(
            "--latent-channels", metavar="F|R", rich_help_panel=RANKS,
            help="Conv rank: a fraction < 1 of min(in, out) channels, or an absolute rank >= 1.")], "0.25"),
        opt("rank_policy", Annotated[str, typer.Option(
            "--rank-policy", metavar="POLICY", rich_help_panel=RANKS,
            help="ratio: the latent sizes above | energy:T: per layer the smallest rank keeping fraction T of "
                 "||W||^2 | error:E: per layer the smallest rank with relative Frobenius error <= E | "
                 "params:P / macs:P: the factorized layers together keep fraction P of their params (MACs per "
                 "output position), ranks allocated greedily by squared-error drop per unit cost.")], "ratio"),
        opt("rank_multiple", Annotated[int, typer.Option(
            "--rank-multiple", min=1, metavar="N", rich_help_panel=RANKS,
            help="Round ranks to multiples of N (hardware-friendly 8/16/64), never past break-even or the "
                 "budget.")], 1),
        opt("rank_pins", Annotated[list[str], typer.Option(
            "--rank", metavar="GLOB=R", rich_help_panel=RANKS,
            help="Pin rank R for layers matching GLOB (repeatable; first match wins; break-even still applies).")],
            []),
        opt("max_layer_error", Annotated[float | None, typer.Option(
            "--max-layer-error", metavar="E", rich_help_panel=GATES,
            help="Fail (exit 1) if any layer's relative error exceeds E.")], None),
        opt("max_total_error", Annotated[float | None, typer.Option(
            "--max-total-error", metavar="E", rich_help_panel=GATES,
            help="Fail if the energy-weighted total relative error exceeds E.")], None),
        opt("min_param_reduction", Annotated[float | None, typer.Option(
            "--min-param-reduction", metavar="R", rich_help_panel=GATES,
            help="Fail if the checkpoint's parameters shrink by less than fraction R.")], None),
        opt("calibration", Annotated[str | None, typer.Option(
            "--calibration", metavar="STATS", rich_help_panel=RANKS,
            help="Activation statistics (from factorize_cli.collect_activation_stats): factorize each covered "
                 "layer to minimise its output error ||(W - W')X|| instead of its weight error; policies and "
                 "gates then speak of output error.")], None),
        opt("svd", Annotated[str, typer.Option(
            "--svd", metavar="ENGINE", rich_help_panel=COMPUTE,
            help="auto (default: LAPACK SVD for small matrices, Gram eigendecomposition for large ones, "
                 "checked to be within 0.1% of the optimal error) | exact | gram | randomized (seeded).")],
            "auto"),
        opt("device", Annotated[str, typer.Option(
            "--device", metavar="DEVICE", rich_help_panel=COMPUTE,
            help="cpu, or cuda[:N] to run the decompositions on a GPU (falls back to the CPU with a note).")],
            "cpu"),
        opt("seed", Annotated[int, typer.Option(
            "--seed", rich_help_panel=COMPUTE, help="Seed of the randomized engine (results are reproducible).")],
            0),
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
                 include: list[str], exclude: list[str], transposed: list[str], not_transposed: list[str],
                 latent_features: str, latent_channels: str,
                 rank_policy: str, rank_multiple: int, rank_pins: list[str], max_layer_error: float | None,
                 max_total_error: float | None, min_param_reduction: float | None, svd: str, device: str,
                 seed: int, calibration: str | None) -> Any:
    from factorize_cli.config import (FactorizeConfig, Gates, Latent, RankPin, RatioPolicy, SelectionConfig,
                                      parse_policy)

    ratio = RatioPolicy(latent_features=Latent.parse(latent_features), latent_channels=Latent.parse(latent_channels))
    return FactorizeConfig(
        selection=SelectionConfig(factorize_linears=factorize_linears, factorize_convs=factorize_convs,
                                  min_features=min_features, min_channels=min_channels,
                                  include=tuple(include), exclude=tuple(exclude), transposed=tuple(transposed),
                                  not_transposed=tuple(not_transposed)),
        policy=parse_policy(rank_policy, ratio),
        pins=tuple(RankPin.parse(p) for p in rank_pins),
        rank_multiple=rank_multiple,
        gates=Gates(max_layer_error=max_layer_error, max_total_error=max_total_error,
                    min_param_reduction=min_param_reduction),
        svd=svd,
        device=_device(device),
        seed=seed,
        calibration=calibration,
    )


def _device(requested: str) -> str:
    import sys

    from factorize_cli.devices import resolve_device

    device, note = resolve_device(requested)
    if note:
        print(f"factorize: note: {note}", file=sys.stderr)
    return device


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No table, no progress; errors only.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout (one checkpoint).")]
Jsonl = Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per checkpoint on stdout: input, status, "
                                                     "exit_code, output, report, totals, gates, error.")]
HtmlPath = Annotated[str | None, typer.Option(
    "--html", metavar="PATH", help="Write a self-contained HTML report with spectra and the error-versus-size "
                                   "curve (needs matplotlib: the 'plot' extra).")]
Globs = Annotated[list[str] | None, typer.Option(
    "--glob", metavar="PATTERN", show_default=False,
    help="File patterns to pick in searched folders (repeatable; default *.safetensors *.pt *.pth *.bin *.ckpt *.jit *.pt2).")]
ReportPath = Annotated[str | None, typer.Option("--report", metavar="PATH", help="Write the JSON report here.")]
Force = Annotated[bool, typer.Option(
    "--force", "-f", help="Replace existing outputs (a folder only when factorize wrote it; never an input).")]

TEXT = "Text data (Hugging Face folders)"
Samples = Annotated[int, typer.Option("--samples", min=1, metavar="N", rich_help_panel=TEXT,
                                      help="Use the first N samples.")]
SeqLen = Annotated[int, typer.Option("--seq-len", min=1, metavar="L", rich_help_panel=TEXT,
                                     help="Truncate each sample to L tokens.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, metavar="B", rich_help_panel=TEXT,
                                        help="Samples per forward pass.")]

PROGRAMS = "Program inputs (TorchScript and .pt2)"
Method = Annotated[str, typer.Option(
    "--method", metavar="NAME", rich_help_panel=PROGRAMS,
    help="Run the inputs' calls through this exported method of a TorchScript archive instead of forward.")]
Reset = Annotated[str | None, typer.Option(
    "--reset", metavar="METHOD", rich_help_panel=PROGRAMS, show_default=False,
    help="Call METHOD() (e.g. reset_states) before each sequence of calls; a sequence runs in order, its state "
         "carried from call to call.")]


def entry(method: str, reset: str | None) -> Any:
    """The --method/--reset pair as a graphs.calls.Entry."""
    from factorize_cli.graphs.calls import Entry

    return Entry(method, reset)
