"""``--verify``: run the original and the rewritten model on the same inputs, in a fresh process.

The child process is isolated (``python -I``: no PYTHONPATH, no working directory, no user site)
and refuses this package with a finder placed first on ``sys.meta_path``, so the check also proves
that the output loads without factorize: a result that needs it fails to load. Inputs come from
specs like ``randn:1,3,224,224`` (one per positional input; ``randn``, ``rand``, ``zeros``,
``ones``, optional ``:dtype``), seeded.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from factorize_cli.errors import InputError, UsageError

_SPEC = re.compile(r"^(randn|rand|zeros|ones):(\d+(?:,\d+)*)(?::(float32|float64|float16|bfloat16))?$")

# The prelude of a child that must not reach factorize_cli (run it with ``python -I``): a finder first on
# sys.meta_path refuses the package, which site-packages still holds; ``_BLOCKED`` lists what was asked for,
# in case a loader swallowed the ImportError.
BLOCKER = r"""
import sys
_BLOCKED = []
class _Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] == "factorize_cli":
            _BLOCKED.append(name)
            raise ImportError(f"{name} is blocked: the result must load without factorize")
        return None
sys.meta_path.insert(0, _Blocker)
"""

RUNNER = BLOCKER + r"""
fmt, original, result, specs, torch_root = sys.argv[1:6]
if torch_root and torch_root not in sys.path:  # torch found through PYTHONPATH, which -I ignores
    sys.path.append(torch_root)
import json, torch
specs = json.loads(specs)
def load(path):
    if fmt == "torchscript":
        m = torch.jit.load(path, map_location="cpu")
    else:
        m = torch.export.load(path).module()
    return m
def inputs():
    g = torch.Generator().manual_seed(0)
    out = []
    for kind, shape, dtype in specs:
        dt = getattr(torch, dtype)
        if kind == "randn":
            out.append(torch.randn(shape, generator=g).to(dt))
        elif kind == "rand":
            out.append(torch.rand(shape, generator=g).to(dt))
        else:
            out.append(getattr(torch, kind)(shape, dtype=dt))
    return out
def flat(y):
    if isinstance(y, torch.Tensor):
        return [y.detach().double().flatten()]
    if isinstance(y, dict):
        return [t for k in sorted(y) for t in flat(y[k])]
    if isinstance(y, (list, tuple)):
        return [t for item in y for t in flat(item)]
    return []
with torch.no_grad():
    a = flat(load(original)(*inputs()))
    b = flat(load(result)(*inputs()))
if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
    print(json.dumps({"error": "the outputs differ in structure or shape"}))
    sys.exit(0)
a, b = torch.cat(a), torch.cat(b)
diff = (a - b).abs()
scale = float(a.abs().max()) or 1.0
print(json.dumps({"max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
                  "max_rel_diff": (float(diff.max()) / scale) if diff.numel() else 0.0,
                  "clean": not _BLOCKED and "factorize_cli" not in sys.modules}))
"""


VERIFY_TIMEOUT_S = 3600


@dataclass(frozen=True)
class VerifySpec:
    kind: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str) -> VerifySpec:
        match = _SPEC.match(text.strip())
        if not match:
            raise UsageError(f"--verify {text!r}: expected KIND:D1,D2,...[:DTYPE] with KIND one of randn, rand, "
                             "zeros, ones (e.g. randn:1,3,224,224)")
        kind, dims, dtype = match.groups()
        return cls(kind, tuple(int(d) for d in dims.split(",")), dtype or "float32")


def verify(fmt: str, original: Path, result: Path, specs: list[VerifySpec], tolerance: float) -> dict:
    """Run both models in a fresh interpreter; the report's ``verify`` section."""
    args = json.dumps([[s.kind, list(s.shape), s.dtype] for s in specs])
    found = importlib.util.find_spec("torch")
    torch_root = str(Path(found.origin).parents[1]) if found and found.origin else ""
    try:
        run = subprocess.run([sys.executable, "-I", "-c", RUNNER, fmt, str(original), str(result), args, torch_root],
                             capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InputError(f"--verify: running the models took longer than {VERIFY_TIMEOUT_S} s; "
                         "use smaller --verify inputs") from None
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"--verify: running the models failed: {last[:300]}")
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    if "error" in outcome:
        raise InputError(f"--verify: {outcome['error']}")
    return {"inputs": [f"{s.kind}:{','.join(map(str, s.shape))}:{s.dtype}" for s in specs],
            "max_abs_diff": outcome["max_abs_diff"], "max_rel_diff": outcome["max_rel_diff"],
            "tolerance": tolerance, "passed": outcome["max_rel_diff"] <= tolerance,
            "loaded_without_factorize": outcome["clean"]}
