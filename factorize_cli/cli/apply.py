"""``factorize apply``: write the factorized checkpoint and its report."""

from pathlib import Path
from typing import Annotated, Any

import typer

from factorize_cli.cli import app
from factorize_cli.cli.options import (TEXT, BatchSize, Force, Globs, HtmlPath, Jsonl, JsonOut, Method, Quiet,
                                      ReportPath, Reset, Samples, SeqLen, factorize_options)

EPILOG = """\
Examples:

  factorize apply model.pt model.lowrank.pt --latent-channels 0.25

  factorize apply model.safetensors small.safetensors --rank-policy energy:0.9 --rank-multiple 8

  factorize apply shards/ shards-lowrank/ --exclude 'lm_head'      (a sharded directory)

  factorize apply all-MiniLM-L6-v2/ minilm-small/                  (a model folder: config, tokenizer... copied)

  factorize apply ckpts/ small/ --jsonl                            (mirror every checkpoint under ckpts/)

  cat model.safetensors | factorize apply - small.safetensors

  factorize apply model.jit small.jit --verify randn:1,16000 --verify-tol 0.05   (TorchScript)

  factorize apply silero_vad.jit small.jit --verify calls.pt --reset reset_states
      (--verify on the calls of an inputs file, as calibrate takes)

  torchrun --nproc-per-node 4 -m factorize_cli apply llama/ llama-small/ --rank-policy params:0.8
      (four processes, each factorizing its share of the layers; rank 0 writes; see README "Scaling out")

  factorize apply all-MiniLM-L6-v2/ small/ --data sentences.txt --rank-policy params:0.8 --include 'encoder.*'
      (a Hugging Face folder calibrated on text and factorized layer by layer, in one command)
"""


@app.command(epilog=EPILOG)
@factorize_options
def apply(
    checkpoints: Annotated[list[str], typer.Argument(
        metavar="CHECKPOINT... OUTPUT", show_default=False,
        help="Inputs (files, sharded directories, Hugging Face model folders, folders to search, or - for "
             "stdin), then where to write: .safetensors, .pt/.pth/.bin/.ckpt (keeps the input's container), or "
             "a directory (sharded safetensors; a model folder of the same shape for a model folder). Several "
             "inputs or a searched folder: OUTPUT is a folder mirroring their paths.")],
    config: Any = None,
    unsafe_pickle: bool = False,
    force: Force = False,
    globs: Globs = None,
    report: ReportPath = None,
    html: HtmlPath = None,
    verify: Annotated[list[str] | None, typer.Option(
        "--verify", metavar="SPEC", show_default=False,
        help="Graph inputs only: run the original and the result on inputs built from SPEC (randn:1,3,224,224; "
             "one per positional input, repeatable), or on the calls of an inputs file (as calibrate takes; with "
             "--method/--reset), in a fresh process; the differences go into the report.")] = None,
    verify_tol: Annotated[float, typer.Option(
        "--verify-tol", metavar="TOL", help="Fail (exit 1, no output) when --verify's max relative output "
                                            "difference exceeds TOL.")] = 0.1,
    data: Annotated[Path | None, typer.Option(
        "--data", metavar="DATA", rich_help_panel=TEXT, show_default=False,
        help="Run the model on DATA to calibrate and factorize in one go: whitened factors, budgets weighed by "
             "each layer's measured effect on the output, and layer by layer refits. Hugging Face folders: text "
             "(a .txt file, one sample per line; a .jsonl with a 'text' field; or a folder of .txt files); "
             "TorchScript and .pt2: a torch.save file of calls, as `factorize calibrate` takes.")] = None,
    sequential: Annotated[bool, typer.Option(
        "--sequential/--no-sequential", rich_help_panel=TEXT,
        help="With --data: factorize in forward order, each layer refit (least squares) to the original layer's "
             "outputs on the inputs the already factorized layers give it; --no-sequential whitens every layer "
             "by its inputs in the original model.")] = True,
    method: Method = "forward",
    reset: Reset = None,
    samples: Samples = 512,
    seq_len: SeqLen = 256,
    batch_size: BatchSize = 8,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Keep each finished layer in a journal beside the output (.OUTPUT.factorize-journal) and "
                         "continue from it when an earlier run of the same command was interrupted; under torchrun "
                         "the journal is always kept.")] = False,
    json_out: JsonOut = False,
    jsonl: Jsonl = False,
    quiet: Quiet = False,
) -> None:
    """Factorize the selected layers; write each checkpoint atomically, with its JSON report."""
    from factorize_cli.batch import DEFAULT_GLOBS, apply_jobs, materialized
    from factorize_cli.cli.plan import _single_only
    from factorize_cli.cli.render import RichProgress
    from factorize_cli.cli.options import entry
    from factorize_cli.cli.run import run_jobs
    from factorize_cli.errors import UsageError
    from factorize_cli.pipeline import apply_checkpoint

    if len(checkpoints) < 2:
        raise UsageError("apply needs CHECKPOINT... OUTPUT (see 'factorize apply --help')")
    *inputs, output = checkpoints
    calls = entry(method, reset)
    if not calls.is_default and not verify and data is None:
        raise UsageError("--method and --reset say how to run the calls of --verify FILE or --data FILE; give one")
    if resume and "-" in inputs:
        raise UsageError("--resume continues from a journal of the same input, and stdin is read afresh each "
                         "time: give a path")
    jobs = apply_jobs(inputs, Path(output), tuple(globs or DEFAULT_GLOBS))
    _single_only(len(jobs), json_out=json_out, report=report, html=html)

    text = None
    if data is not None:
        from factorize_cli.textdata import TextDataConfig

        text = TextDataConfig(samples=samples, seq_len=seq_len, batch_size=batch_size)

    def work(job):
        job.output.parent.mkdir(parents=True, exist_ok=True)
        with materialized(job.source) as path:
            return apply_checkpoint(path, job.output, config, force=force, report_path=report or job.report,
                                    html_path=html, unsafe_pickle=unsafe_pickle,
                                    progress=RichProgress(enabled=not quiet),
                                    label="<stdin>" if job.source == "-" else None,
                                    verify=verify or (), verify_tol=verify_tol, data=data, text=text,
                                    sequential=sequential, entry=calls, resume=resume)

    raise typer.Exit(run_jobs(jobs, work, quiet=quiet, jsonl=jsonl, json_out=json_out))
