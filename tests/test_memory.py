"""The CLI's allocation policy: a freed large tensor goes back to the operating system."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from factorize_cli.memory import release_large_allocations

PROBE = textwrap.dedent("""
    import os, sys, torch
    from factorize_cli.memory import release_large_allocations
    if sys.argv[1] == "policy":
        assert release_large_allocations()
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    big = torch.ones(30 << 18)  # 30 MiB, mapped: freeing it raises glibc's dynamic threshold to 30 MiB
    del big
    tensor = torch.ones(24 << 18)  # 24 MiB, touched
    held = rss()
    del tensor
    print((held - rss()) / 2**20)
""")


def _released(mode: str) -> float:
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120,
                         check=True, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    return float(out.stdout.strip())


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_a_freed_large_tensor_is_returned_to_the_system():
    assert _released("policy") >= 20  # MiB back at once
    assert _released("default") < 4  # without the policy glibc keeps it (the test can tell the two apart)


def test_the_users_own_threshold_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_large_allocations() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert release_large_allocations() is False


TRIM = textwrap.dedent("""
    import os, sys, torch
    from factorize_cli.memory import give_back, release_large_allocations
    release_large_allocations()
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    pieces = [torch.ones(1 << 20) for _ in range(48)]  # 48 x 4 MiB: below the threshold, in the arena
    keep = pieces[-1]
    del pieces  # freed, but below the last piece: the heap top cannot shrink
    held = rss()
    if sys.argv[1] == "trim":
        give_back()
    print((held - rss()) / 2**20)
""")


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc_trim")
def test_give_back_returns_what_a_layer_left_in_the_arenas():
    def run(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", TRIM, mode], capture_output=True, text=True, timeout=120,
                             check=True, env={"PATH": "/usr/bin:/bin"},
                             cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
        return float(out.stdout.strip())

    assert run("trim") >= 150  # MiB
    assert run("keep") < 8
