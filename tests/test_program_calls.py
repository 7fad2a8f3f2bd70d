"""Real call signatures for TorchScript and .pt2 programs (factorize_cli/graphs/calls.py): scalars, lists of
tensors, keyword arguments, an exported method, and state carried through a sequence with a reset, each
through ``calibrate`` and ``apply --verify``. What .pt2 cannot express (a method other than forward, hence
no reset method) is a one-line usage error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from factorize_cli.calibration import load_activation_stats

TOL = ["--verify-tol", "10"]  # the differences are checked against in-process runs, not a tolerance
SMALL = ["--min-features", "16", "--latent-features", "0.5", "-q", "--json"]


class Mixed(nn.Module):
    """Tensors, a list of tensors, float/int/bool scalars and a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 48)
        self.out = nn.Linear(48, 24)

    def forward(self, x: torch.Tensor, extra: list[torch.Tensor], scale: float, steps: int, flag: bool,
                gain: float = 1.0) -> torch.Tensor:
        h = self.fc(x * scale + extra[0])
        for _ in range(steps):
            h = torch.tanh(h)
        if flag:
            h = h * gain
        return self.out(h)

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Stateful(nn.Module):
    """A recurrent state in a buffer, updated by every call; ``reset`` clears it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.register_buffer("h", torch.zeros(1, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.fc(x + self.h))
        self.h.copy_(y)
        return y

    @torch.jit.export
    def reset(self) -> None:
        self.h.zero_()


def mixed_calls(n: int = 3) -> list:
    g = torch.Generator().manual_seed(1)
    return [{"args": (torch.randn(4, 32, generator=g), [torch.randn(4, 32, generator=g)], 0.5, 2, True),
             "kwargs": {"gain": 2.0}} for _ in range(n)]


def stateful_calls() -> dict:
    g = torch.Generator().manual_seed(2)
    return {"sequences": [[torch.randn(1, 32, generator=g) for _ in range(4)] for _ in range(3)]}


def save(module: nn.Module, fmt: str, folder: Path, example: tuple, kwargs: dict | None = None) -> Path:
    torch.manual_seed(0)
    module = module.eval()
    if fmt == "script":
        path = folder / "m.pt"
        torch.jit.save(torch.jit.script(module), str(path))
    else:
        path = folder / "m.pt2"
        torch.export.save(torch.export.export(module, example, kwargs or {}), str(path))
    return path


def stats_of(path: Path) -> dict:
    return {name: s for name, s in load_activation_stats(path).items()}


def expected_moments(rows: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat(rows).double()
    return x.T @ x


@pytest.mark.parametrize("fmt", ["script", "pt2"])
def test_scalars_lists_and_keyword_arguments(cli, tmp_path, fmt):
    torch.manual_seed(0)
    model = Mixed().eval()
    calls = mixed_calls()
    torch.save(calls, tmp_path / "calls.pt")
    path = save(model, fmt, tmp_path, calls[0]["args"], calls[0]["kwargs"])
    r = cli("calibrate", path, tmp_path / "calls.pt", tmp_path / "s.safetensors", "-q")
    assert r.code == 0, r.stderr
    stats = stats_of(tmp_path / "s.safetensors")
    fc_in = [c["args"][0] * 0.5 + c["args"][1][0] for c in calls]
    with torch.no_grad():
        out_in = [torch.tanh(torch.tanh(model.fc(x))) * 2.0 for x in fc_in]
    assert stats["fc"].count == 12 and torch.allclose(stats["fc"].xtx, expected_moments(fc_in), rtol=1e-5)
    assert torch.allclose(stats["out"].xtx, expected_moments(out_in), rtol=1e-4)

    before = (tmp_path / "calls.pt").read_bytes()  # the inputs file is an input: never the output
    r = cli("apply", path, tmp_path / "calls.pt", "--verify", tmp_path / "calls.pt", "--force", *TOL, *SMALL)
    assert r.code == 2 and "would overwrite the input" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (tmp_path / "calls.pt").read_bytes() == before
    r = cli("apply", path, tmp_path / f"small{path.suffix}", "--verify", tmp_path / "calls.pt", *TOL, *SMALL)
    assert r.code == 0, r.stderr
    verify = r.json["verify"]
    assert verify["inputs"] == [str(tmp_path / "calls.pt")] and verify["loaded_without_factorize"]
    assert verify["calls"] == "1 sequence(s), 3 call(s) of forward"
    small = load(tmp_path / f"small{path.suffix}", fmt)
    with torch.no_grad():
        want = max(float((model(*c["args"], **c["kwargs"]) - small(*c["args"], **c["kwargs"])).abs().max())
                   for c in calls)
    assert 0 < verify["max_abs_diff"] == pytest.approx(want, rel=1e-4)


def load(path: Path, fmt: str):
    return torch.jit.load(str(path)) if fmt == "script" else torch.export.load(str(path)).module()


def test_an_exported_method(cli, tmp_path):
    torch.manual_seed(0)
    model = Mixed().eval()
    path = save(model, "script", tmp_path, ())
    xs = [torch.randn(5, 32) for _ in range(2)]
    torch.save(xs, tmp_path / "calls.pt")
    r = cli("calibrate", path, tmp_path / "calls.pt", tmp_path / "s.safetensors", "--method", "encode", "-q")
    assert r.code == 0, r.stderr
    stats = stats_of(tmp_path / "s.safetensors")
    assert stats["fc"].count == 10 and torch.allclose(stats["fc"].xtx, expected_moments(xs), rtol=1e-5)
    assert stats["out"].count == 0  # encode never reaches it

    r = cli("apply", path, tmp_path / "small.pt", "--verify", tmp_path / "calls.pt", "--method", "encode",
            *TOL, *SMALL)
    assert r.code == 0, r.stderr
    small = torch.jit.load(str(tmp_path / "small.pt"))
    with torch.no_grad():
        want = max(float((model.encode(x) - small.encode(x)).abs().max()) for x in xs)
    assert r.json["verify"]["calls"].endswith("of encode") and r.json["verify"]["max_abs_diff"] == pytest.approx(
        want, rel=1e-4)

    r = cli("calibrate", path, tmp_path / "calls.pt", tmp_path / "t.safetensors", "--method", "decode")
    assert r.code == 2 and "no such method (it has: encode, forward)" in r.stderr and "Traceback" not in r.stderr


def stateful_reference(model: nn.Module, calls: dict, reset: bool) -> tuple[list, list]:
    """fc's inputs and the outputs, run eagerly: the state carried, reset before each sequence when asked."""
    inputs, outputs = [], []
    model.h.zero_()
    with torch.no_grad():
        for sequence in calls["sequences"]:
            if reset:
                model.reset()
            for x in sequence:
                inputs.append(x + model.h)
                outputs.append(model(x))
    model.h.zero_()
    return inputs, outputs


@pytest.mark.parametrize("fmt", ["script", "pt2"])
def test_state_carried_through_sequences_with_a_reset(cli, tmp_path, fmt):
    torch.manual_seed(0)
    model = Stateful().eval()
    calls = stateful_calls()
    torch.save(calls, tmp_path / "calls.pt")
    path = save(model, fmt, tmp_path, (torch.zeros(1, 32),))
    reset = ["--reset", "reset"] if fmt == "script" else []
    r = cli("calibrate", path, tmp_path / "calls.pt", tmp_path / "s.safetensors", *reset, "-q")
    assert r.code == 0, r.stderr
    fc = stats_of(tmp_path / "s.safetensors")["fc"]
    inputs, _ = stateful_reference(model, calls, reset=fmt == "script")
    assert fc.count == 12 and torch.allclose(fc.xtx, expected_moments(inputs), rtol=1e-5)
    stale, _ = stateful_reference(model, calls, reset=fmt != "script")
    assert not torch.allclose(fc.xtx, expected_moments(stale), rtol=1e-3)  # the reset (or its absence) shows

    out = tmp_path / f"small{path.suffix}"
    r = cli("apply", path, out, "--verify", tmp_path / "calls.pt", *reset, *TOL, *SMALL)
    assert r.code == 0, r.stderr
    small = load(out, fmt)
    mine = []
    with torch.no_grad():
        for sequence in calls["sequences"]:
            if fmt == "script":
                small.reset()
            mine += [small(x) for x in sequence]
    _, theirs = stateful_reference(model, calls, reset=fmt == "script")
    want = max(float((a - b).abs().max()) for a, b in zip(theirs, mine))
    assert r.json["verify"]["max_abs_diff"] == pytest.approx(want, rel=1e-4, abs=1e-7)

    r = cli("apply", path, tmp_path / "data" / out.name, "--data", tmp_path / "calls.pt", *reset, "--rank-policy",
            "params:0.7", *SMALL[:2])
    assert r.code == 0, r.stderr


def test_pt2_exports_forward_only(cli, tmp_path):
    path = save(Stateful(), "pt2", tmp_path, (torch.zeros(1, 32),))
    torch.save(stateful_calls(), tmp_path / "calls.pt")
    for option in (["--reset", "reset"], ["--method", "encode"]):
        r = cli("calibrate", path, tmp_path / "calls.pt", tmp_path / "s.safetensors", *option)
        assert r.code == 2 and "exports forward only" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        r = cli("apply", path, tmp_path / "o.pt2", "--verify", tmp_path / "calls.pt", *option, *SMALL[:4])
        assert r.code == 2 and "exports forward only" in r.stderr and not (tmp_path / "o.pt2").exists()


@pytest.mark.parametrize(("inputs", "words"), [
    ({"sequences": [[]]}, "a sequence holds no calls"),
    ([(torch.zeros(2), {1, 2})], "call 1, argument 2: a set is not an argument"),
    ([{"args": (torch.zeros(2),), "kw": {}}], "a dict call is {'args'"),
    ({"sequences": [torch.zeros(2)]}, "sequence 1 is a Tensor, not a list of calls"),
    ({"calls": []}, "expected a tensor, a list of calls"),
])
def test_bad_calls_are_one_line_errors(cli, tmp_path, inputs, words):
    path = save(Stateful(), "script", tmp_path, ())
    torch.save(inputs, tmp_path / "calls.pt")
    r = cli("calibrate", path, tmp_path / "calls.pt", tmp_path / "s.safetensors")
    assert r.code == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_method_options_need_program_inputs(cli, tmp_path):
    path = save(Stateful(), "script", tmp_path, ())
    r = cli("apply", path, tmp_path / "o.pt", "--reset", "reset")
    assert r.code == 2 and "--verify FILE or --data FILE" in r.stderr
    r = cli("calibrate", path, tmp_path / "c.pt", tmp_path / "s.safetensors", "--method", "not-a-name")
    assert r.code == 2 and "is not a method name" in r.stderr
