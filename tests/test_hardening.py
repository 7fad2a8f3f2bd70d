"""Hostile and broken files: refused with one line and exit 2, no code run, nothing left behind."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import SMALL, decaying_matrix, leftovers, optimum_error, toy_state_dict


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
            run = slice(start, start + rng.randint(1, 64))
            b[run] = bytes(len(b[run]))  # same length: the file's layout stays, its bytes change
        else:
            start = rng.randrange(len(b))
            b[start:start] = b[start: start + rng.randint(1, 256)]
        yield kind, bytes(b)


def _torchscript_bytes() -> bytes:
    buf = io.BytesIO()
    with torch.random.fork_rng(devices=[]):  # the same weights each run
        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                                            torch.nn.Linear(48, 32))), buf)
    return buf.getvalue()


class _Mlp(torch.nn.Module):
    """Two Linears; its input is named ``x`` (an ``nn.Sequential``'s ``input`` breaks the .pt2 rewrite:
    see test_export's test_sequential_program)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _pt2_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        path = Path(tmp) / "model.pt2"  # the archive's folder is named after the file
        torch.export.save(torch.export.export(_Mlp(), (torch.randn(2, 64),)), str(path))
        return path.read_bytes()


def _read_directly(fmt: str, path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a (possibly damaged) file as safetensors or torch themselves read them; None if they refuse."""
    from safetensors.torch import load_file

    logging.disable(logging.WARNING)  # torch.export.load logs a traceback before raising
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "safetensors":
                return load_file(str(path))
            if fmt in ("torch-zip", "torch-legacy"):
                return torch.load(path, map_location="cpu", weights_only=True)
            if fmt == "torchscript":
                return {k: t.detach() for k, t in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
            return {k: t.detach() for k, t in torch.export.load(str(path)).state_dict.items()}
    except Exception:
        return None
    finally:
        logging.disable(logging.NOTSET)


def _factor_keys(fmt: str, name: str, out: dict) -> tuple[str, str]:
    """Where the output holds a factorized layer's two weights (first: rank x fan_in, second: out x rank):
    on the layer, or (TorchScript, a class type shared with another module) on the root."""
    on_layer = f"{name}.module0.weight", f"{name}.module1.weight"
    if fmt == "torchscript" and on_layer[0] not in out:
        holder = "factorized__" + name.replace(".", "__")
        return f"{holder}.0.weight", f"{holder}.1.weight"
    return on_layer


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def check_output(fmt: str, source: dict[str, torch.Tensor], target: Path, report: dict, case: str) -> None:
    """The output is what factorizing the input's weights (as read) gives: each factorized layer at the
    Eckart-Young optimum of its weight, every other tensor bit for bit."""
    out = _read_directly("safetensors" if target.suffix == ".safetensors" else fmt, target)
    assert out is not None, f"{case}: the output does not load"
    expected, renamed = set(source), {}  # output keys; {output key: input key} of moved tensors
    for e in report["layers"]:
        if e["action"] != "factorize":
            continue
        first_key, second_key = _factor_keys(fmt, e["name"], out)
        first, second, weight = out[first_key].double(), out[second_key].double(), source[e["weight_key"]]
        assert first.shape[0] == second.shape[1] == e["rank"], case
        approx = (second.reshape(second.shape[0], -1) @ first.reshape(e["rank"], -1)).reshape(weight.shape)
        achieved = float((weight.double() - approx).norm() / weight.double().norm())
        assert achieved == pytest.approx(optimum_error(weight, e["rank"]), abs=1e-5), f"{case}: {e['name']}"
        expected |= {first_key, second_key}
        if fmt == "torchscript":  # the module keeps an empty weight; the bias stays where it was
            assert out[e["weight_key"]].numel() == 0, case
            renamed[e["weight_key"]] = None
        else:
            expected.discard(e["weight_key"])
            if e["bias_key"] and fmt != "pt2":
                expected = (expected - {e["bias_key"]}) | {f"{e['name']}.module1.bias"}
                renamed[f"{e['name']}.module1.bias"] = e["bias_key"]
    assert set(out) == expected, f"{case}: {sorted(set(out) ^ expected)}"
    factors = {k for e in report["layers"] if e["action"] == "factorize" for k in _factor_keys(fmt, e["name"], out)}
    for key in set(out) - factors:
        original = renamed.get(key, key)
        if original is not None:
            assert _same_bits(out[key], source[original]), f"{case}: {key} differs from the input's {original}"


FUZZ_CASES = 48  # per format; each corruption is planned and applied


@pytest.mark.parametrize("fmt", ["safetensors", "torch-zip", "torch-legacy", "torchscript", "pt2"])
def test_fuzzed_files_fail_cleanly_or_give_the_right_output(cli, tmp_path, fmt):
    """Each damaged file: plan and apply either refuse it (exit 2, one line, nothing written) or succeed, and
    then the output is exactly what factorizing the damaged file's weights, as torch reads them, gives."""
    data = {"safetensors": _safetensors_bytes, "torch-zip": _torch_bytes,
            "torch-legacy": lambda: _torch_bytes(legacy=True), "torchscript": _torchscript_bytes,
            "pt2": _pt2_bytes}[fmt]()
    rng = random.Random(f"factorize-{fmt}")
    out = tmp_path / "out"
    out.mkdir()
    suffix = {"safetensors": "safetensors", "pt2": "pt2"}.get(fmt, "pt")
    counts = {"refused": 0, "valid output": 0}
    for i, (kind, blob) in enumerate(corruptions(data, rng, FUZZ_CASES)):
        case = f"case {i} (kind {kind})"
        path = tmp_path / f"case{i}.{suffix}"
        path.write_bytes(blob)
        target = out / (f"o{i}.{suffix}" if fmt in ("torchscript", "pt2") else f"o{i}.safetensors")
        planned = cli("plan", path, *SMALL, "-q", "--json")
        applied = cli("apply", path, target, *SMALL, "-q", "--json")
        for r in (planned, applied):
            assert r.code in (0, 2), f"{case}: exit {r.code}: {r.stderr}"
            if r.code == 2:
                assert r.stderr.startswith("factorize: error: ") and len(r.stderr.strip().splitlines()) == 1, \
                    f"{case}: {r.stderr}"
        if applied.code == 2:
            assert leftovers(out, set()) == [], f"{case}: {leftovers(out, set())}"
            counts["refused"] += 1
        else:
            source = _read_directly(fmt, path)
            assert source is not None, f"{case}: an output from a file that {fmt} itself cannot read"
            check_output(fmt, source, target, applied.json, case)
            assert leftovers(out, {target.name, f"o{i}.factorize.json"}) == [], case
            target.unlink()
            (out / f"o{i}.factorize.json").unlink()
            counts["valid output"] += 1
        path.unlink()
    print(f"\n{fmt}: {FUZZ_CASES} corruptions, {counts['refused']} refused, {counts['valid output']} valid outputs")
    assert counts["refused"] >= FUZZ_CASES // 5 and counts["valid output"] >= 1  # both paths exercised


class Traced(torch.nn.Module):
    """Traced, its plain tensor attribute becomes an entry of constants.pkl."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 48)
        self.fc2 = torch.nn.Linear(48, 32)
        self.offset = torch.linspace(-1, 1, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + self.offset


def _traced_bytes() -> bytes:
    buf = io.BytesIO()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.jit.save(torch.jit.trace(Traced(), (torch.randn(2, 64),)), buf)
    return buf.getvalue()


def _with_member(data: bytes, member: str, content: bytes) -> bytes:
    """The archive rebuilt with one member replaced: still a valid zip, so the damage reaches torch."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, content if item.filename == member else zin.read(item.filename))
    return out.getvalue()


def _flip(b: bytes, rng: random.Random) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _at_random(b: bytes, rng: random.Random, insert: bytes) -> bytes:
    i = rng.randrange(len(b))
    return b[:i] + insert + b[i:]


BYTE_DAMAGE = {  # any member
    "flip": _flip,
    "truncate": lambda b, rng: b[:rng.randrange(len(b))],
    "garbage": lambda b, rng: rng.randbytes(rng.randint(1, 64)),
    "splice": lambda b, rng: _at_random(b, rng, rng.randbytes(8)),
    "empty": lambda b, rng: b"",
}
SOURCE_DAMAGE = {  # code/**.py: (pattern, replacement) on the text, or a function of the bytes
    "invalid-utf8": lambda b, rng: _at_random(b, rng, b"\xff\xfe\xc3"),
    "missing-colon": (rb":\n", b"\n"),
    "unbalanced": (rb"\)", b""),
    "dedent": (rb"\n    ", b"\n  "),
    "keyword": (rb"\breturn\b", b"retrun"),
    "renamed-method": (rb"def forward\(", b"def forwarb("),
    "renamed-call": (rb"\.(forward|relu|linear)\(", rb".\1x("),
    "renamed-attribute": (rb"\bweight : Tensor", b"weigh : Tensor"),
    "attribute-read": (rb"self\.weight\b", b"self.weightx"),
    "wrong-type": (rb": Tensor", b": int"),
    "unregistered-weight": (rb'__parameters__ = \["weight", ', b'__parameters__ = ['),
    "wrong-final": (rb"Final\[int\] = \d+", b"Final[int] = 7"),
}
SIZES_2D = rb"\(K(.)K(.)t\(K(.)K\x01t"  # a tensor's sizes (a, b) and strides (s, 1), pickled as BININT1s
PICKLE_DAMAGE = {  # data.pkl and constants.pkl, at the pickle's level: valid pickles, wrong content
    "beyond-storage": (SIZES_2D, lambda m: b"(K" + m[1] + b"K\xfft(K" + m[3] + b"K\x01t"),
    "longer": (rb"\(K(.)t\(K\x01t", lambda m: b"(K\xfft(K\x01t"),
    "one-dim": (SIZES_2D, lambda m: b"(K" + m[1] + b"t(K\x01t"),
    "three-dim": (SIZES_2D, lambda m: b"(K" + m[1] + b"K" + m[2] + b"K\x01t(K" + m[3] + b"K\x01K\x01t"),
    "transposed": (SIZES_2D, lambda m: b"(K" + m[1] + b"K" + m[2] + b"t(K\x01K" + m[1] + b"t"),
    "int-dtype": (rb"torch\nFloatStorage\n", b"torch\nIntStorage\n"),  # same item size: no read past the record
    "half-dtype": (rb"torch\nFloatStorage\n", b"torch\nHalfStorage\n"),
    "missing-record": (rb"X\x01\x00\x00\x000", b"X\x01\x00\x00\x009"),
    "renamed-class": (rb"Linear\n", b"Lineax\n"),
    "renamed-entry": (rb"X\x06\x00\x00\x00weight", b"X\x06\x00\x00\x00weigjt"),
}


def _damage(how, content: bytes, rng: random.Random) -> bytes | None:
    if callable(how):
        return how(content, rng)
    pattern, replacement = how
    spots = list(re.finditer(pattern, content, re.DOTALL))
    if not spots:
        return None
    spot = rng.choice(spots)
    return content[:spot.start()] + re.sub(pattern, replacement, content[spot.start():], count=1, flags=re.DOTALL)


def member_damage(data: bytes, seed: str):
    """(member, kind, archive) for a TorchScript archive whose code, debug info or pickles are damaged."""
    rng = random.Random(seed)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {n.split("/", 1)[1]: (n, z.read(n)) for n in z.namelist()}
    groups = {"source": [m for m in members if m.startswith("code/") and m.endswith(".py")],
              "debug": [m for m in members if m.endswith(".debug_pkl")],
              "pickle": [m for m in ("data.pkl", "constants.pkl") if len(members.get(m, ("", b""))[1]) > 8]}
    plan = [(group, kind, how) for group in groups for kind, how in BYTE_DAMAGE.items() for _ in range(2)]
    plan += [("source", kind, how) for kind, how in SOURCE_DAMAGE.items()]
    plan += [("pickle", kind, how) for kind, how in PICKLE_DAMAGE.items()]
    for group, kind, how in plan:
        for member in rng.sample(groups[group], len(groups[group])):  # the first member this damage applies to
            name, content = members[member]
            damaged = _damage(how, content, rng)
            if damaged is not None and damaged != content:
                yield member, kind, _with_member(data, name, damaged)
                break
    # a member name flagged UTF-8 that is not (Python's zipfile refuses it; torch does not read names)
    named = io.BytesIO(data)
    with zipfile.ZipFile(named, "a") as z:
        z.writestr(f"{members['version'][0].split('/')[0]}/extra/\u00e9.txt", b"")
    yield "extra/\u00e9.txt", "name-not-utf8", named.getvalue().replace("\u00e9".encode(), b"\xff\xfe")


def rank_r_reference(path: Path, report: dict) -> torch.jit.ScriptModule:
    """The input archive with each factorized layer's weight replaced by its float64 rank-r truncation."""
    from tests.test_modules import truncated

    reference = torch.jit.load(str(path))
    for entry in report["layers"]:
        if entry["action"] == "factorize":
            layer = reference
            for part in entry["name"].split("."):
                layer = getattr(layer, part)
            layer._c.setattr("weight", truncated(layer.weight, entry["rank"]))
    return reference


def _run(module: torch.jit.ScriptModule, x: torch.Tensor) -> torch.Tensor | str:
    """The module's output, or the kind of error it stops with (a damaged module may load and not run)."""
    try:
        with torch.no_grad():
            return module(x)
    except (RuntimeError, AttributeError) as e:
        return type(e).__name__


@pytest.mark.parametrize("base", ["script", "trace"])
def test_damaged_torchscript_members_fail_cleanly(cli, tmp_path, base):
    data = _torchscript_bytes() if base == "script" else _traced_bytes()
    out = tmp_path / "out"
    out.mkdir()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    codes, kinds = [], set()
    for i, (member, kind, blob) in enumerate(member_damage(data, f"factorize-members-{base}")):
        case = f"case {i} ({kind} in {member})"
        path = tmp_path / f"case{i}.jit"
        path.write_bytes(blob)
        target = out / f"o{i}.jit"
        planned = cli("plan", path, *SMALL, "--latent-features", "8", "-q", "--json")
        applied = cli("apply", path, target, *SMALL, "--latent-features", "8", "-q", "--json")
        for r in (planned, applied):
            assert r.code in (0, 2), f"{case}: exit {r.code}: {r.stderr}"
            assert "Traceback" not in r.stderr and "internal error" not in r.stderr, f"{case}: {r.stderr}"
            if r.code == 2:
                assert r.stderr.startswith("factorize: error: ") and len(r.stderr.strip().splitlines()) == 1, \
                    f"{case}: {r.stderr}"
        assert planned.code == applied.code, f"{case}: plan exit {planned.code}, apply {applied.code}: {applied.stderr}"
        if applied.code == 0:  # the damage left a working archive: the output computes its rank-r model
            expected, got = _run(rank_r_reference(path, applied.json), x), _run(torch.jit.load(str(target)), x)
            if isinstance(expected, str):  # the damaged input loads but does not run; nor may the output
                assert got == expected, f"{case}: {got}"
            else:
                got, expected = got.double(), expected.double()  # a damaged dtype can make outputs huge
                assert float((got - expected).norm() / expected.norm()) < 1e-4, case
            target.unlink()
            (out / f"o{i}.factorize.json").unlink()
        assert leftovers(out, set()) == [], f"{case}: {leftovers(out, set())}"
        codes.append(applied.code)
        kinds.add(kind)
        path.unlink()
    assert len(codes) >= 40 and codes.count(2) >= 0.75 * len(codes)
    assert {"invalid-utf8", "renamed-method", "unbalanced", "one-dim", "missing-record", "name-not-utf8"} <= kinds


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
