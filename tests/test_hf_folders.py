"""Hugging Face model folders in and out: a folder with a ``config.json`` is one checkpoint, and
``apply`` writes a folder of the same shape that ``load_pretrained`` runs.

Tiny GPT-2 (transformers' transposed ``Conv1D``, ``lm_head`` tied to ``wte``) and BERT (masked-LM
head tied to the word embeddings), each as a single safetensors file, a single ``pytorch_model.bin``,
safetensors shards, ``.bin`` shards and a hub-cache snapshot, next to tokenizer files, a subfolder and
stale weights of other formats. The loaded result must compute what the rank-r model computes
(``convert_to_factorized(..., from_weights=True)`` on the original) to float32 rounding."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from factorize_cli.errors import InputError, UsageError
from factorize_cli.modules import convert_to_factorized, read_rank_map
from factorize_cli.outputs import MARKER
from tests.test_sharded import make_hub_snapshot

transformers = pytest.importorskip("transformers")

ARGS = ["--min-features", "1", "--latent-features", "0.25", "-q"]
EXTRAS = {"tokenizer.json": b'{"version": "1.0"}', "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
          "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}', "README.md": b"# tiny\n"}
STALE = {"tf_model.h5": b"\x89HDF fake", "onnx/model.onnx": b"fake onnx"}
LAYOUTS = ("safetensors", "bin", "safetensors-shards", "bin-shards", "hub-snapshot")


def tiny(arch: str):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100, max_position_embeddings=32)
    return transformers.BertForMaskedLM(config).eval()


def _state(model) -> dict[str, torch.Tensor]:
    """The state dict without tied copies (as transformers saves it), each tensor its own storage."""
    tied = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    return {k: v.clone() for k, v in model.state_dict().items() if k not in tied}


def _write_bin_shards(folder: Path, state: dict[str, torch.Tensor]) -> None:
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for name, names in halves.items():
        torch.save({k: state[k] for k in names}, folder / name)
        weight_map.update(dict.fromkeys(names, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _add(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def model_folder(tmp_path: Path, model, layout: str) -> Path:
    """``model`` saved in ``layout`` with tokenizer files, a subfolder and stale weights around it."""
    folder = tmp_path / f"{layout}-in"
    if layout in ("safetensors", "safetensors-shards", "hub-snapshot"):
        model.save_pretrained(folder, max_shard_size="100KB" if layout != "safetensors" else "50GB")
    else:
        model.save_pretrained(folder)  # config.json with its architectures, then .bin weights instead
        (folder / "model.safetensors").unlink()
        if layout == "bin":
            torch.save(_state(model), folder / "pytorch_model.bin")
        else:
            _write_bin_shards(folder, _state(model))
    _add(folder, {**EXTRAS, **STALE})
    if layout == "hub-snapshot":
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        snapshot = make_hub_snapshot(tmp_path / "hub", files)
        blobs = tmp_path / "hub" / "models--org--toy" / "blobs"
        for rel, data in {**EXTRAS, **STALE}.items():
            if "/" in rel:  # a subfolder of a snapshot: a real folder of links
                (blobs / rel.replace("/", "-")).write_bytes(data)
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / rel).symlink_to(Path("../../../blobs") / rel.replace("/", "-"))
        return snapshot
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def weight_names(files) -> set[str]:
    return {f for f in files if f.endswith((".safetensors", ".bin", ".index.json"))}


def logits(model, arch: str) -> torch.Tensor:
    ids = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_writes_a_model_folder_that_load_pretrained_runs(cli, tmp_path, arch, layout):
    from factorize_cli import load_pretrained

    model = tiny(arch)
    source = model_folder(tmp_path, model, layout)
    before = tree(source)
    out = tmp_path / "out"
    r = cli("apply", source, out, *ARGS)
    assert r.code == 0, r.stderr
    after = tree(out)

    # same file set minus stale weights (plus the marker, and the rank sidecar of a single .bin)
    expected = {rel for rel in before if rel not in STALE} | {MARKER}
    if layout == "bin":
        expected.add("factorize-ranks.json")
    assert set(after) == expected
    assert weight_names(after) == weight_names(before)
    for rel, data in before.items():
        if rel not in STALE and rel not in weight_names(before):
            assert after[rel] == data, rel  # config, tokenizer files, subfolder: byte-identical
    assert not any(p.is_symlink() for p in out.rglob("*"))
    marker = json.loads(after[MARKER])["files"]
    assert set(marker) == expected - {MARKER}
    report = json.loads((tmp_path / "out.factorize.json").read_text())
    assert report["output"]["format"] == "hf-model"
    assert any("not copied" in n and "tf_model.h5" in n and "onnx/model.onnx" in n for n in report["notes"])

    ranks = read_rank_map(out)
    assert ranks and ranks == {e["name"]: e["rank"] for e in report["layers"] if e["action"] == "factorize"}
    loaded = load_pretrained(out)
    reference = convert_to_factorized(copy.deepcopy(model), ranks, from_weights=True).eval()
    got, want, original = logits(loaded, arch), logits(reference, arch), logits(model, arch)
    diff = float((got - want).norm() / want.norm())
    assert diff < 1e-5, diff
    assert float((got - original).norm() / original.norm()) > 100 * diff  # the rank-r model differs
    if layout == "hub-snapshot":
        assert all(p.is_symlink() for p in source.iterdir() if p.is_file())


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_load_pretrained_of_the_original_folder_matches_the_model(tmp_path, arch):
    from factorize_cli import load_pretrained

    model = tiny(arch)
    for layout in ("safetensors", "bin-shards"):
        got = logits(load_pretrained(model_folder(tmp_path, model, layout)), arch)
        assert torch.equal(got, logits(model, arch)), layout


def test_load_pretrained_is_strict(cli, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from factorize_cli import load_pretrained

    source = model_folder(tmp_path, tiny("gpt2"), "safetensors")
    out = tmp_path / "out"
    assert cli("apply", source, out, *ARGS).code == 0
    weights = out / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    planted = "transformer.h.1.mlp.c_fc.module1.bias"
    save_file({k: v for k, v in state.items() if k != planted}, str(weights), metadata=meta)
    with pytest.raises(InputError, match="missing from the folder"):
        load_pretrained(out)
    save_file({**state, "transformer.extra.weight": torch.zeros(2)}, str(weights), metadata=meta)
    with pytest.raises(InputError, match="no place for"):
        load_pretrained(out)


def test_safetensors_read_before_bin_and_the_bin_not_copied(cli, tmp_path):
    model = tiny("gpt2")
    source = model_folder(tmp_path, model, "safetensors")
    torch.save(_state(model), source / "pytorch_model.bin")
    r = cli("plan", source, *ARGS, "--json")
    assert r.code == 0, r.stderr
    assert "model.safetensors read (as transformers does); pytorch_model.bin beside it not read" in r.json["notes"]
    assert cli("apply", source, tmp_path / "out", *ARGS).code == 0
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    notes = json.loads((tmp_path / "out.factorize.json").read_text())["notes"]
    assert any("not copied" in n and "pytorch_model.bin" in n for n in notes)


def test_plan_of_a_model_folder_is_one_checkpoint(cli, tmp_path):
    model = tiny("gpt2")
    source = model_folder(tmp_path, model, "safetensors")
    r = cli("plan", source, *ARGS, "--jsonl")
    assert r.code == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1  # one checkpoint, not a batch of its files
    r = cli("plan", source, *ARGS, "--json")
    assert r.json["input"]["path"] == str(source)
    planned = {e["name"] for e in r.json["layers"] if e["action"] == "factorize"}
    assert planned == {f"transformer.h.{i}.{n}" for i in range(2)
                       for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    r = cli("apply", source, tmp_path / "small.safetensors", *ARGS)  # a file output: the weights alone
    assert r.code == 0, r.stderr
    assert set(read_rank_map(tmp_path / "small.safetensors")) == planned


def test_a_folder_of_model_folders_is_a_batch_of_models(cli, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for arch in ("gpt2", "bert"):
        model_folder(tmp_path, tiny(arch), "safetensors").rename(models / arch)
    r = cli("apply", models, tmp_path / "out", *ARGS, "--jsonl")
    assert r.code == 0, r.stderr
    assert [json.loads(line)["input"] for line in r.stdout.splitlines()] == [str(models / "bert"),
                                                                              str(models / "gpt2")]
    for arch in ("gpt2", "bert"):
        assert (tmp_path / "out" / arch / "config.json").is_file()
        assert (tmp_path / "out" / f"{arch}.factorize.json").is_file()


def test_force_replaces_only_a_folder_we_wrote(cli, tmp_path):
    source = model_folder(tmp_path, tiny("bert"), "safetensors")
    out = tmp_path / "out"
    assert cli("apply", source, out, *ARGS).code == 0
    again = cli("apply", source, out, *ARGS)
    assert again.code == 2 and "--force" in again.stderr
    assert cli("apply", source, out, *ARGS, "--force").code == 0  # ours, subfolder included
    (out / "1_Pooling" / "notes.txt").write_text("mine")
    r = cli("apply", source, out, *ARGS, "--force")
    assert r.code == 2 and "1_Pooling/notes.txt" in r.stderr
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text("{}")
    r = cli("apply", source, user, *ARGS, "--force")
    assert r.code == 2 and "not one of its outputs" in r.stderr
    assert (user / "config.json").read_text() == "{}"
    r = cli("apply", source, source / "sub", *ARGS)
    assert r.code == 2 and "inside the input folder" in r.stderr


def test_errors_are_one_line(cli, tmp_path, monkeypatch):
    import sys

    from factorize_cli.hf import import_transformers, load_pretrained

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["NoSuch"]}))
    torch.save({"layer.weight": torch.randn(8, 8), "layer.bias": torch.zeros(8)}, unknown / "pytorch_model.bin")
    with pytest.raises(InputError, match="cannot read this config") as e:
        load_pretrained(unknown)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    r = cli("plan", unknown, *ARGS, "--json")  # without a usable config: keys alone, as before
    assert r.code == 0 and any("not used" in n for n in r.json["notes"])

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    r = cli("plan", tmp_path / "empty")
    assert r.code == 2 and "without weights" in r.stderr

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError, match=r"pip install 'factorize-cli\[hf\]'"):
        import_transformers()
    r = cli("plan", unknown, *ARGS, "--json")  # plan/apply work on keys alone without transformers
    assert r.code == 0 and any("transformers is not installed" in n for n in r.json["notes"])
