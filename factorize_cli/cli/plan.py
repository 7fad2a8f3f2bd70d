"""``factorize plan``: the dry run."""

from typing import Annotated, Any

import typer

from factorize_cli.cli import app
from factorize_cli.cli.options import Force, Globs, HtmlPath, Jsonl, JsonOut, Quiet, ReportPath, factorize_options

EPILOG = """\
Examples:

  factorize plan model.safetensors

  factorize plan ckpt.pt --min-features 256 --latent-features 0.3 --json | jq .totals

  factorize plan model.safetensors --rank-policy params:0.8 --max-total-error 0.3   (a CI gate)

  factorize plan ckpts/ --jsonl | jq -c '{input, status}'          (every checkpoint under ckpts/)

  curl -sL https://example.com/model.safetensors | factorize plan -
"""


@app.command(epilog=EPILOG)
@factorize_options
def plan(
    checkpoints: Annotated[list[str], typer.Argument(
        metavar="CHECKPOINT...", show_default=False,
        help="torch.save files, .safetensors files, sharded directories, Hugging Face model folders, "
             "folders to search, or - for stdin.")],
    config: Any = None,
    unsafe_pickle: bool = False,
    spectra: Annotated[bool | None, typer.Option(
        "--spectra/--no-spectra", show_default=False,
        help="Read singular values to predict each layer's error and scan weights for NaN/Inf. Default: only "
             "when the rank policy or an error gate needs them; otherwise the plan reads headers only.")] = None,
    globs: Globs = None,
    json_out: JsonOut = False,
    jsonl: Jsonl = False,
    report: ReportPath = None,
    html: HtmlPath = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Show which layers would be factorized, at what rank, and the predicted error (writes no checkpoint)."""
    from factorize_cli.batch import DEFAULT_GLOBS, materialized, plan_jobs
    from factorize_cli.cli.render import RichProgress
    from factorize_cli.cli.run import run_jobs
    from factorize_cli.errors import UsageError
    from factorize_cli.pipeline import plan_checkpoint
    from factorize_cli.report import raise_for_gates

    jobs = plan_jobs(checkpoints, tuple(globs or DEFAULT_GLOBS))
    _single_only(len(jobs), json_out=json_out, report=report, html=html)
    if html and spectra is False:
        raise UsageError("--html shows spectra; drop --no-spectra")
    spectra = True if html else spectra

    def work(job):
        with materialized(job.source) as path:
            result = plan_checkpoint(path, config, spectra=spectra, unsafe_pickle=unsafe_pickle,
                                     progress=RichProgress(enabled=not quiet),
                                     label="<stdin>" if job.source == "-" else None,
                                     report_path=report, html_path=html, force=force)
        raise_for_gates(result)
        return result

    raise typer.Exit(run_jobs(jobs, work, quiet=quiet, jsonl=jsonl, json_out=json_out))


def _single_only(count: int, *, json_out: bool, report: str | None, html: str | None) -> None:
    from factorize_cli.errors import UsageError

    if count > 1 and (json_out or report or html):
        raise UsageError("--json, --report and --html take one checkpoint; use --jsonl for several")

