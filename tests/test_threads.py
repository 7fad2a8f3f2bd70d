"""Generators that own thread pools (read-ahead, two layers at a time) may be left half-consumed (an
error, a NaN weight) and finalized by the garbage collector at any moment, including while a new
thread is starting and holds the lock that ``Thread.join`` needs: closing them must never join a thread.
Each case runs in a child process (a deadlock there cannot hang the suite); the planted fault, a
``with ThreadPoolExecutor`` in the generator, hangs the child (this hung CI once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, threading, torch
from safetensors.torch import save_file
from factorize_cli.formats import open_checkpoint
from factorize_cli.formats.base import prefetch
save_file({f"w{i}": torch.randn(64, 64) for i in range(8)}, sys.argv[1])
with open_checkpoint(sys.argv[1]) as checkpoint:
    if sys.argv[2] == "prefetch":
        gen = prefetch(checkpoint, iter([f"w{i}" for i in range(8)]))
    else:
        from factorize_cli.config import FactorizeConfig, SelectionConfig
        from factorize_cli.execution import LayerWork
        from factorize_cli.pipeline import make_plan
        from factorize_cli.rewrite import execute, output_layout
        from factorize_cli.whitening import Whitener
        config = FactorizeConfig(selection=SelectionConfig(min_features=8))
        plan = make_plan(checkpoint, config, spectra=False, read_weights=False)
        gen = execute(checkpoint, output_layout(checkpoint, plan), LayerWork(config, Whitener(None)))
    next(gen)
    with threading._shutdown_locks_lock:  # what a collection during a thread's start holds
        gen.close()
print("closed")
"""


@pytest.mark.parametrize("what", ["prefetch", "execute"])
def test_an_abandoned_pipeline_generator_closes_without_joining_threads(tmp_path, what):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "m.safetensors"), what], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "closed", done.stderr
