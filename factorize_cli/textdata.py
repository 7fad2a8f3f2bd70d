"""Text samples as token batches for a Hugging Face model folder (``calibrate`` and ``evaluate``).

DATA is one of:

- a text file: one sample per non-empty line;
- a JSONL file (``.jsonl``): one JSON object per non-empty line, its ``text`` field the sample;
- a folder: its ``*.txt`` files, sorted by name, each read as a text file.

The first ``samples`` samples are tokenized with the folder's own tokenizer (offline), ``batch_size``
at a time, truncated to ``seq_len`` tokens and padded on the right with an attention mask (a tokenizer
without a pad token, like GPT-2's, pads with its end-of-sequence token). The result is a list of dicts,
each usable as ``model(**batch)``; callers may iterate it several times.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from factorize_cli.errors import InputError, UsageError

JSONL_SUFFIXES = (".jsonl",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class TextDataConfig:
    samples: int | None = 512  # the first N samples (None: all of them)
    seq_len: int = 256  # tokens per sample at most
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def iter_samples(data: str | Path) -> Iterator[str]:
    """The samples of DATA, in order, read lazily (a bad record is reported when it is reached)."""
    data = Path(data)
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise InputError(f"{data}: no .txt files in this folder")
        for path in files:
            yield from _text_lines(path)
    elif data.is_file():
        yield from (_jsonl_records(data) if data.suffix.lower() in JSONL_SUFFIXES else _text_lines(data))
    else:
        raise InputError(f"{data}: no such file or folder")


def read_samples(data: str | Path, limit: int | None = None) -> list[str]:
    """The first ``limit`` samples of DATA (all with None); an error when there are none."""
    samples = list(islice(iter_samples(data), limit))
    if not samples:
        raise InputError(f"{data}: no text samples (empty lines do not count)")
    return samples


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _text_lines(path: Path) -> Iterator[str]:
    for _, line in _lines(path):
        yield line


def _jsonl_records(path: Path) -> Iterator[str]:
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except ValueError as e:
            raise InputError(f"{path}:{number}: not a JSON record ({e.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{path}:{number}: the record has no \"text\" string field")
        if text.strip():
            yield text


def load_tokenizer(folder: str | Path) -> Any:
    """The model folder's tokenizer (offline, no remote code), padding on the right with a pad token."""
    from factorize_cli.errors import describe
    from factorize_cli.hf import import_transformers

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); the data is "
                         "tokenized with the model folder's own tokenizer")
    transformers = import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                               trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a missing tokenizer
        raise InputError(f"{folder}: no tokenizer transformers can load offline ({describe(e, 160)})") from None
    if len(tokenizer) <= len(getattr(tokenizer, "all_special_tokens", ())):  # transformers 5 builds an empty one
        raise InputError(f"{folder}: the tokenizer transformers loads from this folder has no vocabulary")
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise InputError(f"{folder}: the tokenizer has neither a pad token nor an end-of-sequence token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenize(tokenizer: Any, samples: list[str], config: TextDataConfig, device: str = "cpu") -> list[dict]:
    """``samples`` as padded batches: dicts of tensors (``input_ids``, ``attention_mask``, ...) on ``device``."""
    batches = []
    for start in range(0, len(samples), config.batch_size):
        encoded = tokenizer(samples[start:start + config.batch_size], padding=True, truncation=True,
                            max_length=config.seq_len, return_tensors="pt")
        batch = {key: value.to(device) for key, value in encoded.items()}
        if batch["input_ids"].shape[1] == 0:
            raise InputError(f"samples {start + 1}-{start + len(samples[start:start + config.batch_size])} "
                             "give no tokens")
        batches.append(batch)
    return batches


def my_batches(batches: list[dict], group: Any) -> list[dict]:
    """This rank's share of the batches under torchrun (dealt by token count; all of them in one process)."""
    return [batches[i] for i in group.share([float(b["input_ids"].numel()) for b in batches])]


def text_batches(folder: str | Path, data: str | Path, config: TextDataConfig = TextDataConfig(),
                 device: str = "cpu", tokenizer: Any = None) -> list[dict]:
    """DATA's first samples, tokenized with ``folder``'s tokenizer, as batches for ``model(**batch)``."""
    samples = read_samples(data, config.samples)
    return tokenize(tokenizer if tokenizer is not None else load_tokenizer(folder), samples, config, device)
