"""GPT-2 (transformers' transposed ``Conv1D``) in the layouts people download: one safetensors file,
``.bin`` shards with their index, and a hub-cache snapshot of symlinked shards. Each is planned and
applied through the CLI; the factorized model loads through the Python API with ``strict=True`` and
computes what the rank-r model computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factorize_cli.modules import convert_to_factorized, read_rank_map
from tests.test_sharded import make_hub_snapshot

transformers = pytest.importorskip("transformers")

ARGS = ["--min-features", "1", "--latent-features", "0.25", "-q"]
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2(seed: int = 0):
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def layers(model) -> list[str]:
    return [f"transformer.h.{i}.{name}" for i in range(model.config.n_layer) for name in CONV1D]


def rank_r_reference(model, ranks: dict[str, int]):
    """The original model with every factorized Conv1D weight replaced by its float64 rank-r truncation."""
    reference = gpt2()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, rank in ranks.items():
            w = reference.get_submodule(name).weight
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            w.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])
    return reference


def load_factorized(folder_or_file: Path, state: dict[str, torch.Tensor]):
    model = gpt2(seed=1)  # other random weights: everything must come from the file
    ranks = read_rank_map(folder_or_file)
    convert_to_factorized(model, ranks)
    state = dict(state)
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied, as transformers does
    model.load_state_dict(state, strict=True)
    return model.eval(), ranks


def check(model, factorized, ranks) -> float:
    assert set(ranks) == set(layers(model)), sorted(ranks)
    ids = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = rank_r_reference(model, ranks)(ids).logits
        got = factorized(ids).logits
        original = model(ids).logits
    diff = float((got - want).norm() / want.norm())
    assert diff < 1e-5, diff
    assert float((got - original).norm() / original.norm()) > 10 * diff  # the rank-r model differs
    return diff


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_gpt2_single_safetensors_file(cli, tmp_path):
    from safetensors.torch import load_file

    model = gpt2()
    model.save_pretrained(tmp_path / "gpt2")
    plan = cli("plan", tmp_path / "gpt2" / "model.safetensors", *ARGS, "--json")
    assert plan.code == 0, plan.stderr
    planned = {e["name"] for e in plan.json["layers"] if e["action"] == "factorize"}
    assert planned == set(layers(model))
    out = tmp_path / "small.safetensors"
    assert cli("apply", tmp_path / "gpt2" / "model.safetensors", out, *ARGS).code == 0
    factorized, ranks = load_factorized(out, load_file(out))
    check(model, factorized, ranks)


def test_gpt2_bin_shards(cli, tmp_path):
    model = gpt2()
    folder = tmp_path / "gpt2-bin"
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = list(state)
    # Hugging Face's naming; h.0's c_attn weight and bias land in different shards
    split = keys.index("transformer.h.0.attn.c_attn.weight") + 1
    shards = {"pytorch_model-00001-of-00002.bin": keys[:split], "pytorch_model-00002-of-00002.bin": keys[split:]}
    weight_map = {}
    for name, names in shards.items():
        torch.save({k: state[k].clone() for k in names}, folder / name)
        weight_map.update(dict.fromkeys(names, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert weight_map["transformer.h.0.attn.c_attn.bias"] != weight_map["transformer.h.0.attn.c_attn.weight"]

    assert cli("plan", folder, *ARGS).code == 0
    r = cli("apply", folder, tmp_path / "out", *ARGS)
    assert r.code == 0, r.stderr
    out_index = json.loads((tmp_path / "out" / "pytorch_model.bin.index.json").read_text())
    got = {}
    for name in sorted(set(out_index["weight_map"].values())):
        got.update(torch.load(tmp_path / "out" / name, weights_only=True))
    assert set(got) == set(out_index["weight_map"])
    factorized, ranks = load_factorized(tmp_path / "out", got)
    check(model, factorized, ranks)


def test_gpt2_hub_cache_snapshot(cli, tmp_path):
    model = gpt2()
    staging = tmp_path / "staging"
    model.save_pretrained(staging, max_shard_size="100KB")
    files = {p.name: p.read_bytes() for p in staging.iterdir()}
    assert "model.safetensors.index.json" in files and len(files) > 4
    snapshot = make_hub_snapshot(tmp_path / "hub", files)
    r = cli("apply", snapshot, tmp_path / "out", *ARGS)
    assert r.code == 0, r.stderr
    factorized, ranks = load_factorized(tmp_path / "out", read_safetensors_folder(tmp_path / "out"))
    check(model, factorized, ranks)
    assert all((snapshot / name).is_symlink() for name in files)
