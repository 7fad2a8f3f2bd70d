"""Text data for Hugging Face folders (files, JSONL, folders of .txt; tokenized with the folder's own
tokenizer) and ``factorize calibrate`` of a folder: statistics keyed by the checkpoint's layer names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factorize_cli.errors import InputError, UsageError
from factorize_cli.textdata import TextDataConfig, load_tokenizer, read_samples, text_batches

transformers = pytest.importorskip("transformers")

WORDS = "the a cat dog sat on mat ran fast slow red blue big small and or of to in".split()
TEXT = ["the cat sat on the mat", "the dog ran fast", "a big red cat and a small blue dog", "the mat"] * 5
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def word_tokenizer(pad: bool = False):
    """A whitespace word-level tokenizer over WORDS that saves and loads offline; GPT-2-like (no pad
    token) unless ``pad``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[UNK]", "<eos>"] + (["[PAD]"] if pad else [])
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", **extra)


def gpt2_folder(folder: Path, seed: int = 0, *, strip_prefix: bool = False) -> Path:
    """A tiny random GPT2LMHeadModel folder with a tokenizer. ``strip_prefix``: checkpoint keys without
    ``transformer.``, as in the original GPT-2 files on the hub (``h.0.attn.c_attn.weight``)."""
    from safetensors.torch import load_file, save_file

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(WORDS) + 2, n_positions=64,
                                     bos_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    if strip_prefix:
        weights = folder / "model.safetensors"
        state = load_file(weights)
        save_file({k.removeprefix("transformer."): v for k, v in state.items()}, weights, metadata={"format": "pt"})
    return folder


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# -- DATA: formats and errors ------------------------------------------------------------------------


def test_text_file_one_sample_per_non_empty_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\n\n  \nsecond line\r\nthird\n")
    assert read_samples(path) == ["first line", "second line", "third"]
    assert read_samples(path, 2) == ["first line", "second line"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert read_samples(path) == ["one", "two"]


@pytest.mark.parametrize("line, message", [
    ('{"content": "x"}', r"t\.jsonl:3: the record has no \"text\" string field"),
    ('["text"]', r"t\.jsonl:3: the record has no \"text\" string field"),
    ('{"text": 5}', r"t\.jsonl:3: the record has no \"text\" string field"),
    ("{not json", r"t\.jsonl:3: not a JSON record"),
])
def test_bad_jsonl_record_names_its_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "one"}\n\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        read_samples(path)


def test_folder_of_txt_files_in_sorted_order(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    write_lines(folder / "b.txt", ["b1", "b2"])
    write_lines(folder / "a.txt", ["a1"])
    (folder / "notes.md").write_text("ignored\n")
    assert read_samples(folder) == ["a1", "b1", "b2"]
    assert read_samples(folder, 2) == ["a1", "b1"]


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "empty.txt").write_text("\n \n"), "no text samples"),
    (lambda p: (p / "empty.jsonl").write_text(""), "no text samples"),
    (lambda p: (p / "folder").mkdir(), "no .txt files"),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00bad\n"), "not UTF-8 text"),
])
def test_empty_or_unreadable_data_is_one_error(tmp_path, make, message):
    before = set(tmp_path.iterdir())
    make(tmp_path)
    (path,) = set(tmp_path.iterdir()) - before
    with pytest.raises(InputError, match=message):
        read_samples(path)
    with pytest.raises(InputError, match="no such file or folder"):
        read_samples(tmp_path / "missing.txt")


def test_sizes_must_be_positive():
    with pytest.raises(UsageError, match="--seq-len must be at least 1"):
        TextDataConfig(seq_len=0)


# -- tokenization -------------------------------------------------------------------------------------


def test_batches_pad_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path):
    folder = gpt2_folder(tmp_path / "gpt2")
    data = write_lines(tmp_path / "t.txt", ["the cat sat on the mat", "the dog", "a b c d e f g h"])
    batches = text_batches(folder, data, TextDataConfig(samples=3, seq_len=5, batch_size=2))
    assert isinstance(batches, list) and [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    eos = load_tokenizer(folder).eos_token_id
    assert first["input_ids"].shape == (2, 5)  # truncated to --seq-len
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]  # padded on the right
    assert first["input_ids"][1, 2:].tolist() == [eos] * 3
    assert batches[1]["input_ids"].shape == (1, 5)  # unknown words are tokens too


def test_a_folder_without_a_tokenizer_is_one_error(tmp_path):
    folder = gpt2_folder(tmp_path / "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(InputError, match="no tokenizer files"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(InputError, match="no vocabulary|no tokenizer transformers can load"):
        load_tokenizer(folder)


# -- factorize calibrate MODEL_DIR DATA STATS -------------------------------------------------------


@pytest.mark.parametrize("strip_prefix", [False, True])
def test_calibrate_a_folder_keys_stats_by_checkpoint_names_and_apply_uses_them(cli, tmp_path, strip_prefix):
    from safetensors import safe_open

    from factorize_cli.calibration import StatsFile

    folder = gpt2_folder(tmp_path / "gpt2", strip_prefix=strip_prefix)
    data = write_lines(tmp_path / "t.txt", TEXT)
    stats = tmp_path / "stats.safetensors"
    r = cli("calibrate", folder, data, stats, "--batch-size", "3", "--samples", "12", "--seq-len", "6")
    assert r.code == 0, r.stderr
    prefix = "" if strip_prefix else "transformer."
    layers = [f"{prefix}h.{i}.{name}" for i in range(2) for name in CONV1D]
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {f"{layer}.weight" for layer in layers} <= keys
    # each layer saw the real tokens only (no padding): min(words, 6) per sample
    tokens = sum(min(len(s.split()), 6) for s in TEXT[:12])
    assert r.json["layers"] == {layer: tokens for layer in sorted(layers)}
    assert r.json["batches"] == 4 and r.json["samples"] == 12
    assert f"{len(layers)} layers, 4 batches" in r.stderr
    with StatsFile(stats) as file:
        assert set(file.layers) == set(layers)  # no lm_head: tied to the embeddings, not in the checkpoint

    out = tmp_path / "small.safetensors"
    r = cli("apply", folder / "model.safetensors", out, "--min-features", "1", "--calibration", stats, "--json", "-q")
    assert r.code == 0, r.stderr
    entries = {e["name"]: e for e in r.json["layers"] if e["action"] == "factorize"}
    assert set(entries) == set(layers)
    assert all(e["calibrated"] for e in entries.values())


def test_calibrate_statistics_equal_those_of_unpadded_samples(tmp_path):
    """Padding is left out: batches of 3 padded samples give the statistics of the samples run one by one."""
    from factorize_cli.calibration import collect_activation_stats
    from factorize_cli.hf import load_pretrained
    from factorize_cli.hfcalibrate import calibrate_folder

    folder = gpt2_folder(tmp_path / "gpt2")
    data = write_lines(tmp_path / "t.txt", TEXT[:6])
    calibrate_folder(folder, data, tmp_path / "s.safetensors", config=TextDataConfig(batch_size=3))
    one_by_one = collect_activation_stats(load_pretrained(folder), text_batches(
        folder, data, TextDataConfig(batch_size=1)), layers=["transformer.h.1.mlp.c_proj"])
    from factorize_cli.calibration import StatsFile

    with StatsFile(tmp_path / "s.safetensors") as file:
        got = file.second_moment("transformer.h.1.mlp.c_proj")
        assert file.count("transformer.h.1.mlp.c_proj") == one_by_one["transformer.h.1.mlp.c_proj"].count
    torch.testing.assert_close(got, one_by_one["transformer.h.1.mlp.c_proj"].second_moment, rtol=1e-5, atol=1e-8)


def test_calibrate_folder_errors_are_one_line(cli, tmp_path):
    folder = gpt2_folder(tmp_path / "gpt2")
    data = write_lines(tmp_path / "t.txt", TEXT)
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"x")
    r = cli("calibrate", folder, data, stats)
    assert r.code == 2 and "already exists; pass --force" in r.stderr and r.stderr.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"txt": "x"}\n')
    r = cli("calibrate", folder, bad, tmp_path / "s2.safetensors", "--samples", "5")
    assert r.code == 2 and r.stderr.strip().endswith('bad.jsonl:2: the record has no "text" string field')
    assert not (tmp_path / "s2.safetensors").exists()
    r = cli("calibrate", folder, data, folder / "s.safetensors")
    assert r.code == 2 and "inside the input folder" in r.stderr
    r = cli("calibrate", folder, data, tmp_path / "s3.safetensors", "--samples", "0")
    assert r.code == 2 and "--samples" in r.stderr
