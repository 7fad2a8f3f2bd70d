"""``factorize calibrate`` under torchrun (issue 15): two processes, each running its share of the data,
write the statistics one process writes (equal counts, sums equal to float64 rounding); a failure on
one rank fails the run with that rank's error, promptly, and writes nothing.

Each launch is a real ``torch.distributed.run`` of two CPU processes (gloo), a few seconds each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factorize_cli.calibration import StatsFile, load_activation_stats
from tests.test_program_calls import Stateful, save, stateful_calls
from tests.test_textdata import TEXT, gpt2_folder, write_lines

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 120  # a launch takes seconds; a hang (a rank waiting on a dead peer) ends the test here


def torchrun(tmp_path: Path, *args: object, script: Path | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """``factorize ARGS`` (or ``script ARGS``) on two processes; the result and the folder holding each
    rank's own stdout/stderr (``<rank>/stderr.log``)."""
    logs = tmp_path / f"logs{len(list(tmp_path.glob('logs*')))}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", FACTORIZE_DIST_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    target = [str(script)] if script is not None else ["-m", "factorize_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--log-dir", str(logs), "--redirects", "3", *target, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT_S, cwd=tmp_path)
    attempts = list(logs.glob("*/attempt_0"))
    assert len(attempts) == 1, (attempts, done.stderr[-3000:])
    [attempt] = attempts
    return done, attempt


def rank_output(attempt: Path, rank: int, stream: str = "stderr") -> str:
    return (attempt / str(rank) / f"{stream}.log").read_text()


def assert_same_stats(one: Path, two: Path) -> float:
    """The two files hold the same layers, the same row counts exactly, and sums equal to float64 rounding
    (the ranks add their shares in another order); the largest relative difference of an ``xtx``."""
    a, b = load_activation_stats(one), load_activation_stats(two)
    assert set(a) == set(b) and a
    worst = 0.0
    for name in a:
        assert a[name].count == b[name].count, name
        for x, y in ((a[name].xtx, b[name].xtx), (a[name].total, b[name].total)):
            scale = float(x.abs().max())
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-12 * scale), name
        worst = max(worst, float((a[name].xtx - b[name].xtx).abs().max()) / float(a[name].xtx.abs().max()))
    return worst


def summary(attempt: Path) -> dict:
    """Rank 0's JSON summary (the other rank prints nothing)."""
    assert rank_output(attempt, 1, "stdout") == ""
    return json.loads(rank_output(attempt, 0, "stdout").strip().splitlines()[-1])


@pytest.fixture
def stateful_program(tmp_path) -> Path:
    torch.manual_seed(0)
    return save(Stateful(), "script", tmp_path, ())


def test_a_folder_calibrated_on_two_ranks_equals_one_process(cli, tmp_path):
    folder = gpt2_folder(tmp_path / "gpt2")
    data = write_lines(tmp_path / "t.txt", TEXT)
    options = ["--batch-size", "3"]  # 7 batches: 4 on one rank, 3 on the other
    one = cli("calibrate", folder, data, tmp_path / "one.safetensors", *options, "-q")
    assert one.code == 0, one.stderr
    done, attempt = torchrun(tmp_path, "calibrate", folder, data, tmp_path / "two.safetensors", *options)
    assert done.returncode == 0, done.stderr
    assert assert_same_stats(tmp_path / "one.safetensors", tmp_path / "two.safetensors") < 1e-13
    # every layer saw every real token of the whole data: without the sum over ranks rank 0 would write its share
    tokens = sum(len(s.split()) for s in TEXT)
    two = summary(attempt)
    assert set(two["layers"].values()) == {tokens} and two["layers"] == one.json["layers"]
    assert (two["batches"], two["samples"], two["processes"]) == (7, 20, 2)
    assert one.json["processes"] == 1
    assert "on 2 processes" in rank_output(attempt, 0) and rank_output(attempt, 1) == ""
    with StatsFile(tmp_path / "one.safetensors") as a, StatsFile(tmp_path / "two.safetensors") as b:
        assert b._file.metadata["processes"] == "2"
        # measured on a share of the layers per rank, gathered: every layer's, as one process measures it
        assert all(b.sensitivity(n) == pytest.approx(a.sensitivity(n), rel=1e-9) for n in a.layers)
        assert all(b.sensitivity(n) is not None for n in a.layers)


def test_program_sequences_on_two_ranks_equal_one_process(cli, tmp_path, stateful_program):
    torch.save(stateful_calls(), tmp_path / "calls.pt")  # 3 sequences of 4 stateful calls
    args = [stateful_program, tmp_path / "calls.pt"]
    one = cli("calibrate", *args, tmp_path / "one.safetensors", "--reset", "reset", "-q")
    assert one.code == 0, one.stderr
    done, attempt = torchrun(tmp_path, "calibrate", *args, tmp_path / "two.safetensors", "--reset", "reset")
    assert done.returncode == 0, done.stderr
    assert assert_same_stats(tmp_path / "one.safetensors", tmp_path / "two.safetensors") < 1e-13
    two = summary(attempt)
    assert two["layers"] == {"fc": 12} == one.json["layers"]  # all 12 calls, not rank 0's 8
    assert two["sequences_per_process"] == [2, 1] and (two["batches"], two["processes"]) == (12, 2)
    assert "note" not in two


def test_stateless_sequences_without_a_reset_are_dealt_out(cli, tmp_path):
    from tests.test_torchscript import MLP

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(MLP().eval()), str(tmp_path / "mlp.pt"))
    g = torch.Generator().manual_seed(4)
    torch.save({"sequences": [[torch.randn(8, 48, generator=g) for _ in range(n)] for n in (3, 1, 2, 2, 1)]},
               tmp_path / "calls.pt")
    args = [tmp_path / "mlp.pt", tmp_path / "calls.pt"]
    one = cli("calibrate", *args, tmp_path / "one.safetensors", "-q")
    assert one.code == 0, one.stderr
    done, attempt = torchrun(tmp_path, "calibrate", *args, tmp_path / "two.safetensors")
    assert done.returncode == 0, done.stderr
    assert assert_same_stats(tmp_path / "one.safetensors", tmp_path / "two.safetensors") < 1e-13
    two = summary(attempt)
    assert two["layers"] == {"fc1": 72, "fc2": 72, "out": 72} and two["sequences_per_process"] == [3, 2]


def test_state_carried_between_sequences_is_not_dealt_out(tmp_path):
    """A .pt2 program has no reset method: one process starts each sequence where the one before left its
    buffers, a rank starts its share from the loaded program. Rather than statistics that depend on the
    number of processes, a one-line refusal."""
    path = save(Stateful(), "pt2", tmp_path, (torch.zeros(1, 32),))
    torch.save(stateful_calls(), tmp_path / "calls.pt")
    done, attempt = torchrun(tmp_path, "calibrate", path, tmp_path / "calls.pt", tmp_path / "s.safetensors")
    assert done.returncode != 0
    [line] = rank_output(attempt, 0).splitlines()
    assert "keeps state in h and no --reset clears it" in line and "calibrate in one process" in line
    assert not (tmp_path / "s.safetensors").exists()


def test_dropping_the_sum_over_ranks_is_caught(tmp_path, stateful_program):
    """The planted fault: each rank keeps its own share's statistics. Rank 0 then writes 8 rows of 12,
    and the comparison above fails on the counts."""
    torch.save(stateful_calls(), tmp_path / "calls.pt")
    planted = tmp_path / "no_reduce.py"
    planted.write_text("import factorize_cli.calibration as c\n"
                       "c.reduce_stats = lambda stats, group: None\n"
                       "from factorize_cli.cli import main\nmain()\n")
    args = [stateful_program, tmp_path / "calls.pt"]
    for name, script in (("good", None), ("bad", planted)):
        done, _ = torchrun(tmp_path, "calibrate", *args, tmp_path / f"{name}.safetensors", "--reset", "reset",
                           script=script)
        assert done.returncode == 0, done.stderr
    assert load_activation_stats(tmp_path / "bad.safetensors")["fc"].count == 8
    with pytest.raises(AssertionError):
        assert_same_stats(tmp_path / "good.safetensors", tmp_path / "bad.safetensors")


def test_one_sequence_runs_whole_on_rank_0_and_the_summary_says_so(tmp_path, stateful_program):
    torch.save([torch.randn(1, 32) for _ in range(3)], tmp_path / "calls.pt")  # one sequence of 3 calls
    done, attempt = torchrun(tmp_path, "calibrate", stateful_program, tmp_path / "calls.pt",
                             tmp_path / "s.safetensors")
    assert done.returncode == 0, done.stderr
    two = summary(attempt)
    assert two["layers"] == {"fc": 3} and two["sequences_per_process"] == [1, 0]
    assert "rank(s) 1 ran none" in two["note"] and "note: 1 sequence(s) for 2 processes" in rank_output(attempt, 0)


def test_a_failure_on_rank_1_fails_every_rank_with_its_error(tmp_path, stateful_program):
    g = torch.Generator().manual_seed(3)
    good, bad = ([torch.randn(1, width, generator=g) for _ in range(2)] for width in (32, 31))
    torch.save({"sequences": [good, bad]}, tmp_path / "calls.pt")  # the second sequence (rank 1's) cannot run
    done, attempt = torchrun(tmp_path, "calibrate", stateful_program, tmp_path / "calls.pt",
                             tmp_path / "s.safetensors", "--reset", "reset")
    assert done.returncode != 0
    [line] = rank_output(attempt, 0).splitlines()
    assert line.startswith("factorize: error: rank 1: ") and "running the model on its inputs failed" in line
    assert rank_output(attempt, 1) == ""  # rank 0 speaks for every rank: one line, no traceback
    assert not (tmp_path / "s.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.safetensors")]  # no temporary left


def test_leaving_the_group_stops_its_threads_even_after_dynamo_is_imported(tmp_path):
    """torch._dynamo (imported by transformers and torch.export once the group exists) imports
    torch.distributed.nn, whose functions keep the world group as a default argument unless it was imported
    first; the group then outlives destroy_process_group, and its worker threads outlive the interpreter
    (a rank aborted at exit about one run in five). Leaving the group must leave no thread behind."""
    script = tmp_path / "threads.py"
    script.write_text("import os, torch\n"
                      "from factorize_cli import distributed\n"
                      "count = lambda: len(os.listdir('/proc/self/task'))\n"
                      "before = count()\n"
                      "group = distributed.current('cpu')\n"
                      "import torch._dynamo\n"
                      "group.gather(group.rank)\n"
                      "joined = count()\n"
                      "distributed.close()\n"
                      "print(before, joined, count())\n")
    done, attempt = torchrun(tmp_path, script=script)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        before, joined, after = map(int, rank_output(attempt, rank, "stdout").split())
        assert joined > before == after, (rank, before, joined, after)
