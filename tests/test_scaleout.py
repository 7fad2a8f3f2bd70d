"""``torchrun -m factorize_cli apply``: two processes on gloo write the bytes one process writes; a run
killed mid-way leaves nothing at the output and ``--resume`` finishes it to the same bytes; one rank's
failure stops every rank with that rank's error, without a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ONE = [sys.executable, "-m", "factorize_cli"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "factorize_cli"]
FLAGS = ["--min-features", "64", "-q"]


def env(threads: int, **extra: str) -> dict[str, str]:
    """One math thread per layer either way: one process with two threads factorizes two layers at a time
    on one thread each; torchrun's ranks get one thread each."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(filter(None, [root, *extra.pop("prepend", "").split(os.pathsep),
                                                        os.environ.get("PYTHONPATH", "")])), **extra}


def run(cmd: list[str], *args: object, threads: int, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *map(str, args)], env=env(threads, **extra), capture_output=True, text=True,
                          timeout=timeout)


def model(layers: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(layers):
        sd[f"blocks.{i}.up.weight"] = (torch.randn(2 * width, width, generator=g) / width ** 0.5).to(torch.bfloat16)
        sd[f"blocks.{i}.up.bias"] = torch.randn(2 * width, generator=g).to(torch.bfloat16)
        sd[f"blocks.{i}.down.weight"] = (torch.randn(width, 2 * width, generator=g) / width ** 0.5).to(torch.bfloat16)
        sd[f"blocks.{i}.norm.weight"] = torch.ones(width, dtype=torch.bfloat16)
    return sd


def sharded(folder: Path, sd: dict[str, torch.Tensor], shards: int = 2) -> Path:
    folder.mkdir()
    keys = list(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: sd[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def journals(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".factorize-journal"))


@pytest.mark.parametrize("source, output", [("file", "out.safetensors"), ("file", "out.pt"),
                                            ("sharded", "out")])
def test_two_processes_write_what_one_process_writes(tmp_path, source, output):
    sd = model(4, 384)  # 768 x 384: the Gram engine, whose products depend on the math threads per layer
    if source == "file":
        src = tmp_path / "in.safetensors"
        save_file(sd, src)
    else:
        src = sharded(tmp_path / "in", sd)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    a = run(ONE, "apply", src, one / output, *FLAGS, threads=2)
    b = run(TWO, "apply", src, two / output, *FLAGS, threads=1)
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    written_one, written_two = files(one / output), files(two / output)
    assert len(written_one) >= 1 and written_one == written_two  # every byte of every file
    report = json.loads((two / default_report(output)).read_text())
    assert report["execution"]["processes"] == 2
    assert report["execution"]["threads_per_layer"] == 1
    assert sum(report["execution"]["layers_per_process"]) == report["totals"]["factorized"] == 8
    assert min(report["execution"]["layers_per_process"]) == 4  # balanced: equal layers, equal shares
    assert journals(two) == []  # the journal goes once the output is in place
    if source == "sharded":  # each rank wrote one of the two shards, rank 0 the index
        assert report["execution"]["shards_per_process"] == [1, 1]
    assert b.stdout.strip() == ""  # -q: nothing on stdout from any rank


def default_report(output: str) -> str:
    return (output.rsplit(".", 1)[0] if "." in output else output) + ".factorize.json"


def test_a_killed_run_leaves_no_output_and_resume_finishes_it_to_the_same_bytes(tmp_path):
    src = tmp_path / "big.safetensors"
    save_file(model(12, 512, seed=1), src)
    flags = [*FLAGS, "--svd", "exact"]  # slow enough (~0.3 s a layer) to be killed half way
    reference = run(ONE, "apply", src, tmp_path / "ref.safetensors", *flags, threads=2)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out.safetensors"
    started = subprocess.Popen([*TWO, "apply", src, out, *flags, "--resume"], env=env(1),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    layers = tmp_path / f".{out.name}.factorize-journal" / "layers"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(layers.glob("*.safetensors")) if layers.is_dir() else []) < 3:
        time.sleep(0.02)
    for pid in [started.pid, *descendants(started.pid)]:  # torchrun and both ranks at once (a lost node)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    started.wait(timeout=60)
    done_before = len(list(layers.glob("*.safetensors")))
    assert 3 <= done_before < 24, "the run was not caught half way"
    assert not out.exists() and not (tmp_path / "out.factorize.json").exists()

    again = run(TWO, "apply", src, out, *flags, threads=1)  # without --resume: refused, journal kept
    assert again.returncode != 0 and "pass --resume" in again.stderr
    assert layers.is_dir()

    resumed = run(TWO, "apply", src, out, *flags, "--resume", threads=1)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    report = json.loads((tmp_path / "out.factorize.json").read_text())
    assert report["execution"]["resumed_layers"] >= done_before
    assert journals(tmp_path) == []


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_resume_in_one_process_and_a_journal_of_another_run_is_refused(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file(model(3, 128), src)
    out = tmp_path / "out.safetensors"
    first = run(ONE, "apply", src, out, *FLAGS, "--resume", threads=2)
    assert first.returncode == 0, first.stderr
    assert journals(tmp_path) == []
    plain = run(ONE, "apply", src, tmp_path / "plain.safetensors", *FLAGS, threads=2)
    assert out.read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    assert plain.returncode == 0

    # an interrupted run's journal, then the same output asked for with another seed: refused, kept
    journal = tmp_path / f".{out.name}.factorize-journal"
    (journal / "layers").mkdir(parents=True)
    (journal / "non-finite").mkdir()
    from factorize_cli.config import FactorizeConfig
    from factorize_cli.journal import identity

    (journal / "journal.json").write_text(json.dumps(identity(src, FactorizeConfig(seed=7))))
    other = run(ONE, "apply", src, out, *FLAGS, "--resume", "--force", threads=2)
    assert other.returncode == 2 and "seed changed" in other.stderr, other.stderr
    assert journal.is_dir()


HOOK = """
import os
if os.environ.get("RANK") == "1":
    from factorize_cli.formats import safetensors as st
    read = st.SafetensorsFile.get
    def get(self, key):
        if key == os.environ["FAIL_KEY"]:
            raise OSError(5, "Input/output error", str(self.path))
        return read(self, key)
    st.SafetensorsFile.get = get
"""


def test_a_rank_that_cannot_read_its_share_fails_every_rank_with_its_error(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file(model(4, 128), src)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)  # rank 1 gets an I/O error reading one of its weights

    out = tmp_path / "out.safetensors"
    t0 = time.monotonic()
    failed = run(TWO, "apply", src, out, *FLAGS, threads=1, timeout=120, prepend=str(hook),
                 FAIL_KEY=_a_key_of_rank_1(src))
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("factorize: error:")]
    assert errors == [f"factorize: error: rank 1: {src}: Input/output error"], failed.stderr
    assert time.monotonic() - t0 < 100  # every rank stopped: no wait for a timeout
    assert not out.exists()


def _a_key_of_rank_1(src: Path) -> str:
    from factorize_cli.config import FactorizeConfig, SelectionConfig
    from factorize_cli.formats import open_checkpoint
    from factorize_cli.distributed import Group
    from factorize_cli.pipeline import make_plan

    with open_checkpoint(src) as checkpoint:
        plan = make_plan(checkpoint, FactorizeConfig(selection=SelectionConfig(min_features=64)), spectra=False,
                         read_weights=False)
    layers = list(plan.to_factorize)
    rank_1 = Group(rank=1, world=2, backend="gloo")  # the deal every rank computes alike, as rank 1 sees it
    return layers[rank_1.share( [layer.geometry.cost for layer in layers])[0]].candidate.weight.key


def test_plan_under_torchrun_reads_each_share_once_and_rank_0_prints_the_plan(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file(model(3, 384), src)
    flags = ["--min-features", "64", "--rank-policy", "energy:0.6", "--json", "-q"]
    one = run(ONE, "plan", src, *flags, threads=2)
    two = run(TWO, "plan", src, *flags, threads=1)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # one JSON document: only rank 0 prints
    assert [layer["rank"] for layer in a["layers"]] == [layer["rank"] for layer in b["layers"]]
    assert all(layer["rank"] < 384 for layer in b["layers"])  # the energy policy read every spectrum
    # every spectrum computed on one math thread per layer either way: the same predictions to the last bit
    assert [layer["predicted_error"] for layer in a["layers"]] == [layer["predicted_error"] for layer in b["layers"]]
    assert b["totals"]["predicted_error"] == a["totals"]["predicted_error"]


def test_shards_cut_anywhere_hold_what_the_whole_layout_holds(tmp_path):
    """A shard of a greedy-filled folder may begin with a layer's second factor or its bias: each rank
    writes its shards from sub-layouts, and the pieces must be the whole output's tensors."""
    from factorize_cli.config import FactorizeConfig, SelectionConfig
    from factorize_cli.execution import Given, GivenFactors, GivenWork, LayerWork
    from factorize_cli.formats import open_checkpoint
    from factorize_cli.pipeline import make_plan
    from factorize_cli.rewrite import Role, execute, output_layout
    from factorize_cli.whitening import Whitener

    src = tmp_path / "in.safetensors"
    save_file(model(2, 64), src)
    config = FactorizeConfig(selection=SelectionConfig(min_features=32))
    with open_checkpoint(src) as checkpoint, Whitener(None) as whitener:
        plan = make_plan(checkpoint, config, spectra=False, read_weights=False)
        layout = output_layout(checkpoint, plan)
        computed = LayerWork(config, whitener)
        factors = {layer.name: computed.factorize(layer, checkpoint.get(layer.candidate.weight.key))
                   for layer in plan.to_factorize}
        given = lambda: GivenWork(lambda layer: (Given(GivenFactors(factors[layer.name][0].factors.first,  # noqa: E731
                                                                    factors[layer.name][0].factors.second)),
                                                 factors[layer.name][1]))
        whole = list(execute(checkpoint, layout, given()))
        cuts = [k for k, p in enumerate(layout) if p.role in (Role.SECOND, Role.BIAS)]
        assert cuts
        for k in cuts:
            pieces = list(execute(checkpoint, layout[:k], given())) + list(execute(checkpoint, layout[k:], given()))
            assert len(pieces) == len(whole) and all(torch.equal(a, b) for a, b in zip(pieces, whole))


@pytest.mark.parametrize("sequential", ["--sequential", "--no-sequential"])
def test_apply_data_under_torchrun_plans_and_factorizes_as_one_process(tmp_path, sequential):
    """Each rank runs its share of the text; sums added over ranks; per-layer work by one rank, installed by
    all. Same ranks as one process, and the written model's logits equal to float rounding."""
    pytest.importorskip("transformers")
    from factorize_cli import load_pretrained
    from tests.test_textdata import TEXT, gpt2_folder, write_lines

    folder = gpt2_folder(tmp_path / "gpt2", strip_prefix=False)
    data = write_lines(tmp_path / "text.txt", TEXT)
    flags = ["--data", data, "--min-features", "1", "--rank-policy", "params:0.8", "--batch-size", "4", sequential,
             "--json", "-q"]
    one = run(ONE, "apply", folder, tmp_path / "one", *flags, threads=2)
    two = run(TWO, "apply", folder, tmp_path / "two", *flags, threads=1)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    ranks = [layer["rank"] for layer in a["layers"]]
    assert sum(r is not None for r in ranks) >= 3 and ranks == [layer["rank"] for layer in b["layers"]]
    assert [layer["method"] for layer in a["layers"]] == [layer["method"] for layer in b["layers"]]
    assert a["notes"][0].split(";")[0] == b["notes"][0].split(";")[0]  # "calibrated on N batch(es)": all of them
    done = [(x, y) for x, y in zip(a["layers"], b["layers"]) if x["rank"] is not None]
    for x, y in done:  # the statistics of all the data, summed over the ranks (not one rank's share; a
        # sequential refit of this near-full-rank toy leaves errors ~1e-8, resolved only to float64 cancellation)
        assert y["achieved_output_error"] == pytest.approx(x["achieved_output_error"], rel=1e-6, abs=1e-7), x["name"]
        assert y["predicted_output_error"] == pytest.approx(x["predicted_output_error"], rel=1e-6, abs=1e-7), x["name"]
    ids = torch.tensor([[2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        x, y = load_pretrained(tmp_path / "one")(ids).logits, load_pretrained(tmp_path / "two")(ids).logits
        original = load_pretrained(folder)(ids).logits
    assert float((x - y).norm() / x.norm()) < 1e-5
    assert float((x - original).norm() / original.norm()) > 1e-3  # the model was factorized


def test_a_rank_that_dies_stops_the_others_with_a_clear_error_and_resume_finishes(tmp_path):
    src = tmp_path / "big.safetensors"
    save_file(model(12, 512, seed=2), src)
    flags = [*FLAGS, "--svd", "exact"]
    out = tmp_path / "out.safetensors"
    started = subprocess.Popen([*TWO, "apply", src, out, *flags], env=env(1), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    layers = tmp_path / f".{out.name}.factorize-journal" / "layers"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(layers.glob("*.safetensors")) if layers.is_dir() else []) < 3:
        time.sleep(0.02)
    rank_1 = [pid for pid in descendants(started.pid) if _environ(pid).get("RANK") == "1"]
    assert len(rank_1) == 1
    os.kill(rank_1[0], signal.SIGKILL)  # one rank dies (out of memory, a lost node)
    _, stderr = started.communicate(timeout=120)
    assert started.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("factorize: ")]
    assert ours and ours[0].startswith("factorize: error: stopped: torchrun ended this process"), stderr
    assert not out.exists()
    resumed = run(ONE, "apply", src, out, *flags, "--resume", threads=2)  # one process finishes it
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((tmp_path / "out.factorize.json").read_text())
    assert report["execution"]["processes"] == 1 and report["execution"]["resumed_layers"] >= 3  # the ranks' layers
    reference = run(ONE, "apply", src, tmp_path / "ref.safetensors", *flags, threads=2)
    assert reference.returncode == 0
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_a_refusal_every_rank_meets_is_said_once_and_touches_nothing(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file(model(2, 128), src)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the user's file")
    for target, said in ((out, "already exists; pass --force"), (src, "would overwrite the input")):
        before = src.read_bytes()
        refused = run(TWO, "apply", src, target, *FLAGS, threads=1, timeout=120)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("factorize: error:")]
        assert refused.returncode != 0 and len(errors) == 1 and said in errors[0], refused.stderr
        assert not errors[0].startswith("factorize: error: rank")  # rank 0 speaks for both
        assert src.read_bytes() == before and out.read_bytes() == b"the user's file"
    assert journals(tmp_path) == []
