"""``--verify``: run the original and the rewritten model on the same inputs, in a fresh process.

The child process is isolated (``python -I``: no PYTHONPATH, no working directory, no user site)
and refuses this package with a finder placed first on ``sys.meta_path``, so the check also proves
that the output loads without factorize: a result that needs it fails to load. Inputs come from
specs like ``randn:1,3,224,224`` (one per positional input; ``randn``, ``rand``, ``zeros``,
``ones``, optional ``:dtype``), seeded, or from an INPUTS file of calls (:mod:`~factorize_cli.graphs.calls`,
as ``calibrate`` takes), which the parent checks and hands to the child as plain data.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from factorize_cli.errors import InputError, UsageError
from factorize_cli.graphs.calls import Call, Calls, Entry, load_calls

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
fmt, original, result, calls, torch_root = sys.argv[1:6]
if torch_root and torch_root not in sys.path:  # torch found through PYTHONPATH, which -I ignores
    sys.path.append(torch_root)
import json, torch
calls = torch.load(calls, weights_only=True)  # checked by the parent (factorize_cli.graphs.calls)
def load(path):
    if fmt == "torchscript":
        m = torch.jit.load(path, map_location="cpu")
    else:
        m = torch.export.load(path).module()
    return m
def flat(y):
    if isinstance(y, torch.Tensor):
        return [y.detach().double().flatten()]
    if isinstance(y, dict):
        return [t for k in sorted(y) for t in flat(y[k])]
    if isinstance(y, (list, tuple)):
        return [t for item in y for t in flat(item)]
    return []
def outputs(m):
    out = []
    for sequence in calls["sequences"]:
        if calls["reset"]:
            getattr(m, calls["reset"])()
        for args, kwargs in sequence:
            out += flat(getattr(m, calls["method"])(*args, **kwargs))
    return out
with torch.no_grad():
    a = outputs(load(original))
    b = outputs(load(result))
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


    def tensor(self, generator: torch.Generator) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        if self.kind in ("randn", "rand"):
            return getattr(torch, self.kind)(self.shape, generator=generator).to(dtype)
        return getattr(torch, self.kind)(self.shape, dtype=dtype)


@dataclass(frozen=True)
class VerifyInputs:
    """What ``--verify`` runs both models on: one call built from specs (seeded), or the calls of an INPUTS file
    (:mod:`~factorize_cli.graphs.calls`), with ``--method``/``--reset``."""

    specs: tuple[VerifySpec, ...]
    calls: Calls | None = None

    @classmethod
    def parse(cls, texts: Sequence[str], entry: Entry = Entry()) -> VerifyInputs | None:
        """None without --verify; a file is named alone (``--verify calls.pt``)."""
        if not texts:
            return None
        if len(texts) == 1 and not _SPEC.match(texts[0].strip()) and (":" not in texts[0] or Path(texts[0]).exists()):
            return cls((), load_calls(texts[0], entry))
        specs = tuple(VerifySpec.parse(text) for text in texts)
        generator = torch.Generator().manual_seed(0)  # one generator across the inputs, in order
        call = Call(tuple(s.tensor(generator) for s in specs))
        return cls(specs, Calls("--verify", ((call,),), entry))

    def described(self) -> list[str]:
        if self.specs:
            return [f"{s.kind}:{','.join(map(str, s.shape))}:{s.dtype}" for s in self.specs]
        return [self.calls.source]


def verify(fmt: str, original: Path, result: Path, inputs: VerifyInputs, tolerance: float) -> dict:
    """Run both models on the calls in a fresh interpreter; the report's ``verify`` section."""
    found = importlib.util.find_spec("torch")
    torch_root = str(Path(found.origin).parents[1]) if found and found.origin else ""
    with tempfile.TemporaryDirectory(prefix="factorize-verify-") as folder:
        calls = Path(folder) / "calls.pt"
        torch.save(inputs.calls.torch_save_form(), calls)
        try:
            run = subprocess.run([sys.executable, "-I", "-c", RUNNER, fmt, str(original), str(result), str(calls),
                                  torch_root], capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise InputError(f"--verify: running the models took longer than {VERIFY_TIMEOUT_S} s; "
                             "use smaller --verify inputs") from None
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"--verify: running the models failed: {last[:300]}")
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    if "error" in outcome:
        raise InputError(f"--verify: {outcome['error']}")
    return {"inputs": inputs.described(), "calls": inputs.calls.summary(),
            "max_abs_diff": outcome["max_abs_diff"], "max_rel_diff": outcome["max_rel_diff"],
            "tolerance": tolerance, "passed": outcome["max_rel_diff"] <= tolerance,
            "loaded_without_factorize": outcome["clean"]}
