"""Hostile and broken files: refused with one line and exit 2, no code run, nothing left behind."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import SMALL, decaying_matrix, leftovers, toy_state_dict


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_does_not_run(cli, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": toy_state_dict(), "x": Payload(marker)}, evil)
    r = cli("plan", evil)
    assert r.code == 2 and "--unsafe-pickle" in r.stderr
    assert not marker.exists()
    r = cli("apply", evil, tmp_path / "o.safetensors")
    assert r.code == 2 and not marker.exists() and not (tmp_path / "o.safetensors").exists()
    torch.load(evil, weights_only=False)  # the payload is real: full unpickling runs it
    assert marker.exists()


def _safetensors_bytes() -> bytes:
    buf = io.BytesIO()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fz-{os.getpid()}.safetensors"
    save_file(toy_state_dict(), str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def _torch_bytes(legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(toy_state_dict(), buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def test_safetensors_header_claiming_a_huge_length(cli, tmp_path):
    data = _safetensors_bytes()
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    r = cli("plan", bad)
    assert r.code == 2 and "header claims" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_zip_with_a_missing_member(cli, tmp_path):
    src, dst = io.BytesIO(_torch_bytes()), io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            if not item.filename.endswith("data/0"):
                zout.writestr(item, zin.read(item.filename))
    bad = tmp_path / "missing-member.pt"
    bad.write_bytes(dst.getvalue())
    out = tmp_path / "out"
    out.mkdir()
    r = cli("apply", bad, out / "x.pt", *SMALL)
    assert r.code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert leftovers(out, set()) == []


def corruptions(data: bytes, rng: random.Random, count: int):
    """Truncations, bit flips, zeroed runs and duplicated chunks of a valid file."""
    for i in range(count):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            b = b[: rng.randrange(0, len(b))]
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(b))
                b[pos] ^= 1 << rng.randrange(8)
        elif kind == 2:
            start = rng.randrange(len(b))
            b[start: start + rng.randint(1, 64)] = bytes(min(64, len(b) - start))
        else:
            start = rng.randrange(len(b))
            b[start:start] = b[start: start + rng.randint(1, 256)]
        yield kind, bytes(b)


def _torchscript_bytes() -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                                        torch.nn.Linear(48, 32))), buf)
    return buf.getvalue()


def _pt2_bytes() -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fz-{os.getpid()}.pt2"
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32))
    torch.export.save(torch.export.export(model, (torch.randn(2, 64),)), str(path))
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.mark.parametrize("fmt", ["safetensors", "torch-zip", "torch-legacy", "torchscript", "pt2"])
def test_fuzzed_files_fail_cleanly(cli, tmp_path, fmt):
    data = {"safetensors": _safetensors_bytes, "torch-zip": _torch_bytes,
            "torch-legacy": lambda: _torch_bytes(legacy=True), "torchscript": _torchscript_bytes,
            "pt2": _pt2_bytes}[fmt]()
    rng = random.Random(f"factorize-{fmt}")
    out = tmp_path / "out"
    out.mkdir()
    outcomes = {0: 0, 2: 0}
    for i, (kind, blob) in enumerate(corruptions(data, rng, 120)):
        suffix = {"safetensors": "safetensors", "pt2": "pt2"}.get(fmt, "pt")
        path = tmp_path / f"case{i}.{suffix}"
        path.write_bytes(blob)
        target = out / (f"o{i}.{suffix}" if fmt in ("torchscript", "pt2") else f"o{i}.safetensors")
        args = ("apply", path, target, *SMALL) if i % 5 == 0 else ("plan", path, *SMALL)
        r = cli(*args)
        assert r.code in (0, 2), f"case {i} (kind {kind}): exit {r.code}: {r.stderr}"
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, f"case {i}: {r.stderr}"
        if r.code == 2:
            assert len(r.stderr.strip().splitlines()) == 1, f"case {i}: {r.stderr}"
        outcomes[r.code] += 1
        path.unlink()
    assert outcomes[2] >= 40  # most corruptions are caught; some bit flips only change values
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_sigkill_mid_write_leaves_nothing_and_a_rerun_succeeds(tmp_path):
    src = tmp_path / "big.safetensors"
    save_file({f"l{i}.weight": decaying_matrix(384, 384, seed=i) for i in range(40)}, str(src))
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "small.safetensors"
    cmd = [sys.executable, "-m", "factorize_cli", "apply", str(src), str(out), "--min-features", "64",
           "--svd", "exact", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.startswith(".small") for p in out_dir.iterdir()):
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (out_dir / "small.factorize.json").exists()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert subprocess.run(cmd).returncode == 0
    assert out.exists() and sorted(p.name for p in out_dir.iterdir()) == ["small.factorize.json", "small.safetensors"]


def test_nan_and_inf_layers_are_skipped_with_the_reason(cli, tmp_path):
    sd = toy_state_dict()
    sd["fc1.weight"][0, 0] = float("nan")
    sd["conv.weight"][0, 0, 0, 0] = float("inf")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    r = cli("apply", tmp_path / "nan.safetensors", tmp_path / "o.safetensors", *SMALL, "--json", "-q")
    assert r.code == 0
    layers = {e["name"]: e for e in r.json["layers"]}
    assert layers["fc1"]["reason"] == "non-finite" and layers["conv"]["reason"] == "non-finite"
    assert layers["fc2"]["action"] == "factorize"
