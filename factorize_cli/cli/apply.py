"""``factorize apply``: write the factorized checkpoint and its report."""

from pathlib import Path
from typing import Annotated, Any

import typer

from factorize_cli.cli import app
from factorize_cli.cli.options import JsonOut, Quiet, ReportPath, factorize_options

EPILOG = """\
Examples:

  factorize apply model.pt model.lowrank.pt --latent-channels 0.25

  factorize apply model.safetensors small.safetensors --min-features 256 --latent-features 0.3

  factorize apply shards/ shards-lowrank/ --exclude 'lm_head' --force

  factorize apply model.safetensors small.safetensors --rank-policy energy:0.9 --rank-multiple 8
"""


@app.command(epilog=EPILOG)
@factorize_options
def apply(
    checkpoint: Annotated[Path, typer.Argument(help="A torch.save file, a .safetensors file or a sharded directory.",
                                               show_default=False)],
    output: Annotated[Path, typer.Argument(
        help="Where to write: .safetensors, .pt/.pth/.bin (keeps the input's container), or a directory "
             "(sharded safetensors).", show_default=False)],
    config: Any = None,
    unsafe_pickle: bool = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
    report: ReportPath = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Factorize the selected layers; write the checkpoint atomically, and its JSON report."""
    from factorize_cli.cli.render import RichProgress, show
    from factorize_cli.pipeline import apply_checkpoint
    from factorize_cli.report import dumps

    result = apply_checkpoint(checkpoint, output, config, force=force, report_path=report,
                              unsafe_pickle=unsafe_pickle, progress=RichProgress(enabled=not quiet))
    show(result, quiet=quiet)
    if json_out:
        print(dumps(result), end="")
