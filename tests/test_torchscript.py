"""TorchScript in, TorchScript out: the rewritten archive loads in a fresh process, is smaller, and
computes the rank-r model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import fetch_wheel_folder, run_isolated
from tests.test_modules import reference_model, truncated


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(48, 64)
        self.fc2 = nn.Linear(64, 40, bias=False)
        self.out = nn.Linear(40, 12)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(6, 24, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(24, 32, 3, dilation=2, padding=2, padding_mode="reflect", bias=False)
        self.c3 = nn.Conv2d(32, 32, (3, 1), padding="same", padding_mode="circular")
        self.c4 = nn.Conv2d(32, 32, 3, groups=2, padding=1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        x = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        x = torch.tanh(self.c4(torch.tanh(self.c3(x))))
        return self.fc(x.mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)

    def forward(self, x, y):
        return torch.relu(self.fc(x)), torch.relu(self.conv(y))


class Twins(nn.Module):
    """Two instances of one class (one shared TorchScript type), an exported method, a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Block()
        self.b = Block()
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x, y):
        x, y = self.a(x, y)
        x, y = self.b(x, y)
        x = self.proj(x) + x @ self.proj.weight  # proj's weight is read outside its call: tied
        return self.head(x), y

    @torch.jit.export
    def logits(self, x):
        return self.head(x)


CASES = {
    "mlp": (MLP, lambda: (torch.randn(5, 48),)),
    "cnn": (CNN, lambda: (torch.randn(2, 6, 15, 13),)),
    "twins": (Twins, lambda: (torch.randn(4, 32), torch.randn(2, 16, 20))),
}

RUNNER = """
import sys, torch
original, result, inputs, out = sys.argv[1:5]
args = torch.load(inputs)
m = torch.jit.load(result)
with torch.no_grad():
    y = m(*args)
extra = m.logits(args[0]) if hasattr(m, "logits") else None
params = (sum(p.numel() for p in torch.jit.load(original).parameters()), sum(p.numel() for p in m.parameters()))
torch.save({"y": y, "extra": extra, "params": params, "clean": not _BLOCKED}, out)
"""


def run_fresh(tmp: Path, original: Path, result: Path, args) -> dict:
    torch.save(args, tmp / "inputs.pt")
    r = run_isolated(RUNNER, original, result, tmp / "inputs.pt", tmp / "out.pt")
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp / "out.pt", weights_only=False)
    assert got["clean"], "loading the result must not need factorize_cli"
    return got


def test_the_fresh_process_cannot_import_factorize():
    """What makes the fresh-process checks able to fail: the child refuses our package, however installed."""
    r = run_isolated("import factorize_cli")
    assert r.returncode == 1 and "ImportError: factorize_cli is blocked" in r.stderr
    r = run_isolated("import json\ntry:\n    import factorize_cli.cli\nexcept ImportError:\n    pass\n"
                     "print(json.dumps(_BLOCKED))")
    assert r.returncode == 0 and json.loads(r.stdout) == ["factorize_cli"], r.stderr  # a swallowed refusal shows


def flat(y):
    return torch.cat([t.flatten() for t in y]) if isinstance(y, tuple) else y.flatten()


@pytest.mark.parametrize("mode", ["script", "trace"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rewritten_archive_runs_the_rank_r_model(cli, tmp_path, case, mode):
    factory, make_inputs = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    args = make_inputs()
    scripted = torch.jit.script(model) if mode == "script" else torch.jit.trace(model, args)
    original = tmp_path / "model.pt"
    torch.jit.save(scripted, str(original), _extra_files={"notes.txt": "keep me"})
    result = tmp_path / "small.pt"
    r = cli("apply", original, result, "--min-features", "8", "--min-channels", "8", "--latent-features", "0.25",
            "--latent-channels", "0.25", "-q", "--json")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    ranks = {n: e["rank"] for n, e in layers.items() if e["action"] == "factorize"}
    assert ranks and r.json["output"]["format"] == "torchscript"
    if case == "twins":
        assert {"a.fc", "b.fc", "a.conv", "b.conv", "head"} <= set(ranks)
        assert layers["proj"]["reason"] == "not-rewritable" and "outside" in layers["proj"]["detail"]
    if case == "cnn":
        assert layers["c4"]["reason"] in ("grouped-conv", "not-rewritable")
    reference = reference_model(model, ranks)
    with torch.no_grad():
        expected = reference(*args)
    got = run_fresh(tmp_path, original, result, args)
    assert float((flat(got["y"]) - flat(expected)).norm() / flat(expected).norm()) < 1e-5
    assert got["params"][1] < got["params"][0]
    if case == "twins" and mode == "script":
        assert torch.allclose(got["extra"], reference.logits(args[0]), rtol=1e-4, atol=1e-5)
    extra = {"notes.txt": ""}
    torch.jit.load(str(result), _extra_files=extra)
    assert extra["notes.txt"] in (b"keep me", "keep me")


def test_factors_live_where_the_layer_lives_unless_its_type_is_shared(cli, tmp_path):
    from factorize_cli.graphs.torchscript import attribute_path, walk

    torch.jit.save(torch.jit.script(Twins().eval()), str(tmp_path / "t.pt"))
    r = cli("apply", tmp_path / "t.pt", tmp_path / "o.pt", "--min-features", "8", "--min-channels", "8", "-q", "--json")
    assert r.code == 0, r.stderr
    ranks = {e["name"]: e["rank"] for e in r.json["layers"] if e["action"] == "factorize"}
    result = torch.jit.load(str(tmp_path / "o.pt"))
    state = {k: tuple(v.shape) for k, v in result.state_dict().items()}
    # head's class type is its own: the pair sits on the layer, as in a factorized state dict
    assert state["head.module0.weight"] == (ranks["head"], 32) and state["head.module1.weight"] == (8, ranks["head"])
    assert state["head.weight"] == (0,) and state["head.bias"] == (8,)
    # a.fc shares its type with b.fc and proj (one scripted class for equal Linears): the pair sits on the root
    assert state["factorized__a__fc.0.weight"] == (ranks["a.fc"], 32)
    assert state["factorized__a__fc.1.weight"] == (32, ranks["a.fc"])
    assert state["a.fc.weight"] == (0,) and state["a.fc.bias"] == (32,)
    assert not any(k.startswith(("a.fc.module", "factorized__head")) for k in state)
    assert state["proj.weight"] == (32, 32)  # not rewritable, and its type is untouched
    factor_keys = {k for k in state if ".module0." in k or ".module1." in k or k.startswith("factorized__")}
    assert len(factor_keys) == 2 * len(ranks)
    read = {attribute_path(n.output()) for n in walk(result.graph) if n.kind() == "prim::GetAttr"}
    assert {"head.module0.weight", "head.module1.weight", "factorized__a__fc.0.weight"} <= read
    assert not {f"{layer}.weight" for layer in ranks} & read  # no method reads an emptied weight


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_every_pair_sits_on_its_layer_when_types_are_unique(cli, tmp_path, mode):
    model, x = MLP().eval(), torch.randn(5, 48)
    scripted = torch.jit.script(model) if mode == "script" else torch.jit.trace(model, (x,))
    torch.jit.save(scripted, str(tmp_path / "m.pt"))
    r = cli("apply", tmp_path / "m.pt", tmp_path / "o.pt", "--min-features", "8", "-q", "--json")
    assert r.code == 0, r.stderr
    ranks = {e["name"]: e["rank"] for e in r.json["layers"] if e["action"] == "factorize"}
    assert set(ranks) == {"fc1", "fc2", "out"}
    state = torch.jit.load(str(tmp_path / "o.pt")).state_dict()
    expected = {"fc1.bias", "out.bias"} | {f"{layer}.{part}" for layer in ranks
                                           for part in ("weight", "module0.weight", "module1.weight")}
    assert set(state) == expected
    assert all(state[f"{layer}.weight"].numel() == 0 for layer in ranks)


def test_plan_lists_what_apply_touches(cli, tmp_path):
    torch.jit.save(torch.jit.script(Twins().eval()), str(tmp_path / "t.pt"))
    args = ("--min-features", "8", "--min-channels", "8", "-q", "--json")
    planned = cli("plan", tmp_path / "t.pt", *args).json
    applied = cli("apply", tmp_path / "t.pt", tmp_path / "o.pt", *args).json
    assert [(e["name"], e["action"], e["rank"]) for e in planned["layers"]] == \
        [(e["name"], e["action"], e["rank"]) for e in applied["layers"]]
    assert planned["input"]["format"] == "torchscript"


def test_user_class_named_linear_is_not_a_candidate(cli, tmp_path):
    class Linear(nn.Module):  # same name as torch's, different class
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return x @ self.weight

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mine = Linear()
            self.real = nn.Linear(32, 32)

        def forward(self, x):
            return self.real(self.mine(x))

    torch.jit.save(torch.jit.script(Net()), str(tmp_path / "n.pt"))
    r = cli("plan", tmp_path / "n.pt", "--min-features", "8", "-q", "--json")
    assert [e["name"] for e in r.json["layers"]] == ["real"]


def test_torchscript_output_must_be_an_archive(cli, tmp_path):
    torch.jit.save(torch.jit.script(MLP()), str(tmp_path / "m.pt"))
    r = cli("apply", tmp_path / "m.pt", tmp_path / "m.safetensors", "--min-features", "8")
    assert r.code == 2 and "written back in its own format" in r.stderr


SILERO = "silero-vad==6.2.3"
SILERO_RUNNER = """
import json, math, sys, torch
def signal(seconds=4.0, sr=16000):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * sr)) / sr
    voiced = sum(torch.sin(2 * math.pi * 120 * k * t) / k for k in range(1, 12))
    speech = voiced * (0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t)).clamp_min(0) ** 2 * 0.3
    gate = (t > 1.0) & (t < 3.0)
    return torch.where(gate, speech + 0.01 * torch.randn(len(t), generator=g), 0.003 * torch.randn(len(t), generator=g))
def probabilities(m):
    m.reset_states()
    x = signal()
    with torch.no_grad():
        return torch.tensor([float(m(x[i:i + 512], 16000)) for i in range(0, len(x) - 511, 512)])
original, result, report = sys.argv[1:4]
reference = torch.jit.load(original)
for e in json.load(open(report))["layers"]:
    if e["action"] == "factorize":
        sub = reference
        for part in e["name"].split("."):
            sub = getattr(sub, part)
        w = sub.weight.detach().double()
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        r = e["rank"]
        sub._c.setattr("weight", ((u[:, :r] * s[:r]) @ vh[:r]).reshape(w.shape).float())
small = torch.jit.load(result)
p_orig, p_small, p_ref = probabilities(torch.jit.load(original)), probabilities(small), probabilities(reference)
print(json.dumps({"params": [sum(p.numel() for p in torch.jit.load(original).parameters()),
                             sum(p.numel() for p in small.parameters())],
                  "vs_reference": float((p_small - p_ref).abs().max()),
                  "vs_original_mean": float((p_small - p_orig).abs().mean()),
                  "vs_original_max": float((p_small - p_orig).abs().max()),
                  "clean": not _BLOCKED}))
"""


@pytest.fixture(scope="session")
def silero() -> Path:
    return fetch_wheel_folder(SILERO, "silero_vad/data/", "silero-vad") / "silero_vad.jit"


@pytest.mark.slow
def test_silero_vad_streaming(cli, silero, tmp_path):
    result = tmp_path / "silero_small.jit"
    r = cli("apply", silero, result, "--factorize-convs", "--min-channels", "64", "--latent-channels", "0.5", "-q",
            "--json")
    assert r.code == 0, r.stderr
    done = [e for e in r.json["layers"] if e["action"] == "factorize"]
    assert len(done) == 8 and {e["kind"] for e in done} == {"conv1d"}
    run = run_isolated(SILERO_RUNNER, silero, result, tmp_path / "silero_small.factorize.json")
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    print(f"\nsilero-vad: {figures}")
    assert figures["clean"]
    # the README's figures: 462,594 -> 374,050 parameters; the rank-r model to 2e-7 (float32 rounding,
    # hence the margin); plain SVD moves the speech probabilities by 0.50 on average
    assert figures["params"] == [462_594, 374_050]
    assert figures["vs_reference"] < 1e-6  # the rewrite computes exactly the rank-r model
    assert figures["vs_original_mean"] == pytest.approx(0.50, abs=0.02)


def test_verify_runs_both_models_in_a_fresh_process(cli, tmp_path):
    torch.manual_seed(3)
    model = MLP().eval()
    from tests.conftest import decaying_matrix
    with torch.no_grad():  # trained-like weights: fast decaying spectra
        model.fc1.weight.copy_(decaying_matrix(64, 48, alpha=2.0, seed=1))
        model.fc2.weight.copy_(decaying_matrix(40, 64, alpha=2.0, seed=2))
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    common = ["--min-features", "32", "--latent-features", "0.3", "--verify", "randn:7,48", "-q"]
    r = cli("apply", tmp_path / "m.pt", tmp_path / "ok.pt", *common, "--json")
    assert r.code == 0, r.stderr
    v = r.json["verify"]
    assert v["inputs"] == ["randn:7,48:float32"] and v["loaded_without_factorize"] and v["passed"]
    assert 0 < v["max_rel_diff"] <= 0.1 and v["max_abs_diff"] > 0
    r = cli("apply", tmp_path / "m.pt", tmp_path / "strict.pt", *common, "--verify-tol", "1e-9")
    assert r.code == 1 and "--verify: max relative output difference" in r.stderr
    assert not (tmp_path / "strict.pt").exists()
    assert json.loads((tmp_path / "strict.factorize.json").read_text())["verify"]["passed"] is False


@pytest.mark.parametrize("args,message", [(["--verify", "gauss:1,2"], "expected KIND"),
                                          (["--verify", "randn:1,2:int8"], "expected KIND")])
def test_verify_usage_errors(cli, tmp_path, args, message):
    torch.jit.save(torch.jit.script(MLP()), str(tmp_path / "m.pt"))
    r = cli("apply", tmp_path / "m.pt", tmp_path / "o.pt", *args)
    assert r.code == 2 and message in r.stderr


def test_verify_needs_a_graph_input(cli, toy_safetensors, tmp_path):
    r = cli("apply", toy_safetensors, tmp_path / "o.safetensors", "--verify", "randn:1,4")
    assert r.code == 2 and "needs a TorchScript" in r.stderr


class Twice(nn.Module):
    """One module registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = self.a
        self.c = nn.Linear(32, 16)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_module_registered_twice(cli, tmp_path):
    torch.manual_seed(4)
    model = Twice().eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "t.pt"))
    r = cli("apply", tmp_path / "t.pt", tmp_path / "s.pt", "--min-features", "8", "-q", "--json")
    assert r.code == 0, r.stderr
    ranks = {e["name"]: e["rank"] for e in r.json["layers"] if e["action"] == "factorize"}
    reference = copy.deepcopy(model)  # a and b stay one module here, as in the original
    with torch.no_grad():
        for name in {"a", "c"} & set(ranks):
            layer = reference.get_submodule(name)
            layer.weight.copy_(truncated(layer.weight, ranks[name]))
    x = torch.randn(6, 32)
    got = run_fresh(tmp_path, tmp_path / "t.pt", tmp_path / "s.pt", (x,))
    assert float((got["y"] - reference(x)).norm() / reference(x).norm()) < 1e-5


class TiedLM(nn.Module):
    """A small language model whose output head shares the embedding's weight (``head.weight = embed.weight``)."""

    def __init__(self, vocab: int = 96, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.fc1 = nn.Linear(width, 64)
        self.fc2 = nn.Linear(64, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def unique_parameter_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages behind a state dict (a tied tensor counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values() if t.numel()}
    return sum(storages.values())


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_head_tied_to_the_embedding_is_left_alone(cli, tmp_path, mode):
    torch.manual_seed(5)
    model = TiedLM().eval()
    ids = torch.randint(0, 96, (3, 7))
    torch.jit.save(torch.jit.script(model) if mode == "script" else torch.jit.trace(model, (ids,)),
                   str(tmp_path / "lm.jit"))
    before = torch.jit.load(str(tmp_path / "lm.jit")).state_dict()
    assert before["head.weight"].untyped_storage().data_ptr() == before["embed.weight"].untyped_storage().data_ptr()
    r = cli("apply", tmp_path / "lm.jit", tmp_path / "out.jit", "--min-features", "1", "-q", "--json")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    assert layers["head"]["action"] == "skip" and layers["head"]["reason"] == "tied-weight"
    assert "embed.weight" in layers["head"]["detail"]
    ranks = {n: e["rank"] for n, e in layers.items() if e["action"] == "factorize"}
    assert set(ranks) == {"fc1", "fc2"}
    result = torch.jit.load(str(tmp_path / "out.jit"))
    after = result.state_dict()
    saved = sum(4 * (w.numel() - ranks[n] * sum(w.shape)) for n, w in ((n, before[f"{n}.weight"]) for n in ranks))
    assert unique_parameter_bytes(after) == unique_parameter_bytes(before) - saved  # no hidden full copy
    assert after["head.weight"].untyped_storage().data_ptr() == after["embed.weight"].untyped_storage().data_ptr()
    with torch.no_grad():
        expected = reference_model(model, ranks)(ids)
        got = result(ids)
    assert float((got - expected).norm() / expected.norm()) < 1e-5
