"""``factorize calibrate``: activation statistics of a TorchScript or .pt2 model, for --calibration."""

import json
from pathlib import Path
from typing import Annotated

import typer

from factorize_cli.cli import app

EPILOG = """\
Examples:

  factorize calibrate model.jit batches.pt stats.safetensors

  factorize apply model.jit small.jit --calibration stats.safetensors --rank-policy params:0.8

BATCHES: torch.save of a tensor (one batch) or of a list of batches, each a tensor or a tuple of
positional inputs. It is loaded with weights_only=True.
"""


@app.command(epilog=EPILOG)
def calibrate(
    model: Annotated[Path, typer.Argument(help="A TorchScript archive or a torch.export .pt2 program.",
                                          show_default=False)],
    inputs: Annotated[Path, typer.Argument(help="torch.save'd input batches.", show_default=False)],
    stats: Annotated[Path, typer.Argument(help="Where to write the statistics (.safetensors).", show_default=False)],
    device: Annotated[str, typer.Option("--device", help="Run the model on this device (cpu, cuda[:N]).")] = "cpu",
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing STATS file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Run the model on input batches and record each layer's input second moment."""
    import sys

    from factorize_cli.cli.options import _device
    from factorize_cli.graphs.calibrate import calibrate_checkpoint

    summary = calibrate_checkpoint(model, inputs, stats, device=_device(device), force=force)
    if not quiet:
        rows = sum(summary["layers"].values())
        print(f"wrote {summary['stats']}: {len(summary['layers'])} layers, {summary['batches']} batches, "
              f"{rows} input rows", file=sys.stderr)
    print(json.dumps(summary))
