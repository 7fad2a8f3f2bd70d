"""Hugging Face sharded layouts: ``.bin`` shards with their index, and hub-cache snapshots of symlinks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from factorize_cli.config import FactorizeConfig, RatioPolicy, SelectionConfig, Latent
from factorize_cli.errors import InputError
from factorize_cli.formats import open_checkpoint
from factorize_cli.modules import read_rank_map
from factorize_cli.pipeline import apply_checkpoint
from tests.conftest import SMALL, optimum_error, toy_state_dict

CONFIG = FactorizeConfig(selection=SelectionConfig(min_features=32, min_channels=32),
                         policy=RatioPolicy(Latent(0.25), Latent(0.25)))

# a weight and its bias in different shards, as Hugging Face's size-based sharding can leave them
SHARDS = {
    "pytorch_model-00001-of-00002.bin": ["embed.weight", "position_ids", "conv.weight", "conv.bias", "fc1.weight"],
    "pytorch_model-00002-of-00002.bin": ["fc1.bias", "fc2.weight", "norm.weight", "head.weight",
                                         "bn.num_batches_tracked"],
}


def write_bin_shards(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, keys in SHARDS.items():
        torch.save({k: sd[k] for k in keys}, folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")  # not a shard: ignored by the reader
    return folder


def load_bin_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        shard = torch.load(folder / name, weights_only=True)
        assert all(index["weight_map"][k] == name for k in shard)
        out.update(shard)
    assert set(out) == set(index["weight_map"])
    return out


def check_factorized(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
    assert ranks == {"conv": 8, "fc1": 16, "fc2": 16}
    for layer, rank in ranks.items():
        w = sd[f"{layer}.weight"]
        first, second = out[f"{layer}.module0.weight"], out[f"{layer}.module1.weight"]
        approx = second.reshape(w.shape[0], rank).double() @ first.reshape(rank, -1).double()
        err = float((w.reshape(w.shape[0], -1).double() - approx).norm() / w.double().norm())
        assert err == pytest.approx(optimum_error(w, rank), rel=1e-5, abs=1e-7)
        assert f"{layer}.weight" not in out
    assert torch.equal(out["fc1.module1.bias"], sd["fc1.bias"])  # the bias crossed shards with its layer
    assert "fc1.bias" not in out
    for key in ("embed.weight", "position_ids", "norm.weight", "head.weight", "bn.num_batches_tracked"):
        assert torch.equal(out[key], sd[key])


def test_bin_shards_are_one_checkpoint(tmp_path):
    sd = toy_state_dict()
    folder = write_bin_shards(tmp_path / "in", sd)
    with open_checkpoint(folder) as ckpt:
        assert ckpt.format == "torch-sharded"
        assert {i.key for i in ckpt.infos} == set(sd)
    report = apply_checkpoint(folder, tmp_path / "out", CONFIG)
    assert report["output"]["format"] == "hf-model"  # config.json beside the shards: a model folder, copied
    out_folder = tmp_path / "out"
    assert sorted(p.name for p in out_folder.iterdir() if not p.name.startswith(".")) == [
        "config.json", *SHARDS, "pytorch_model.bin.index.json"]
    out = load_bin_folder(out_folder)
    index = json.loads((out_folder / "pytorch_model.bin.index.json").read_text())
    assert index["weight_map"]["fc1.module1.bias"] == index["weight_map"]["fc1.module0.weight"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    check_factorized(sd, out, read_rank_map(out_folder))


def test_bin_shards_to_a_single_safetensors_file(tmp_path):
    from safetensors.torch import load_file

    sd = toy_state_dict()
    folder = write_bin_shards(tmp_path / "in", sd)
    apply_checkpoint(folder, tmp_path / "out.safetensors", CONFIG)
    check_factorized(sd, load_file(tmp_path / "out.safetensors"), read_rank_map(tmp_path / "out.safetensors"))


def test_bin_shard_with_a_pickled_object_is_refused(tmp_path):
    folder = write_bin_shards(tmp_path / "in", toy_state_dict())
    torch.save({"fc1.bias": torch.zeros(96), "fc2.weight": torch.nn.Linear(2, 2)},
               folder / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(InputError, match="weights_only"):
        open_checkpoint(folder)


def make_hub_snapshot(root: Path, files: dict[str, bytes]) -> Path:
    """models--org--name/{blobs/<sha>, snapshots/<rev>/<file> -> ../../blobs/<sha>}."""
    import hashlib

    repo = root / "models--org--toy"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("ab" * 20)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snapshot


def test_hub_cache_snapshot_of_symlinked_shards(cli, tmp_path):
    from safetensors.torch import load_file

    sd = toy_state_dict()
    staging = tmp_path / "staging"
    staging.mkdir()
    save_file({k: sd[k] for k in SHARDS["pytorch_model-00001-of-00002.bin"]}, str(staging / "model-1.safetensors"))
    save_file({k: sd[k] for k in SHARDS["pytorch_model-00002-of-00002.bin"]}, str(staging / "model-2.safetensors"))
    weight_map = {k: f"model-{i + 1}.safetensors" for i, keys in enumerate(SHARDS.values()) for k in keys}
    files = {p.name: p.read_bytes() for p in staging.iterdir()}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = b"{}"
    snapshot = make_hub_snapshot(tmp_path / "hub", files)
    before = {p.name: p.read_bytes() for p in (snapshot.parent.parent / "blobs").iterdir()}

    r = cli("apply", snapshot, tmp_path / "out", *SMALL)
    assert r.code == 0, r.stderr
    out = {}
    for name in ("model-1.safetensors", "model-2.safetensors"):
        out.update(load_file(tmp_path / "out" / name))
    check_factorized(sd, out, read_rank_map(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (snapshot.parent.parent / "blobs").iterdir()} == before
    assert all((snapshot / name).is_symlink() for name in files)


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_shard_names_are_checked_as_names(tmp_path, name):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(InputError, match="not a plain file name"):
        open_checkpoint(folder)


def test_a_searched_folder_finds_bin_shard_sets_as_one_checkpoint(cli, tmp_path):
    root = tmp_path / "models"
    write_bin_shards(root / "sharded", toy_state_dict())
    torch.save(toy_state_dict(), root / "single.pt")
    r = cli("plan", root, "--jsonl", *SMALL)
    assert r.code == 0, r.stderr
    inputs = sorted(json.loads(line)["input"] for line in r.stdout.splitlines())
    assert inputs == [str(root / "sharded"), str(root / "single.pt")]
    assert os.path.isdir(inputs[0])
