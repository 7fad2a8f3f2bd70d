"""``factorize calibrate``: activation statistics for --calibration, from a Hugging Face folder run on text,
or a TorchScript / .pt2 program run on saved input batches."""

import json
from pathlib import Path
from typing import Annotated

import typer

from factorize_cli.cli import app
from factorize_cli.cli.options import BatchSize, Samples, SeqLen

EPILOG = """\
Examples:

  factorize calibrate gpt2/ texts.jsonl stats.safetensors --samples 256 --seq-len 512

  factorize apply gpt2/model.safetensors small.safetensors --calibration stats.safetensors --rank-policy params:0.8

  factorize calibrate model.jit batches.pt stats.safetensors

MODEL a Hugging Face folder (config.json, tokenizer, weights): DATA is text, tokenized with the folder's
tokenizer: a text file (one sample per non-empty line), a .jsonl file (a "text" field per record) or a folder
of .txt files. Statistics are keyed by the layer names of the folder's checkpoint, as apply reads them.

MODEL a TorchScript archive or .pt2 program: DATA is a torch.save of a tensor (one batch) or of a list of
batches, each a tensor or a tuple of positional inputs, loaded with weights_only=True.
"""

@app.command(epilog=EPILOG)
def calibrate(
    model: Annotated[Path, typer.Argument(
        help="A Hugging Face model folder, a TorchScript archive or a torch.export .pt2 program.",
        show_default=False)],
    inputs: Annotated[Path, typer.Argument(
        metavar="DATA", help="Text (for a folder) or torch.save'd input batches (for a program).", show_default=False)],
    stats: Annotated[Path, typer.Argument(help="Where to write the statistics (.safetensors).", show_default=False)],
    samples: Samples = 512,
    seq_len: SeqLen = 256,
    batch_size: BatchSize = 8,
    device: Annotated[str, typer.Option("--device", help="Run the model on this device (cpu, cuda[:N]).")] = "cpu",
    sensitivity: Annotated[bool, typer.Option(
        "--sensitivity/--no-sensitivity", help="Folders: also measure each layer's effect on the model output (one "
                                               "forward pass of the first 64 samples per layer), which apply's "
                                               "budgets weigh layers by.")] = True,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing STATS file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Run the model on data and record each layer's input second moment."""
    import sys

    from factorize_cli.cli.options import _device
    from factorize_cli.hf import is_model_folder

    if is_model_folder(model):
        from factorize_cli.cli.render import RichProgress
        from factorize_cli.hfcalibrate import calibrate_folder
        from factorize_cli.textdata import TextDataConfig

        config = TextDataConfig(samples=samples, seq_len=seq_len, batch_size=batch_size)
        summary = calibrate_folder(model, inputs, stats, config=config, device=_device(device), force=force,
                                   progress=RichProgress(not quiet), sensitivity=sensitivity)
    else:
        from factorize_cli.graphs.calibrate import calibrate_checkpoint

        summary = calibrate_checkpoint(model, inputs, stats, device=_device(device), force=force)
    if not quiet:
        rows = sum(summary["layers"].values())
        print(f"wrote {summary['stats']}: {len(summary['layers'])} layers, {summary['batches']} batches, "
              f"{rows} input rows", file=sys.stderr)
    print(json.dumps(summary))
