"""How far a factorized model's outputs are from the original's, on real data (``factorize evaluate``).

Hugging Face folders (both loaded with :func:`factorize_cli.hf.load_pretrained`, run on the same token
batches from :mod:`factorize_cli.textdata`); the task comes from the model class:

- causal LMs (``*ForCausalLM``, ``*LMHeadModel``): the perplexity of each (next-token cross-entropy,
  token-weighted over the positions whose target is a real token), and the mean KL(original ||
  factorized) of the next-token distributions over the same positions, in nats;
- sequence classifiers (``*ForSequenceClassification``): the fraction of samples whose predicted class
  agrees;
- any other model (encoders): the mean and min cosine between the mean-pooled (attention-mask weighted)
  last hidden states.

TorchScript archives and ``.pt2`` programs run on the calls of an inputs file: mean and min cosine between the
outputs, per sample (row of each output tensor), and their relative error ``||a - b|| / ||a||`` over
all outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factorize_cli.errors import InputError, describe
from factorize_cli.progress import Progress, Silent
from factorize_cli.textdata import TextDataConfig

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
ENCODER = "encoder"
PROGRAM = "program"


def task_of(class_name: str) -> str:
    """What ``evaluate`` measures for a transformers model class."""
    if class_name.endswith("ForCausalLM") or class_name.endswith("LMHeadModel"):
        return CAUSAL_LM
    if class_name.endswith("ForSequenceClassification"):
        return SEQUENCE_CLASSIFICATION
    return ENCODER


@dataclass(frozen=True)
class EvaluationConfig:
    data: TextDataConfig = field(default_factory=TextDataConfig)
    device: str = "cpu"


# -- accumulators: one per task, fed batch by batch (no logits are kept across batches) --------------


class _CausalLM:
    def __init__(self) -> None:
        self.nll = [0.0, 0.0]  # original, factorized: summed next-token cross-entropy
        self.kl = 0.0
        self.tokens = 0

    def add(self, batch: dict, original: Any, factorized: Any) -> None:
        import torch

        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        scored = (mask[:, 1:] if mask is not None else torch.ones_like(ids[:, 1:])).bool()
        targets = ids[:, 1:][scored]
        logps = []
        for i, out in enumerate((original, factorized)):
            logp = torch.log_softmax(out.logits[:, :-1].float()[scored], dim=-1)  # (scored positions, vocab)
            self.nll[i] += float(-logp.gather(1, targets[:, None]).sum())
            logps.append(logp)
        p, q = logps
        self.kl += float((p.exp() * (p - q)).sum())
        self.tokens += int(scored.sum())

    def result(self) -> dict[str, Any]:
        if not self.tokens:
            raise InputError("no tokens to predict: every sample is a single token")
        ppl = [math.exp(n / self.tokens) for n in self.nll]
        return {"tokens": self.tokens, "perplexity_original": ppl[0], "perplexity_factorized": ppl[1],
                "perplexity_ratio": ppl[1] / ppl[0], "kl_divergence": self.kl / self.tokens}

    @staticmethod
    def line(m: dict[str, Any]) -> str:
        return (f"perplexity {m['perplexity_original']:.4g} -> {m['perplexity_factorized']:.4g} "
                f"({(m['perplexity_ratio'] - 1) * 100:+.2f}%), KL {m['kl_divergence']:.4g} nats/token "
                f"over {m['tokens']} tokens")


class _Classifier:
    def __init__(self) -> None:
        self.agree = 0
        self.samples = 0

    def add(self, batch: dict, original: Any, factorized: Any) -> None:
        a, b = original.logits.argmax(-1), factorized.logits.argmax(-1)
        self.agree += int((a == b).sum())
        self.samples += int(a.numel())

    def result(self) -> dict[str, Any]:
        return {"samples": self.samples, "agreement": self.agree / self.samples}

    @staticmethod
    def line(m: dict[str, Any]) -> str:
        return f"predicted class agrees on {m['agreement'] * 100:.2f}% of {m['samples']} samples"


class _Cosines:
    """Cosine per sample (mean-pooled hidden states, or rows of program outputs) and the relative error."""

    def __init__(self) -> None:
        self.cosines: list[float] = []
        self.diff = 0.0  # sum ||a - b||^2
        self.norm = 0.0  # sum ||a||^2

    def rows(self, a: Any, b: Any) -> None:
        import torch

        a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
        self.cosines += torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30).tolist()
        self.diff += float((a - b).square().sum())
        self.norm += float(a.square().sum())

    def add(self, batch: dict, original: Any, factorized: Any) -> None:
        self.rows(_pooled(original, batch), _pooled(factorized, batch))

    def result(self) -> dict[str, Any]:
        return {"samples": len(self.cosines), "cosine_mean": sum(self.cosines) / len(self.cosines),
                "cosine_min": min(self.cosines),
                "relative_error": math.sqrt(self.diff / self.norm) if self.norm else 0.0}

    @staticmethod
    def line(m: dict[str, Any]) -> str:
        return (f"cosine mean {m['cosine_mean']:.4f}, min {m['cosine_min']:.4f}, relative error "
                f"{m['relative_error']:.4g} over {m['samples']} samples")


def _pooled(output: Any, batch: dict) -> Any:
    """Mean of the last hidden states over the real tokens of each sample."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output.hidden_states[-1]
    hidden = hidden.double()
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.mean(1)
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


ACCUMULATORS = {CAUSAL_LM: _CausalLM, SEQUENCE_CLASSIFICATION: _Classifier, ENCODER: _Cosines}


def _ticking(batches: Iterable[Any], progress: Progress) -> Iterator[tuple[int, Any]]:
    for i, batch in enumerate(batches, 1):
        yield i, batch
        progress.advance(f"batch {i}")


# -- Hugging Face folders ---------------------------------------------------------------------------


def evaluate_folders(original: str | Path, factorized: str | Path, data: str | Path,
                     config: EvaluationConfig = EvaluationConfig(), progress: Progress | None = None) -> dict[str, Any]:
    """Run both folders' models on DATA and compare them; the measures depend on the task (see module)."""
    import torch

    from factorize_cli.hf import is_model_folder, load_pretrained, model_class
    from factorize_cli.textdata import load_tokenizer, text_batches

    original, factorized, data = Path(original), Path(factorized), Path(data)
    for folder in (original, factorized):
        if not is_model_folder(folder):
            raise InputError(f"{folder}: not a Hugging Face model folder (no config.json)")
    classes = [model_class(folder)[1].__name__ for folder in (original, factorized)]
    if classes[0] != classes[1]:
        raise InputError(f"{factorized}: a {classes[1]}, but {original} is a {classes[0]}")
    task = task_of(classes[0])
    try:
        tokenizer = load_tokenizer(original)
    except InputError:
        tokenizer = load_tokenizer(factorized)  # only the factorized folder may carry it
    batches = text_batches(original, data, config.data, config.device, tokenizer=tokenizer)
    models = [load_pretrained(folder, device=config.device) for folder in (original, factorized)]
    accumulator = ACCUMULATORS[task]()
    progress = progress or Silent()
    progress.start("evaluating", len(batches))
    try:
        with torch.no_grad():
            for i, batch in _ticking(batches, progress):
                outputs = [_run(model, batch, task, folder, data)
                           for model, folder in zip(models, (original, factorized))]
                accumulator.add(batch, *outputs)
    finally:
        progress.stop()
    return {"task": task, "model_class": classes[0], "original": str(original), "factorized": str(factorized),
            "data": str(data), "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
            "batches": len(batches), "seq_len": config.data.seq_len, "metrics": accumulator.result(),
            "summary": f"{task}: " + accumulator.line(accumulator.result())}


def _run(model: Any, batch: dict, task: str, folder: Path, data: Path) -> Any:
    try:
        return model(**batch, output_hidden_states=task == ENCODER)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise InputError(f"{folder}: running the model on {data} failed ({describe(e)})") from e


# -- TorchScript / .pt2 -----------------------------------------------------------------------------


def _tensors(value: Any) -> list[Any]:
    """The tensors of a model output, in a fixed order (nested tuples, lists and dicts flattened)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in value for t in _tensors(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _runner(path: Path, device: str, calls: Any) -> Any:
    from factorize_cli.formats import open_checkpoint
    from factorize_cli.graphs.format import BY_NAME

    with open_checkpoint(path) as checkpoint:
        graph = BY_NAME.get(checkpoint.format)
        if graph is None:
            raise InputError(f"{path}: a {checkpoint.format} checkpoint holds no code to run; evaluate takes Hugging "
                             "Face folders, TorchScript archives and .pt2 programs")
        module = graph.module_of(checkpoint.container).to(device)
        calls.check(module, graph.what, path)
        return module.eval() if checkpoint.format == "torchscript" else module


def evaluate_programs(original: str | Path, factorized: str | Path, inputs: str | Path, *, entry: Any = None,
                      device: str = "cpu", progress: Progress | None = None) -> dict[str, Any]:
    """Run two TorchScript / .pt2 programs on the calls of INPUTS (:mod:`factorize_cli.graphs.calls`; ``entry``
    their --method/--reset); cosine and relative error of the outputs, call by call."""
    import torch

    from factorize_cli.graphs.calls import Entry, load_calls, run

    original, factorized, inputs = Path(original), Path(factorized), Path(inputs)
    calls = load_calls(inputs, entry or Entry(), device)
    models = [_runner(path, device, calls) for path in (original, factorized)]
    accumulator = _Cosines()
    progress = progress or Silent()
    progress.start("evaluating", len(calls))
    try:
        with torch.no_grad():
            for _, call in _ticking(calls, progress):
                outs = []
                for model, path in zip(models, (original, factorized)):
                    try:
                        outs.append(_tensors(run(model, call, calls.entry)))
                    except Exception as e:  # TorchScript raises its own error types
                        raise InputError(f"{path}: running the model on {inputs} failed ({describe(e)})") from e
                if len(outs[0]) != len(outs[1]) or any(a.shape != b.shape for a, b in zip(*outs)):
                    raise InputError(f"{factorized}: its outputs do not have the shapes of {original}'s")
                for a, b in zip(*outs):
                    if a.is_floating_point() and a.dim() > 0:
                        accumulator.rows(a, b)
    finally:
        progress.stop()
    if not accumulator.cosines:
        raise InputError(f"{original}: the model returns no floating-point tensor to compare")
    result = accumulator.result()
    return {"task": PROGRAM, "original": str(original), "factorized": str(factorized), "data": str(inputs),
            "batches": len(calls), "sequences": len(calls.sequences), "calls": calls.entry.describe(),
            "metrics": result, "summary": f"{PROGRAM}: " + accumulator.line(result)}


# -- where the result goes --------------------------------------------------------------------------


def is_factorize_report(path: Path) -> bool:
    """A JSON report written by ``factorize plan/apply`` (it has ``layers`` and ``totals``)."""
    import json

    if not path.is_file():
        return False
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return isinstance(report, dict) and "layers" in report and "totals" in report


def check_evaluation_target(path: Path, inputs: list[Path], *, force: bool) -> bool:
    """Before any work: may the result go to ``path``? True when it goes into an existing factorize
    report (our own output: its ``evaluation`` field is set and the file rewritten, ``--force`` or not),
    False when it is a new JSON file (the output rule: an existing file only with ``--force``)."""
    from factorize_cli.outputs import check_apart, check_targets

    if is_factorize_report(path):
        check_apart(path, "evaluation report", inputs)
        return True
    check_targets({"evaluation report": path}, inputs, force=force)
    return False


def write_evaluation(result: dict[str, Any], path: Path, *, into_report: bool) -> None:
    """Write the result as checked by :func:`check_evaluation_target`, atomically."""
    import json

    from factorize_cli.atomic import write_text_atomic

    if into_report:
        report = json.loads(path.read_text(encoding="utf-8"))
        report["evaluation"] = result
        result = report
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
