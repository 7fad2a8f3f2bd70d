"""``factorize plan``: the dry run."""

from pathlib import Path
from typing import Annotated, Any

import typer

from factorize_cli.cli import app
from factorize_cli.cli.options import JsonOut, Quiet, ReportPath, factorize_options

EPILOG = """\
Examples:

  factorize plan model.safetensors

  factorize plan ckpt.pt --min-features 256 --latent-features 0.3 --json | jq .totals

  factorize plan shards/ --exclude 'lm_head' --report plan.json

  factorize plan model.safetensors --rank-policy params:0.8 --max-total-error 0.3   (a CI gate)
"""


@app.command(epilog=EPILOG)
@factorize_options
def plan(
    checkpoint: Annotated[Path, typer.Argument(help="A torch.save file, a .safetensors file or a sharded directory.",
                                               show_default=False)],
    config: Any = None,
    unsafe_pickle: bool = False,
    spectra: Annotated[bool | None, typer.Option(
        "--spectra/--no-spectra", show_default=False,
        help="Read singular values to predict each layer's error and scan weights for NaN/Inf. Default: only "
             "when the rank policy or an error gate needs them; otherwise the plan reads headers only.")] = None,
    json_out: JsonOut = False,
    report: ReportPath = None,
    quiet: Quiet = False,
) -> None:
    """Show which layers would be factorized, at what rank, and the predicted error (writes nothing)."""
    from factorize_cli.atomic import write_text_atomic
    from factorize_cli.cli.render import RichProgress, show
    from factorize_cli.pipeline import plan_checkpoint, raise_for_gates
    from factorize_cli.report import dumps

    result = plan_checkpoint(checkpoint, config, spectra=spectra, unsafe_pickle=unsafe_pickle,
                             progress=RichProgress(enabled=not quiet))
    text = dumps(result)
    if report:
        write_text_atomic(Path(report), text)
    show(result, quiet=quiet)
    if json_out:
        print(text, end="")
    raise_for_gates(result)
