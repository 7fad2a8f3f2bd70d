"""The CLI as a user meets it: exit codes, one-line errors, stdout/stderr, atomic outputs."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from factorize_cli.report import load_schema
from tests.conftest import SMALL, leftovers, toy_state_dict

REPO = Path(__file__).resolve().parents[1]


class NotAWeight:  # a class weights_only loading must refuse
    def __init__(self) -> None:
        self.x = 1


def test_plan_json_on_stdout_validates(cli, toy_safetensors):
    r = cli("plan", toy_safetensors, *SMALL, "--json", "--spectra")
    assert r.code == 0
    report = r.json
    jsonschema.validate(report, load_schema())
    assert report["command"] == "plan" and report["output"] is None
    assert report["totals"]["factorized"] == 3
    fc1 = next(e for e in report["layers"] if e["name"] == "fc1")
    assert fc1["achieved_error"] is None and 0 < fc1["predicted_error"] < 1
    assert "fc1" in r.stderr and "3/5 layers factorized" in r.stderr  # the table goes to stderr
    assert list(toy_safetensors.parent.iterdir()) == [toy_safetensors]  # a dry run writes nothing


def test_plan_quiet_prints_nothing(cli, toy_safetensors, tmp_path):
    r = cli("plan", toy_safetensors, *SMALL, "-q", "--report", tmp_path / "plan.json")
    assert r.code == 0 and r.stdout == "" and r.stderr == ""
    jsonschema.validate(json.loads((tmp_path / "plan.json").read_text()), load_schema())


def test_plan_reads_headers_only_by_default(cli, toy_safetensors, monkeypatch):
    import factorize_cli.formats.safetensors as st

    def no_reads(self, key):
        raise AssertionError(f"read {key}")

    monkeypatch.setattr(st.SafetensorsFile, "get", no_reads)
    r = cli("plan", toy_safetensors, *SMALL, "--json", "-q")
    fc1 = next(e for e in r.json["layers"] if e["name"] == "fc1")
    assert r.code == 0 and fc1["predicted_error"] is None and r.json["totals"]["predicted_error"] is None
    assert any("headers only" in note for note in r.json["notes"])
    r = cli("plan", toy_safetensors, *SMALL, "--no-spectra", "--max-layer-error", "0.5")
    assert r.code == 2 and "need spectra" in r.stderr


def test_apply_writes_output_and_valid_report(cli, toy_pt, tmp_path):
    out = tmp_path / "small.pt"
    r = cli("apply", toy_pt, out, *SMALL, "--latent-features", "8", "--latent-channels", "0.5")
    assert r.code == 0, r.stderr
    report = json.loads((tmp_path / "small.factorize.json").read_text())
    jsonschema.validate(report, load_schema())
    assert report["settings"]["policy"] == {"name": "ratio", "latent_features": 8.0, "latent_channels": 0.5}
    ranks = {e["name"]: e["rank"] for e in report["layers"] if e["action"] == "factorize"}
    assert ranks == {"conv": 16, "fc1": 8, "fc2": 8}
    sd = torch.load(out, weights_only=True)
    assert sd["fc1.module0.weight"].shape == (8, 64) and sd["conv.module0.weight"].shape == (16, 32, 3, 3)
    assert f"wrote {out}" in r.stderr


def test_apply_refuses_existing_output_without_force(cli, toy_pt, tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    r = cli("apply", toy_pt, out, *SMALL)
    assert r.code == 2 and "already exists; pass --force" in r.stderr
    assert out.read_bytes() == b"precious"
    assert cli("apply", toy_pt, out, *SMALL, "--force", "-q").code == 0
    assert "fc1.module0.weight" in torch.load(out, weights_only=True)


def test_apply_never_overwrites_the_input(cli, toy_pt):
    before = toy_pt.read_bytes()
    r = cli("apply", toy_pt, toy_pt, *SMALL, "--force")
    assert r.code == 2 and "would overwrite" in r.stderr
    assert toy_pt.read_bytes() == before


def test_report_path_option(cli, toy_safetensors, tmp_path):
    r = cli("apply", toy_safetensors, tmp_path / "o.safetensors", *SMALL, "--report", tmp_path / "r.json", "-q")
    assert r.code == 0 and (tmp_path / "r.json").exists() and not (tmp_path / "o.factorize.json").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = tmp / "good.pt"
    torch.save(toy_state_dict(), good)
    st = tmp / "good.safetensors"
    from safetensors.torch import save_file
    save_file(toy_state_dict(), str(st))
    (tmp / "noindex").mkdir()
    _write(tmp / "noindex" / "README.md", b"weights went elsewhere")
    evil = tmp / "evil.pt"
    torch.save({"state_dict": toy_state_dict(), "thing": NotAWeight()}, evil)
    return {
        "missing": (tmp / "nope.pt", "no such file"),
        "empty": (_write(tmp / "empty.pt", b""), "empty"),
        "truncated-pt": (_write(tmp / "trunc.pt", good.read_bytes()[: len(good.read_bytes()) // 2]),
                         "not a readable torch.save file|damaged zip"),
        "truncated-st": (_write(tmp / "trunc.safetensors", st.read_bytes()[:-100]), "safetensors"),
        "no-index": (tmp / "noindex", "no checkpoints found"),
        "text": (_write(tmp / "notes.txt", b"hello, this is not a checkpoint\n"), "not a checkpoint"),
        "pickle-refused": (evil, "--unsafe-pickle"),
        "not-a-state-dict": (_write(tmp / "list.pt", _saved([1, 2, 3])), "not a state dict"),
        "plain-pickle": (_write(tmp / "plain.pkl", pickle.dumps({"a": 1})), "not a"),
    }


def _saved(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["missing", "empty", "truncated-pt", "truncated-st", "no-index", "text",
                                  "pickle-refused", "not-a-state-dict", "plain-pickle"])
@pytest.mark.parametrize("command", ["plan", "apply"])
def test_bad_input_is_one_line_exit_2_and_no_output(cli, tmp_path, case, command):
    import re
    inputs = tmp_path / "in"
    inputs.mkdir()
    path, pattern = bad_inputs(inputs)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["plan", path] if command == "plan" else ["apply", path, out_dir / "x.safetensors"]
    r = cli(*args)
    assert r.code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("factorize: error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert leftovers(out_dir, set()) == []


def test_unsafe_pickle_opt_in_loads_it(cli, tmp_path):
    path, _ = bad_inputs(tmp_path)["pickle-refused"]
    r = cli("apply", path, tmp_path / "o.pt", *SMALL, "--unsafe-pickle", "-q")
    assert r.code == 0, r.stderr


@pytest.mark.parametrize("args,pattern", [
    (["plan"], "Missing argument"),
    (["plan", "x.pt", "--latent-features", "2.5"], "neither a fraction"),
    (["plan", "x.pt", "--latent-channels", "zero"], "not a number"),
    (["plan", "x.pt", "--min-features", "0"], "min-features"),
    (["apply", "x.pt"], "needs CHECKPOINT... OUTPUT"),
    (["apply", "IN", "out.onnx"], "cannot tell the output format"),
    (["apply", "IN", "out.pt2"], "needs a .pt2 input"),
    (["frobnicate"], "No such command"),
    (["plan", "x.pt", "--bogus"], "No such option"),
])
def test_usage_errors(cli, toy_pt, tmp_path, args, pattern):
    args = [str(toy_pt) if a == "IN" else (str(tmp_path / a) if a.startswith("out.") else a) for a in args]
    r = cli(*args)
    assert r.code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], r.stderr


def test_failed_write_leaves_nothing(cli, toy_pt, tmp_path, monkeypatch):
    """A failure mid-write (here: the disk fills up) leaves no output and no temporary."""
    import factorize_cli.formats.safetensors as st

    real = st._tensor_bytes
    calls = {"n": 0}

    def failing(tensor):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(tensor)

    monkeypatch.setattr(st, "_tensor_bytes", failing)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli("apply", toy_pt, out_dir / "x.safetensors", *SMALL)
    assert r.code == 2 and "No space left on device" in r.stderr
    assert leftovers(out_dir, set()) == []
    monkeypatch.setattr(st, "_tensor_bytes", real)
    assert cli("apply", toy_pt, out_dir / "x.safetensors", *SMALL, "-q").code == 0


def test_help_does_not_import_torch():
    code = ("import sys\nfrom factorize_cli.cli import main\n"
            "try:\n    main(['apply', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "--latent-features" in r.stdout and r.stderr.strip().endswith("NO-TORCH"), r.stderr


def test_console_script_and_module_entry_points(toy_safetensors, tmp_path):
    exe = Path(sys.executable).parent / "factorize"
    env = dict(os.environ, NO_COLOR="1")
    for cmd in ([str(exe)], [sys.executable, "-m", "factorize_cli"]):
        r = subprocess.run([*cmd, "plan", str(toy_safetensors), *SMALL, "--json"], capture_output=True,
                           text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["totals"]["factorized"] == 3
        assert "\x1b[" not in r.stderr  # no colour when not a terminal


def test_header_only_plan_of_safetensors_does_not_import_torch(toy_safetensors):
    code = ("import sys\nfrom factorize_cli.cli import main\n"
            f"try:\n    main(['plan', {str(toy_safetensors)!r}, '--json', '-q'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stderr.strip().endswith("NO-TORCH"), r.stderr
    assert json.loads(r.stdout)["totals"]["candidates"] == 5
