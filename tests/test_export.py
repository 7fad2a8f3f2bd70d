"""torch.export programs: each selected linear/conv call becomes two; the result loads with
torch.export.load in a fresh process and computes the rank-r model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import run_isolated
from tests.test_modules import reference_model
from tests.test_torchscript import CNN, MLP, Twins, flat


class Audio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(16, 32, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(32, 32, 3, padding=1, padding_mode="reflect", bias=False)
        self.fc = nn.Linear(32, 24)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(-1))


CASES = {
    "mlp": (MLP, lambda: (torch.randn(5, 48),)),
    "cnn": (CNN, lambda: (torch.randn(2, 6, 15, 13),)),
    "twins": (Twins, lambda: (torch.randn(4, 32), torch.randn(2, 16, 20))),
    "audio": (Audio, lambda: (torch.randn(3, 16, 40),)),
}

RUNNER = """
import sys, torch
original, result, inputs, out = sys.argv[1:5]
args = torch.load(inputs)
program = torch.export.load(result)
with torch.no_grad():
    y = program.module()(*args)
params = (sum(t.numel() for t in torch.export.load(original).state_dict.values()),
          sum(t.numel() for t in program.state_dict.values()))
torch.save({"y": y, "params": params, "clean": not _BLOCKED}, out)
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewritten_program_runs_the_rank_r_model(cli, tmp_path, case):
    factory, make_inputs = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    args = make_inputs()
    original = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, args), str(original))
    result = tmp_path / "small.pt2"
    r = cli("apply", original, result, "--min-features", "8", "--min-channels", "8", "--latent-features", "0.25",
            "--latent-channels", "0.25", "-q", "--json")
    assert r.code == 0, r.stderr
    assert r.json["input"]["format"] == "torch-export" and r.json["output"]["format"] == "torch-export"
    layers = {e["name"]: e for e in r.json["layers"]}
    ranks = {n: e["rank"] for n, e in layers.items() if e["action"] == "factorize"}
    assert ranks
    if case == "twins":
        assert layers["proj"]["reason"] == "not-rewritable"
    if case == "cnn":
        assert layers["c4"]["reason"] in ("grouped-conv", "not-rewritable")
    with torch.no_grad():
        expected = reference_model(model, ranks)(*args)
    torch.save(args, tmp_path / "inputs.pt")
    run = run_isolated(RUNNER, original, result, tmp_path / "inputs.pt", tmp_path / "out.pt")
    assert run.returncode == 0, run.stderr
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["clean"] and got["params"][1] < got["params"][0]
    assert float((flat(got["y"]) - flat(expected)).norm() / flat(expected).norm()) < 1e-5


def test_plan_lists_what_apply_touches_and_verify(cli, tmp_path):
    torch.manual_seed(1)
    original = tmp_path / "a.pt2"
    torch.export.save(torch.export.export(Audio().eval(), (torch.randn(2, 16, 40),)), str(original))
    args = ("--min-features", "8", "--min-channels", "8", "-q", "--json")
    planned = cli("plan", original, *args).json
    applied = cli("apply", original, tmp_path / "o.pt2", *args, "--verify", "randn:2,16,40", "--verify-tol", "10")
    assert applied.code == 0, applied.stderr
    assert [(e["name"], e["action"], e["rank"]) for e in planned["layers"]] == \
        [(e["name"], e["action"], e["rank"]) for e in applied.json["layers"]]
    assert applied.json["verify"]["loaded_without_factorize"] and applied.json["verify"]["max_abs_diff"] > 0
    r = cli("apply", original, tmp_path / "p.pt", "--min-features", "8")
    assert r.code == 2 and ".pt2" in r.stderr


def test_head_tied_to_the_embedding_is_left_alone(cli, tmp_path):
    from tests.test_torchscript import TiedLM, unique_parameter_bytes

    torch.manual_seed(5)
    model = TiedLM().eval()
    ids = torch.randint(0, 96, (3, 7))
    torch.export.save(torch.export.export(model, (ids,)), str(tmp_path / "lm.pt2"))
    r = cli("apply", tmp_path / "lm.pt2", tmp_path / "out.pt2", "--min-features", "1", "-q", "--json")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    assert layers["head"]["reason"] == "tied-weight" and "embed.weight" in layers["head"]["detail"]
    ranks = {n: e["rank"] for n, e in layers.items() if e["action"] == "factorize"}
    assert set(ranks) == {"fc1", "fc2"}
    program = torch.export.load(str(tmp_path / "out.pt2"))
    before = dict(torch.export.load(str(tmp_path / "lm.pt2")).state_dict)
    assert unique_parameter_bytes(dict(program.state_dict)) < unique_parameter_bytes(before)
    with torch.no_grad():
        expected = reference_model(model, ranks)(ids)
        got = program.module()(ids)
    assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_sequential_program(cli, tmp_path):
    """nn.Sequential's placeholder is named `input`, a builtin the graph copy renames: still rewritten."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)).eval()
    x = torch.randn(2, 64)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "seq.pt2"))
    r = cli("apply", tmp_path / "seq.pt2", tmp_path / "out.pt2", "--min-features", "8", "-q", "--json")
    assert r.code == 0, r.stderr
    ranks = {e["name"]: e["rank"] for e in r.json["layers"] if e["action"] == "factorize"}
    with torch.no_grad():
        expected = reference_model(model, ranks)(x)
        got = torch.export.load(str(tmp_path / "out.pt2")).module()(x)
    assert float((got - expected).norm() / expected.norm()) < 1e-5
