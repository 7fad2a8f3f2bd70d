"""``factorize calibrate``: activation statistics for --calibration, from a Hugging Face folder run on text,
or a TorchScript / .pt2 program run on the calls of an inputs file (graphs/calls.py)."""

import json
from pathlib import Path
from typing import Annotated

import typer

from factorize_cli.cli import app
from factorize_cli.cli.options import BatchSize, Method, Reset, Samples, SeqLen

EPILOG = """\
Examples:

  factorize calibrate gpt2/ texts.jsonl stats.safetensors --samples 256 --seq-len 512

  factorize apply gpt2/model.safetensors small.safetensors --calibration stats.safetensors --rank-policy params:0.8

  factorize calibrate model.jit calls.pt stats.safetensors

  torchrun --nproc-per-node 4 -m factorize_cli calibrate llama/ texts.jsonl stats.safetensors
      (four processes, each running the model on its share of the batches; rank 0 writes the summed statistics)

MODEL a Hugging Face folder (config.json, tokenizer, weights): DATA is text, tokenized with the folder's
tokenizer: a text file (one sample per non-empty line), a .jsonl file (a "text" field per record) or a folder
of .txt files. Statistics are keyed by the layer names of the folder's checkpoint, as apply reads them.

  factorize calibrate silero_vad.jit calls.pt stats.safetensors --reset reset_states

MODEL a TorchScript archive or .pt2 program: DATA is a torch.save file (loaded with weights_only=True) of
calls: a tensor (one call); a list of calls (one sequence, run in order); or {"sequences": a list of such lists}.
A call is a tensor, a tuple of positional arguments, or {"args": (...), "kwargs": {...}}; arguments are
tensors, int, float, bool, str, None, or lists/tuples/dicts of them. --method NAME calls that method instead
of forward (TorchScript); --reset METHOD runs METHOD() before each sequence. The same file works for
apply --data, apply --verify and evaluate. Under torchrun a program's sequences are dealt out whole (a
sequence may carry state): a file of one sequence runs on rank 0 alone.
"""

@app.command(epilog=EPILOG)
def calibrate(
    model: Annotated[Path, typer.Argument(
        help="A Hugging Face model folder, a TorchScript archive or a torch.export .pt2 program.",
        show_default=False)],
    inputs: Annotated[Path, typer.Argument(
        metavar="DATA", help="Text (for a folder) or a torch.save file of calls (for a program).", show_default=False)],
    stats: Annotated[Path, typer.Argument(help="Where to write the statistics (.safetensors).", show_default=False)],
    samples: Samples = 512,
    seq_len: SeqLen = 256,
    batch_size: BatchSize = 8,
    device: Annotated[str, typer.Option("--device", help="Run the model on this device (cpu, cuda[:N]).")] = "cpu",
    sensitivity: Annotated[bool, typer.Option(
        "--sensitivity/--no-sensitivity", help="Folders: also measure each layer's effect on the model output (one "
                                               "forward pass of the first 64 samples per layer), which apply's "
                                               "budgets weigh layers by.")] = True,
    method: Method = "forward",
    reset: Reset = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing STATS file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Run the model on data and record each layer's input second moment."""
    import sys

    from factorize_cli import distributed
    from factorize_cli.cli.options import _device, entry
    from factorize_cli.errors import UsageError
    from factorize_cli.hf import is_model_folder

    group = distributed.current(_device(device))  # joined first: under torchrun only rank 0 prints, errors too
    quiet = quiet or not group.lead
    calls = entry(method, reset)
    if is_model_folder(model):
        if not calls.is_default:
            raise UsageError("--method and --reset are for TorchScript and .pt2 programs, not model folders")
        from factorize_cli.cli.render import RichProgress
        from factorize_cli.hfcalibrate import calibrate_folder
        from factorize_cli.textdata import TextDataConfig

        config = TextDataConfig(samples=samples, seq_len=seq_len, batch_size=batch_size)
        summary = calibrate_folder(model, inputs, stats, config=config, device=_device(device), force=force,
                                   progress=RichProgress(not quiet), sensitivity=sensitivity)
    else:
        from factorize_cli.graphs.calibrate import calibrate_checkpoint

        summary = calibrate_checkpoint(model, inputs, stats, entry=calls, device=_device(device), force=force)
    if summary is None:  # a rank other than 0: rank 0 wrote the statistics and reports them
        return
    if not quiet:
        rows = sum(summary["layers"].values())
        ranks = f" on {group.world} processes" if group.distributed else ""
        print(f"wrote {summary['stats']}: {len(summary['layers'])} layers, {summary['batches']} batches, "
              f"{rows} input rows{ranks}", file=sys.stderr)
        if "note" in summary:
            print(f"note: {summary['note']}", file=sys.stderr)
    print(json.dumps(summary))
