"""Many checkpoints in one run: discovery, mirroring, JSON lines, exit codes, stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import SMALL, toy_state_dict
from tests.test_formats import make_sharded

FACTORIZE = [sys.executable, "-m", "factorize_cli"]


@pytest.fixture
def ckpts(tmp_path: Path) -> Path:
    root = tmp_path / "ckpts"
    (root / "sub").mkdir(parents=True)
    sd = toy_state_dict()
    save_file(sd, str(root / "a.safetensors"))
    torch.save({"state_dict": sd, "epoch": 3}, root / "sub" / "b.pt")
    make_sharded(root / "sharded", sd, [list(sd)[:4], list(sd)[4:]])
    (root / "notes.txt").write_text("not a checkpoint")
    return root


def test_folder_is_mirrored(cli, ckpts, tmp_path):
    out = tmp_path / "small"
    r = cli("apply", ckpts, out, *SMALL, "--jsonl", "-q")
    assert r.code == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["input"] for line in lines] == [str(ckpts / "a.safetensors"), str(ckpts / "sharded"),
                                                 str(ckpts / "sub" / "b.pt")]  # sorted, sharded dir as one
    assert all(line["status"] == "ok" and line["exit_code"] == 0 for line in lines)
    assert load_file(str(out / "a.safetensors"))["fc1.module0.weight"].shape == (16, 64)
    assert (out / "sharded" / "model.safetensors.index.json").exists()
    assert torch.load(out / "sub" / "b.pt", weights_only=True)["epoch"] == 3
    assert (out / "sub" / "b.factorize.json").exists() and (out / "a.factorize.json").exists()
    assert lines[0]["output"] == str(out / "a.safetensors") and lines[0]["totals"]["factorized"] == 3


def test_glob_selects_files(cli, ckpts):
    r = cli("plan", ckpts, "--glob", "*.pt", "--jsonl", "-q")
    assert r.code == 0
    # the sharded directory is a checkpoint whatever the file pattern
    assert [json.loads(x)["input"] for x in r.stdout.splitlines()] == [str(ckpts / "sharded"),
                                                                       str(ckpts / "sub" / "b.pt")]


def test_one_bad_input_does_not_stop_the_others(cli, ckpts, tmp_path):
    (ckpts / "broken.safetensors").write_bytes(b"\x00" * 40)
    r = cli("apply", ckpts, tmp_path / "out", *SMALL, "--jsonl", "-q", "--max-layer-error", "0.9")
    assert r.code == 2
    lines = {Path(x["input"]).name: x for x in map(json.loads, r.stdout.splitlines())}
    assert lines["broken.safetensors"]["status"] == "error" and "not a" in lines["broken.safetensors"]["error"]
    assert lines["a.safetensors"]["status"] == "ok" and lines["b.pt"]["status"] == "ok"
    assert (tmp_path / "out" / "a.safetensors").exists() and not (tmp_path / "out" / "broken.safetensors").exists()
    assert "4 checkpoints: 3 done, 0 failed a gate, 1 failed" in r.stderr


def test_exit_code_is_the_worst(cli, ckpts, tmp_path):
    r = cli("plan", ckpts / "a.safetensors", ckpts / "sub" / "b.pt", *SMALL, "--max-layer-error", "0.01", "-q")
    assert r.code == 1 and r.stderr.count("gate failed") >= 2
    r = cli("plan", ckpts / "a.safetensors", tmp_path / "missing.pt", *SMALL, "--max-layer-error", "0.01", "-q")
    assert r.code == 2


def test_several_inputs_keep_their_names(cli, ckpts, tmp_path):
    r = cli("apply", ckpts / "a.safetensors", ckpts / "sub" / "b.pt", tmp_path / "out", *SMALL, "-q")
    assert r.code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.factorize.json", "a.safetensors", "b.factorize.json", "b.pt"]


def test_name_collisions_and_single_only_options_are_usage_errors(cli, ckpts, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_file(toy_state_dict(), str(other / "a.safetensors"))
    r = cli("apply", ckpts / "a.safetensors", other / "a.safetensors", tmp_path / "out")
    assert r.code == 2 and "would both be written" in r.stderr
    r = cli("plan", ckpts, "--json")
    assert r.code == 2 and "--jsonl" in r.stderr


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_stdin(ckpts, tmp_path, kind):
    source = ckpts / ("a.safetensors" if kind == "safetensors" else "sub/b.pt")
    data = source.read_bytes()
    r = subprocess.run([*FACTORIZE, "plan", "-", *SMALL, "--json", "-q"], input=data, capture_output=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["input"]["path"] == "<stdin>" and report["totals"]["factorized"] == 3
    out = tmp_path / f"from-stdin{source.suffix}"
    r = subprocess.run([*FACTORIZE, "apply", "-", str(out), *SMALL, "-q"], input=data, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert out.exists() and (tmp_path / "from-stdin.factorize.json").exists()


def readme_pipeline_block() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Use in CI and pipelines", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_pipeline_examples_run(ckpts, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", NO_COLOR="1")
    lines = readme_pipeline_block()
    assert len(lines) >= 4
    for line in lines:
        r = subprocess.run(["bash", "-c", f"set -o pipefail; {line}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, f"{line}\n{r.stderr}"
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {x["status"] for x in results} == {"ok"} and len(results) == 3


def test_graph_formats_in_a_folder_are_mirrored_in_their_own_format(cli, tmp_path):
    from tests.test_torchscript import MLP

    root = tmp_path / "models"
    root.mkdir()
    model = MLP().eval()
    torch.jit.save(torch.jit.script(model), str(root / "m.jit"))
    torch.export.save(torch.export.export(model, (torch.randn(2, 48),)), str(root / "m.pt2"))
    r = cli("apply", root, tmp_path / "out", "--min-features", "8", "--jsonl", "-q")
    assert r.code == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [Path(x["output"]).name for x in lines] == ["m.jit", "m.pt2"]
    # the two would share m.factorize.json: each report is named by its file instead
    assert [Path(x["report"]).name for x in lines] == ["m.jit.factorize.json", "m.pt2.factorize.json"]
    assert torch.jit.load(str(tmp_path / "out" / "m.jit"))(torch.randn(3, 48)).shape == (3, 12)
    assert torch.export.load(str(tmp_path / "out" / "m.pt2")).module()(torch.randn(2, 48)).shape == (2, 12)


def test_failures_that_are_not_ours_fail_one_checkpoint_not_the_batch(cli, ckpts, tmp_path, monkeypatch):
    """A full disk (OSError) and a library failure (say LAPACK) stop only their own checkpoint."""
    import errno

    import factorize_cli.pipeline as pipeline

    real = pipeline.apply_checkpoint

    def flaky(path, output, config, **kwargs):
        if Path(path).name == "a.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(output))
        if Path(path).name == "b.pt":
            raise RuntimeError("linalg.svd: The algorithm failed to converge")
        return real(path, output, config, **kwargs)

    monkeypatch.setattr(pipeline, "apply_checkpoint", flaky)
    r = cli("apply", ckpts, tmp_path / "out", *SMALL, "--jsonl", "-q")
    lines = {Path(x["input"]).name: x for x in map(json.loads, r.stdout.splitlines())}
    assert lines["a.safetensors"]["status"] == "error" and lines["a.safetensors"]["exit_code"] == 2
    assert "No space left on device" in lines["a.safetensors"]["error"]
    assert lines["b.pt"]["status"] == "internal-error" and lines["b.pt"]["exit_code"] == 3
    assert "failed to converge" in lines["b.pt"]["error"]
    assert lines["sharded"]["status"] == "ok"
    assert (tmp_path / "out" / "sharded" / "model.safetensors.index.json").exists()
    assert r.code == 3  # the worst
    errors = [line for line in r.stderr.splitlines() if line.startswith("factorize: error:")]
    assert len(errors) == 2 and "Traceback" not in r.stderr
    assert "3 checkpoints: 1 done, 0 failed a gate, 2 failed" in r.stderr


def test_a_verify_timeout_is_one_clean_error(cli, tmp_path, monkeypatch):
    import factorize_cli.graphs.verify as verify

    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 40))
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    monkeypatch.setattr(verify, "VERIFY_TIMEOUT_S", 0.01)
    r = cli("apply", tmp_path / "m.pt", tmp_path / "o.pt", "--min-features", "32", "--verify", "randn:7,48", "-q")
    assert r.code == 2 and "took longer than 0.01 s" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.pt").exists()
