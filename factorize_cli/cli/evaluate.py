"""``factorize evaluate``: the factorized model against the original, on real data."""

import json
from pathlib import Path
from typing import Annotated

import typer

from factorize_cli.cli import app
from factorize_cli.cli.options import BatchSize, Method, Reset, Samples, SeqLen

EPILOG = """\
Examples:

  factorize evaluate gpt2/ gpt2-small/ --data texts.jsonl --samples 256 --seq-len 512

  factorize evaluate model.jit small.jit --data calls.pt --report small.factorize.json

Hugging Face folders: DATA is text, tokenized with ORIGINAL's tokenizer (a text file, one sample per
non-empty line; a .jsonl file with a "text" field per record; or a folder of .txt files). Causal LMs:
perplexity of both and mean KL(original || factorized) of the next-token distributions; sequence
classifiers: agreement of the predicted class; other models: mean and min cosine of the mean-pooled last
hidden states. TorchScript / .pt2: DATA is a torch.save file of calls (as calibrate takes, with --method
and --reset); mean and min cosine and relative error of the outputs.

The result is printed as JSON on stdout, with one line on stderr.
"""

@app.command(epilog=EPILOG)
def evaluate(
    original: Annotated[Path, typer.Argument(
        help="The original: a Hugging Face folder, a TorchScript archive or a .pt2 program.", show_default=False)],
    factorized: Annotated[Path, typer.Argument(help="The factorized model, of the same kind.", show_default=False)],
    data: Annotated[Path, typer.Option("--data", metavar="DATA", show_default=False,
                                       help="Text (folders) or a torch.save file of calls (programs).")],
    samples: Samples = 512,
    seq_len: SeqLen = 256,
    batch_size: BatchSize = 8,
    device: Annotated[str, typer.Option("--device", help="Run the models on this device (cpu, cuda[:N]).")] = "cpu",
    method: Method = "forward",
    reset: Reset = None,
    report: Annotated[Path | None, typer.Option(
        "--report", metavar="R", show_default=False,
        help="Also write the result to R. When R is a factorize JSON report (from plan or apply: our own output), "
             "its \"evaluation\" field is set and the file rewritten in place, atomically; otherwise R is a new "
             "JSON file (an existing one only with --force).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing --report file that is not a "
                                                              "factorize report.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no summary line.")] = False,
) -> None:
    """Compare a factorized model with its original on data: perplexity and KL, class agreement, or cosine."""
    import sys

    from factorize_cli.cli.options import _device, entry
    from factorize_cli.cli.render import RichProgress
    from factorize_cli.errors import UsageError
    from factorize_cli.evaluation import check_evaluation_target, write_evaluation
    from factorize_cli.hf import is_model_folder

    inputs = [original, factorized, data]
    into_report = check_evaluation_target(report, inputs, force=force) if report is not None else False
    progress = RichProgress(not quiet)
    folders = [is_model_folder(p) for p in (original, factorized)]
    if any(folders):
        if not all(folders):
            odd = factorized if folders[0] else original
            raise UsageError(f"{odd}: not a Hugging Face model folder (no config.json), but the other model is one")
        if not entry(method, reset).is_default:
            raise UsageError("--method and --reset are for TorchScript and .pt2 programs, not model folders")
        from factorize_cli.evaluation import EvaluationConfig, evaluate_folders
        from factorize_cli.textdata import TextDataConfig

        config = EvaluationConfig(TextDataConfig(samples=samples, seq_len=seq_len, batch_size=batch_size),
                                  device=_device(device))
        result = evaluate_folders(original, factorized, data, config, progress)
    else:
        from factorize_cli.evaluation import evaluate_programs

        result = evaluate_programs(original, factorized, data, entry=entry(method, reset), device=_device(device),
                                   progress=progress)
    if report is not None:
        write_evaluation(result, report, into_report=into_report)
    if not quiet:
        where = f" ({'added to' if into_report else 'wrote'} {report})" if report is not None else ""
        print(result["summary"] + where, file=sys.stderr)
    print(json.dumps(result))
