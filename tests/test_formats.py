"""Every input format in, every output format out: bits of untouched tensors, order, containers."""

from __future__ import annotations

import collections
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from factorize_cli.config import FactorizeConfig, Latent, RatioPolicy, SelectionConfig
from factorize_cli.errors import InputError
from factorize_cli.formats import open_checkpoint
from factorize_cli.formats.safetensors import OutputTensor, write_safetensors
from factorize_cli.modules import read_rank_map
from factorize_cli.pipeline import apply_checkpoint
from tests.conftest import decaying_matrix, optimum_error, toy_state_dict

CONFIG = FactorizeConfig(selection=SelectionConfig(min_features=32, min_channels=32))
FACTORIZED = {"conv", "fc1", "fc2"}


def expected_keys(sd: dict) -> list[str]:
    out = []
    for key in sd:
        name = key.rsplit(".", 1)[0]
        if name in FACTORIZED:
            if key.endswith(".weight"):
                out += [f"{name}.module0.weight", f"{name}.module1.weight"]
                if f"{name}.bias" in sd or name == "conv":
                    out.append(f"{name}.module1.bias")
            continue
        out.append(key)
    return out


def in_file_order(path: Path, tensors: dict) -> dict:
    """``tensors`` ordered as the checkpoint at ``path`` stores them."""
    with open_checkpoint(path) as checkpoint:
        return {info.key: tensors[info.key] for info in checkpoint.infos}


def check_output(sd: dict, out: dict, report: dict) -> None:
    assert list(out) == expected_keys(sd)  # keys in order, factors at the weight's place
    for key, value in sd.items():
        if key in out:  # passes through bit for bit, dtype kept
            assert out[key].dtype == value.dtype and torch.equal(out[key], value)
    assert torch.equal(out["fc1.module1.bias"], sd["fc1.bias"])
    assert "fc2.module1.bias" not in out  # a Linear without bias stays without
    assert torch.equal(out["conv.module1.bias"], sd["conv.bias"])
    for layer in report["layers"]:
        if layer["action"] == "factorize":
            w = sd[layer["weight_key"]]
            assert layer["achieved_error"] == pytest.approx(optimum_error(w, layer["rank"]), abs=1e-6)


def test_safetensors_round_trip(toy_safetensors, tmp_path):
    report = apply_checkpoint(toy_safetensors, tmp_path / "out.safetensors", CONFIG)
    sd = toy_state_dict()
    # our writer's file must read back with the reference implementation
    out = load_file(str(tmp_path / "out.safetensors"))
    check_output(in_file_order(toy_safetensors, sd), in_file_order(tmp_path / "out.safetensors", out), report)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"  # input metadata kept
    assert read_rank_map(tmp_path / "out.safetensors") == {"conv": 8, "fc1": 16, "fc2": 16}
    assert report["input"]["format"] == "safetensors"


def test_torch_zip_round_trip_keeps_order_and_metadata(tmp_path):
    sd = collections.OrderedDict(toy_state_dict())
    sd._metadata = {"": {"version": 1}, "fc1": {"version": 2}}
    src = tmp_path / "in.pt"
    torch.save(sd, src)
    report = apply_checkpoint(src, tmp_path / "out.pt", CONFIG)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    check_output(sd, out, report)
    assert getattr(out, "_metadata", None) == sd._metadata
    assert report["input"]["format"] == "torch-zip"


def test_legacy_format_is_read(tmp_path):
    sd = toy_state_dict()
    src = tmp_path / "legacy.pth"
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(src)
    report = apply_checkpoint(src, tmp_path / "out.pt", CONFIG)
    assert report["input"]["format"] == "torch-legacy"
    check_output(sd, torch.load(tmp_path / "out.pt", weights_only=True), report)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model_state", "model"])
def test_containers_are_detected_and_kept(tmp_path, key):
    sd = toy_state_dict()
    container = {key: sd, "epoch": 12, "optimizer_state": {"lr": 0.1, "step": torch.tensor(5)}, "name": "run-3"}
    src = tmp_path / "ckpt.pt"
    torch.save(container, src)
    report = apply_checkpoint(src, tmp_path / "out.pt", CONFIG)
    assert report["input"]["container_key"] == key
    assert any(key in note for note in report["notes"])
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(out) == set(container) and out["epoch"] == 12 and out["name"] == "run-3"
    assert torch.equal(out["optimizer_state"]["step"], torch.tensor(5))
    check_output(sd, out[key], report)


def test_nested_lightning_like_container(tmp_path):
    sd = toy_state_dict()
    src = tmp_path / "ckpt.ckpt"
    torch.save({"checkpoint": {"state_dict": sd}, "global_step": 3}, src)
    report = apply_checkpoint(src, tmp_path / "out.ckpt", CONFIG)
    assert report["input"]["container_key"] == "checkpoint.state_dict"
    out = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert out["global_step"] == 3
    check_output(sd, out["checkpoint"]["state_dict"], report)


def _relocate_to_cuda(data: bytes) -> bytes:
    """Rewrite a zip torch.save so its storages claim to live on cuda:0 (as files saved on a GPU do)."""
    src, dst = io.BytesIO(data), io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            payload = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                payload = payload.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert b"cuda:0" in payload
            zout.writestr(item, payload)
    return dst.getvalue()


def test_tensors_saved_on_cuda_are_mapped_to_cpu(tmp_path):
    sd = toy_state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    src = tmp_path / "gpu.pt"
    src.write_bytes(_relocate_to_cuda(buf.getvalue()))
    report = apply_checkpoint(src, tmp_path / "out.safetensors", CONFIG)
    assert report["totals"]["factorized"] == 3
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["position_ids"], sd["position_ids"])


def make_sharded(folder: Path, sd: dict, shards: list[list[str]]) -> Path:
    folder.mkdir()
    weight_map = {}
    n = len(shards)
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                     "weight_map": weight_map}))
    return folder


def test_sharded_directory_round_trip(tmp_path):
    sd = toy_state_dict()
    keys = list(sd)
    src = make_sharded(tmp_path / "in", sd, [keys[:5], keys[5:]])
    report = apply_checkpoint(src, tmp_path / "out", CONFIG)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    # each output tensor stays in the shard its source weight was in
    assert index["weight_map"]["conv.module0.weight"] == "model-00001-of-00002.safetensors"
    assert index["weight_map"]["fc1.module1.bias"] == "model-00002-of-00002.safetensors"
    assert json.loads(index["metadata"]["factorize.ranks"]) == {"conv": 8, "fc1": 16, "fc2": 16}
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(tmp_path / "out" / shard)))
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    check_output(in_file_order(src, sd), in_file_order(tmp_path / "out", out), report)
    assert read_rank_map(tmp_path / "out") == {"conv": 8, "fc1": 16, "fc2": 16}


def test_sharded_output_from_a_single_file(toy_safetensors, tmp_path):
    apply_checkpoint(toy_safetensors, tmp_path / "sharded", CONFIG)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        ".factorize-output.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def test_index_and_shards_must_agree(tmp_path):
    sd = toy_state_dict()
    src = make_sharded(tmp_path / "in", sd, [list(sd)])
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00001.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="ghost.weight|in no shard"):
        open_checkpoint(src)


def test_bfloat16_stays_bfloat16(tmp_path):
    sd = toy_state_dict(torch.bfloat16)
    src = tmp_path / "bf16.safetensors"
    save_file(sd, str(src))
    report = apply_checkpoint(src, tmp_path / "out.safetensors", CONFIG)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert {out[k].dtype for k in out if k != "position_ids" and k != "bn.num_batches_tracked"} == {torch.bfloat16}
    fc1 = next(e for e in report["layers"] if e["name"] == "fc1")
    assert fc1["achieved_error"] == pytest.approx(optimum_error(sd["fc1.weight"], 16), abs=1e-2)


def test_streaming_writer_matches_reference_bytes(tmp_path):
    """Our header-first writer produces what the safetensors library reads, for every dtype."""
    tensors = {
        "a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).to(torch.bfloat16),
        "d": torch.tensor(True), "e": torch.zeros(0, 4), "f": torch.randn(4, 3).t(),  # non-contiguous
        "g": torch.randn(6).to(torch.float16), "h": torch.tensor([1, 2], dtype=torch.uint8),
    }
    layout = [OutputTensor(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", layout, iter(tensors.values()), {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with open(tmp_path / "x.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0  # data starts 8-byte aligned


def test_non_tensor_entries_cannot_go_to_safetensors(tmp_path):
    from factorize_cli.errors import UsageError

    sd = dict(toy_state_dict(), extra_note="hello")
    src = tmp_path / "in.pt"
    torch.save(sd, src)
    with pytest.raises(UsageError, match="extra_note"):
        apply_checkpoint(src, tmp_path / "out.safetensors", CONFIG)
    assert not (tmp_path / "out.safetensors").exists()
    report = apply_checkpoint(src, tmp_path / "out.pt", CONFIG)  # a .pt output keeps it
    assert torch.load(tmp_path / "out.pt", weights_only=True)["extra_note"] == "hello"
    assert report["totals"]["factorized"] == 3


def test_policy_with_absolute_ranks_in_file_metadata(toy_safetensors, tmp_path):
    config = FactorizeConfig(selection=SelectionConfig(min_features=32, min_channels=32),
                             policy=RatioPolicy(Latent(12), Latent(4)))
    apply_checkpoint(toy_safetensors, tmp_path / "out.safetensors", config)
    assert read_rank_map(tmp_path / "out.safetensors") == {"conv": 4, "fc1": 12, "fc2": 12}


def _handmade_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file written byte by byte, for dtypes torch cannot make."""
    import struct

    header, blob, offset = {}, b"", 0
    for key, (dtype, shape, data) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blob += data
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob)


def test_dtypes_torch_cannot_hold_pass_through_byte_for_byte(cli, tmp_path):
    """F4, F6 and F8_E8M0 tensors (MX formats) are copied as bytes; the float weight beside them is factorized."""
    import struct

    w = decaying_matrix(64, 96, seed=11)
    exotic = {"scales.e8m0": ("F8_E8M0", [4, 8], bytes(range(32))),
              "packed.f4": ("F4", [6, 4], bytes(range(100, 112))),  # 24 four-bit values: 12 bytes
              "packed.f6": ("F6_E3M2", [4, 4], bytes(range(200, 212)))}  # 16 six-bit values: 12 bytes
    _handmade_safetensors(tmp_path / "in.safetensors", {
        **exotic, "fc.weight": ("F32", [64, 96], w.numpy().tobytes())})
    r = cli("apply", tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--min-features", "32", "--json")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    assert layers["fc"]["action"] == "factorize"
    raw = (tmp_path / "out.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    for key, (dtype, shape, data) in exotic.items():
        begin, end = header[key]["data_offsets"]
        assert header[key]["dtype"] == dtype and header[key]["shape"] == shape
        assert raw[8 + length + begin:8 + length + end] == data
    r = cli("apply", tmp_path / "in.safetensors", tmp_path / "other.pt", "--min-features", "32")
    assert r.code == 2 and "which torch cannot hold; write a .safetensors output" in r.stderr
    assert not (tmp_path / "other.pt").exists()


def test_a_fractional_byte_count_is_refused(tmp_path):
    _handmade_safetensors(tmp_path / "bad.safetensors", {"x": ("F4", [3], b"\x00\x00")})
    with pytest.raises(InputError, match="not a whole number of bytes"):
        open_checkpoint(tmp_path / "bad.safetensors")
