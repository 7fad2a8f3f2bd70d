"""Hostile output paths: nothing a user did not ask us to replace is ever touched.

Each case hashes every file under the work folder before and after the refused command.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from factorize_cli.atomic import atomic_path, sweep_stale
from factorize_cli.errors import OutputError
from factorize_cli.outputs import MARKER, check_targets, not_an_earlier_output
from tests.conftest import SMALL, toy_state_dict


def snapshot(root: Path) -> dict[str, str]:
    """Every file (and empty folder) under ``root`` with its content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif not any(path.iterdir()):
            out[rel] = "<empty dir>"
    return out


@pytest.fixture
def ckpts(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_file(toy_state_dict(), str(folder / "a.safetensors"))
    save_file(toy_state_dict(), str(folder / "b.safetensors"))
    (folder / "notes.txt").write_text("the user's own file\n")
    return folder


def refused(cli, root: Path, *args, code: int = 2, match: str) -> None:
    before = snapshot(root)
    r = cli(*args)
    assert r.code == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("factorize: error:") and match in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(root) == before


def test_force_onto_the_folder_holding_the_input(cli, ckpts, tmp_path):
    refused(cli, tmp_path, "apply", ckpts / "a.safetensors", ckpts, "--force", *SMALL,
            match="holds the input")


def test_force_onto_a_folder_that_is_not_our_output(cli, ckpts, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    refused(cli, tmp_path, "apply", ckpts / "a.safetensors", mine, "--force", *SMALL,
            match="replaces only a folder that factorize wrote")


@pytest.fixture
def our_folder(cli, ckpts, tmp_path) -> Path:
    """A sharded output folder that factorize wrote."""
    out = tmp_path / "out"
    assert cli("apply", ckpts / "a.safetensors", out, *SMALL).code == 0
    return out


def test_force_onto_our_folder_with_a_user_file_added(cli, ckpts, tmp_path, our_folder):
    out = our_folder
    (out / "added.txt").write_text("keep me\n")
    refused(cli, tmp_path, "apply", ckpts / "b.safetensors", out, "--force", *SMALL,
            match="'added.txt', which factorize did not write")


def test_force_replaces_our_own_earlier_folder(cli, ckpts, tmp_path, our_folder):
    out = our_folder
    first = snapshot(out)
    assert json.loads((out / MARKER).read_text())["files"] == sorted(p for p in first if p != MARKER)
    r = cli("apply", ckpts / "b.safetensors", out, "--force", "--latent-features", "0.5", *SMALL)
    assert r.code == 0, r.stderr
    assert snapshot(out) != first  # another rank: other bytes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporaries left


def test_folder_written_before_the_marker_is_still_recognised(cli, ckpts, our_folder):
    out = our_folder
    (out / MARKER).unlink()  # an output of an earlier version: its index carries our rank map
    assert not_an_earlier_output(out) is None
    assert cli("apply", ckpts / "b.safetensors", out, "--force", *SMALL).code == 0


@pytest.mark.parametrize("option", ["--report", "--html"])
@pytest.mark.parametrize("command", ["plan", "apply"])
def test_report_and_html_onto_the_input(cli, ckpts, tmp_path, option, command):
    outputs = [tmp_path / "out.safetensors"] if command == "apply" else []
    refused(cli, tmp_path, command, ckpts / "a.safetensors", *outputs, option, ckpts / "a.safetensors", "--force",
            *SMALL, match="would overwrite the input")


@pytest.mark.parametrize("option", ["--report", "--html"])
@pytest.mark.parametrize("command", ["plan", "apply"])
def test_report_and_html_onto_an_existing_file_need_force(cli, ckpts, tmp_path, option, command):
    outputs = [tmp_path / "out.safetensors"] if command == "apply" else []
    refused(cli, tmp_path, command, ckpts / "a.safetensors", *outputs, option, ckpts / "notes.txt", *SMALL,
            match="already exists; pass --force")


def test_report_onto_the_output_or_the_html(cli, ckpts, tmp_path):
    out = tmp_path / "out.safetensors"
    refused(cli, tmp_path, "apply", ckpts / "a.safetensors", out, "--report", out, *SMALL, match="would be the same")
    refused(cli, tmp_path, "plan", ckpts / "a.safetensors", "--report", tmp_path / "r", "--html", tmp_path / "r",
            *SMALL, match="would be the same")


def test_report_onto_the_calibration_statistics(cli, ckpts, tmp_path):
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"not read: the paths are refused first")
    refused(cli, tmp_path, "apply", ckpts / "a.safetensors", tmp_path / "o.safetensors", "--calibration", stats,
            "--report", stats, "--force", *SMALL, match="would overwrite the input")


def test_output_inside_a_sharded_input_and_output_as_the_input(cli, tmp_path):
    sharded = tmp_path / "sharded"
    assert cli("apply", _toy(tmp_path), sharded, *SMALL).code == 0
    refused(cli, tmp_path, "apply", sharded, sharded / "x.safetensors", *SMALL, match="inside the input folder")
    refused(cli, tmp_path, "apply", sharded, sharded, "--force", *SMALL, match="would overwrite the input")


def test_mirroring_a_folder_into_itself_or_its_parent(cli, ckpts, tmp_path):
    refused(cli, tmp_path, "apply", ckpts, ckpts, "--force", *SMALL, match="output folder")
    refused(cli, tmp_path, "apply", ckpts, tmp_path, "--force", *SMALL, match="holds the input")
    refused(cli, tmp_path, "apply", ckpts / "a.safetensors", ckpts / "b.safetensors", ckpts, *SMALL,
            match="holds the input")


def test_symlinked_input_is_protected_through_the_link(cli, ckpts, tmp_path):
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpts / "a.safetensors")
    refused(cli, tmp_path, "apply", link, ckpts / "a.safetensors", "--force", *SMALL, match="overwrite the input")
    refused(cli, tmp_path, "apply", ckpts / "a.safetensors", link, "--force", *SMALL, match="overwrite the input")


def test_existing_file_needs_force_and_is_then_replaced(cli, ckpts, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    refused(cli, tmp_path, "apply", ckpts / "a.safetensors", out, *SMALL, match="already exists")
    assert cli("apply", ckpts / "a.safetensors", out, "--force", *SMALL).code == 0
    assert out.read_bytes() != b"old"


def test_statistics_output_follows_the_same_rule(cli, tmp_path):
    model = tmp_path / "m.jit"
    inputs = tmp_path / "x.pt"
    model.write_bytes(b"PK")  # never opened: the paths are refused first
    inputs.write_bytes(b"x")
    refused(cli, tmp_path, "calibrate", model, inputs, model, "--force", match="would overwrite the input")
    refused(cli, tmp_path, "calibrate", model, inputs, tmp_path, "--force", match="holds the input")


def test_check_targets_reports_a_missing_parent_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        check_targets({"report": tmp_path / "no" / "r.json"}, [], force=False)


def _toy(tmp_path: Path) -> Path:
    path = tmp_path / "toy.safetensors"
    save_file(toy_state_dict(), str(path))
    return path


def test_a_failed_folder_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        with atomic_path(dest, directory=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert snapshot(tmp_path) == {"out/old.txt": hashlib.sha256(b"old").hexdigest()}


SWAP_THEN_DIE = """
import os, sys
from pathlib import Path
from factorize_cli.atomic import atomic_path
real = os.replace
def die_after_first(src, dst):
    real(src, dst)
    os._exit(9)  # killed between the two renames of the swap
os.replace = die_after_first
with atomic_path(Path(sys.argv[1]), directory=True) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def test_a_run_killed_mid_swap_is_repaired_by_the_next(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", SWAP_THEN_DIE, str(dest)], cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 9
    assert not dest.exists()  # the old folder is aside, the new one never arrived
    sweep_stale(dest)
    assert snapshot(tmp_path) == {"out/old.txt": hashlib.sha256(b"old").hexdigest()}
