"""Orientation from what the checkpoint says about itself: transformers Conv1D (GPT-2) stored in x out,
nn.MultiheadAttention's out_proj, transposed convs.

The GPT-2 is built by transformers from a small config (random weights) and saved with save_pretrained;
the factorized checkpoint must load into the transformers model with strict=True and compute the rank-r
model: each Conv1D weight replaced by its float64 truncated SVD in its true (out x in) orientation.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from factorize_cli.report import load_schema
from tests.conftest import optimum_error

transformers = pytest.importorskip("transformers")

SMALL = ["--min-features", "1", "--latent-features", "0.25"]
CONV1D = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
SQUARE = [n for n in CONV1D if n.endswith("attn.c_proj")]


def gpt2_config():
    return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A GPT-2 (eval mode) and the folder save_pretrained wrote it to (model.safetensors + config.json)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    return model, folder


@pytest.fixture
def bare(gpt2, tmp_path) -> Path:
    """The same weights without config.json: a bare state dict."""
    path = tmp_path / "model.safetensors"
    shutil.copy(gpt2[1] / "model.safetensors", path)
    return path


def rank_r_reference(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Each layer's weight replaced by the float64 rank-r truncation of its out x in matrix
    (a Conv1D's stored weight is its transpose)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, rank in ranks.items():
            layer = ref.get_submodule(name)
            transposed = type(layer).__name__ == "Conv1D"
            w = layer.weight.to(torch.float64)
            m = w.T if transposed else w
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            m_r = (u[:, :rank] * s[:rank]) @ vh[:rank]
            layer.weight.copy_(m_r.T if transposed else m_r)
    return ref


def load_factorized(out: Path) -> nn.Module:
    """The transformers model rebuilt from the factorized file with the Python API, strict=True.
    save_pretrained leaves out the tied lm_head.weight; as transformers does, it is the embedding's."""
    from factorize_cli import modules

    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    modules.convert_to_factorized(model, modules.read_rank_map(out))
    state = load_file(str(out))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model


def max_rel_logit_diff(model: nn.Module, reference: nn.Module) -> float:
    tokens = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(tokens).logits, reference(tokens).logits
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())


def report_of(out: Path) -> dict:
    report = json.loads(out.with_name(out.stem + ".factorize.json").read_text())
    jsonschema.validate(report, load_schema())
    return report


def check_factorized(model: nn.Module, out: Path, names: list[str], rank: int) -> float:
    """Factor shapes in nn.Linear orientation, the bias moved, achieved errors optimal, and the rebuilt
    model's logits those of the rank-r reference; returns the max relative logit difference."""
    report = report_of(out)
    layers = {e["name"]: e for e in report["layers"]}
    state = load_file(str(out))
    for name in names:
        conv = model.get_submodule(name)
        nx, nf = conv.weight.shape
        e = layers[name]
        assert (e["action"], e["orientation"], e["rank"], e["shape"]) == ("factorize", "in-out", rank, [nx, nf])
        assert e["bias_key"] == f"{name}.bias"
        assert state[f"{name}.module0.weight"].shape == (rank, nx)
        assert state[f"{name}.module1.weight"].shape == (nf, rank)
        assert torch.equal(state[f"{name}.module1.bias"], conv.bias.detach())
        assert f"{name}.weight" not in state and f"{name}.bias" not in state
        product = state[f"{name}.module1.weight"].double() @ state[f"{name}.module0.weight"].double()
        truth = conv.weight.detach().double().T  # the out x in matrix the layer computes with
        assert e["achieved_error"] == pytest.approx(optimum_error(truth, rank), abs=1e-6)
        assert float((product - truth).norm() / truth.norm()) == pytest.approx(e["achieved_error"], abs=1e-6)
    rebuilt = load_factorized(out)
    ranks = {n: rank for n in names}
    diff = max_rel_logit_diff(rebuilt, rank_r_reference(model, ranks))
    assert diff < 1e-4
    assert max_rel_logit_diff(rebuilt, model) > 100 * diff  # the comparison can tell rank r from the original
    return diff


def test_gpt2_with_config_json(cli, gpt2, tmp_path):
    model, folder = gpt2
    plan = cli("plan", folder / "model.safetensors", *SMALL, "--json", "-q")
    assert plan.code == 0, plan.stderr
    jsonschema.validate(plan.json, load_schema())
    layers = {e["name"]: e for e in plan.json["layers"]}
    assert sorted(n for n, e in layers.items() if e["action"] == "factorize") == sorted(CONV1D)
    for name in ("transformer.wte", "transformer.wpe"):
        assert layers[name]["reason"] == "module-type"
        assert "Embedding module in config.json's GPT2LMHeadModel" in layers[name]["detail"]
    assert any("module types from config.json's GPT2LMHeadModel" in n for n in plan.json["notes"])

    out = tmp_path / "small.safetensors"
    r = cli("apply", folder / "model.safetensors", out, *SMALL, "-q")
    assert r.code == 0, r.stderr
    diff = check_factorized(model, out, CONV1D, 16)
    print(f"\nGPT-2 (config.json): {len(CONV1D)} Conv1D layers at rank 16, max relative logit diff {diff:.2e}")


def test_gpt2_bare_state_dict_proves_orientation_by_bias(cli, gpt2, bare, tmp_path):
    model, _ = gpt2
    plan = cli("plan", bare, *SMALL, "--json", "-q")
    assert plan.code == 0, plan.stderr
    layers = {e["name"]: e for e in plan.json["layers"]}
    proven = [n for n in CONV1D if n not in SQUARE]
    assert sorted(n for n, e in layers.items() if e["action"] == "factorize") == sorted(proven)
    assert all(layers[n]["orientation"] == "in-out" for n in proven)
    for name in SQUARE:
        e = layers[name]
        assert e["reason"] == "orientation-unknown"
        assert "64x64, square, with a bias" in e["detail"] and "--transposed GLOB" in e["detail"]
        assert "--not-transposed GLOB" in e["detail"]
    assert layers["transformer.wte"]["reason"] == "embedding-like"

    out = tmp_path / "bare-small.safetensors"
    r = cli("apply", bare, out, *SMALL, "--transposed", "*.c_proj", "-q")
    assert r.code == 0, r.stderr
    check_factorized(model, out, CONV1D, 16)
    assert report_of(out)["settings"]["selection"]["transposed"] == ["*.c_proj"]


def test_overrides_that_contradict_the_checkpoint_are_refused(cli, bare, tmp_path):
    # mlp.c_proj's bias proves it is stored in x out
    r = cli("plan", bare, *SMALL, "--not-transposed", "*.c_proj")
    assert r.code == 2
    assert "transformer.h.0.mlp.c_proj: --not-transposed '*.c_proj' contradicts the checkpoint" in r.stderr
    r = cli("plan", bare, *SMALL, "--transposed", "*.attn.*", "--not-transposed", "*.c_attn")
    assert r.code == 2 and "matches both --transposed '*.attn.*' and --not-transposed '*.c_attn'" in r.stderr
    r = cli("plan", bare, *SMALL, "--transposed", "x", "--not-transposed", "x")
    assert r.code == 2 and "'x' is given to both --transposed and --not-transposed" in r.stderr
    r = cli("plan", bare, *SMALL, "--transposed", "nothing.*", "--json", "-q")
    assert r.code == 0 and "--transposed 'nothing.*' matched no 2-D weight" in r.json["notes"]


def test_not_transposed_includes_a_square_layer_as_a_linear(cli, bare):
    r = cli("plan", bare, *SMALL, "--not-transposed", "*.attn.c_proj", "--json", "-q")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    assert all(layers[n]["action"] == "factorize" and layers[n]["orientation"] == "out-in" for n in SQUARE)


def test_without_transformers_the_config_falls_back_to_biases(cli, gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    r = cli("plan", gpt2[1] / "model.safetensors", *SMALL, "--json", "-q")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    assert all(layers[n]["reason"] == "orientation-unknown" for n in SQUARE)
    assert all(layers[n]["action"] == "factorize" and layers[n]["orientation"] == "in-out"
               for n in CONV1D if n not in SQUARE)
    assert any("transformers is not installed" in n for n in r.json["notes"])


def test_unknown_model_type_falls_back_to_biases(cli, bare):
    (bare.parent / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    r = cli("plan", bare, *SMALL, "--json", "-q")
    assert r.code == 0, r.stderr
    assert {e["reason"] for e in r.json["layers"] if e["name"] in SQUARE} == {"orientation-unknown"}
    assert any("config.json not used" in n for n in r.json["notes"])


def test_base_model_keys_under_a_head_model_config(cli, gpt2, tmp_path):
    """A GPT2Model checkpoint (keys h.0...) whose config names GPT2LMHeadModel: the prefix is mapped."""
    from safetensors.torch import save_file

    model, folder = gpt2
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k.startswith("transformer.")}
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    r = cli("plan", tmp_path / "model.safetensors", *SMALL, "--json", "-q")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    done = sorted(n for n, e in layers.items() if e["action"] == "factorize")
    assert done == sorted(n.removeprefix("transformer.") for n in CONV1D)
    assert layers["wte"]["reason"] == "module-type"


def test_converter_and_calibration_take_conv1d(gpt2, tmp_path):
    from factorize_cli.calibration import collect_activation_stats
    from factorize_cli.modules import FactorizedLinear, convert_to_factorized

    model, _ = gpt2
    ranks = {n: 16 for n in CONV1D}
    tokens = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(3))
    stats = collect_activation_stats(model, [tokens])
    assert set(CONV1D) <= set(stats)
    assert stats["transformer.h.0.mlp.c_proj"].xtx.shape == (256, 256)  # fan_in = nx
    assert stats["transformer.h.0.attn.c_attn"].count == 40
    x = model.transformer.h[0].ln_1(model.transformer.wte(tokens) + model.transformer.wpe(torch.arange(20)))
    assert torch.allclose(stats["transformer.h.0.attn.c_attn"].total, x.reshape(-1, 64).double().sum(0), atol=1e-4)

    converted = convert_to_factorized(copy.deepcopy(model), ranks, from_weights=True)
    assert isinstance(converted.transformer.h[1].mlp.c_fc, FactorizedLinear)
    assert converted.transformer.h[1].mlp.c_fc.module0.weight.shape == (16, 64)
    assert max_rel_logit_diff(converted, rank_r_reference(model, ranks)) < 1e-4


def test_calibrated_apply_covers_conv1d(cli, gpt2, tmp_path):
    from factorize_cli.calibration import collect_activation_stats, save_activation_stats

    model, folder = gpt2
    tokens = torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(4))
    save_activation_stats(collect_activation_stats(model, [tokens]), tmp_path / "stats.safetensors")
    out = tmp_path / "calibrated.safetensors"
    r = cli("apply", folder / "model.safetensors", out, *SMALL, "--calibration", tmp_path / "stats.safetensors", "-q")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in report_of(out)["layers"]}
    assert all(layers[n]["calibrated"] and layers[n]["achieved_output_error"] is not None for n in CONV1D)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.fc = nn.Linear(64, 48)


def test_multihead_attention_out_proj_is_skipped(cli, tmp_path):
    path = tmp_path / "mha.pt"
    torch.save(Attention().state_dict(), path)
    r = cli("plan", path, *SMALL, "--json", "-q")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    assert layers["attn.out_proj"]["reason"] == "attention-out-proj"
    assert "nn.MultiheadAttention reads out_proj.weight directly" in layers["attn.out_proj"]["detail"]
    assert layers["fc"]["action"] == "factorize" and layers["fc"]["orientation"] == "out-in"


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(16, 32, 3)  # weight 16 x 32 x 3 x 3, bias 32
        self.conv = nn.Conv2d(32, 24, 3)


def test_transposed_conv_is_skipped(cli, tmp_path):
    path = tmp_path / "decoder.pt"
    torch.save(Decoder().state_dict(), path)
    r = cli("plan", path, "--min-channels", "1", "--json", "-q")
    assert r.code == 0, r.stderr
    layers = {e["name"]: e for e in r.json["layers"]}
    assert layers["up"]["reason"] == "transposed-conv"
    assert "bias of 32 matches shape[1], not shape[0] = 16" in layers["up"]["detail"]
    assert layers["conv"]["action"] == "factorize"


def test_geometry_of_a_transposed_linear():
    from factorize_cli.factorization import as_matrix, low_rank_factors, reconstruct
    from factorize_cli.geometry import Geometry, LayerKind

    geo = Geometry.from_weight_shape(LayerKind.LINEAR, (64, 192), has_bias=True, transposed=True)
    assert (geo.out_features, geo.in_features, geo.weight_shape, geo.matrix_shape) == (192, 64, (64, 192), (192, 64))
    plain = Geometry.from_weight_shape(LayerKind.LINEAR, (192, 64), has_bias=True)
    assert (geo.params(8), geo.macs(8), geo.break_even_rank) == (plain.params(8), plain.macs(8), plain.break_even_rank)
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(5))
    assert torch.equal(as_matrix(w, geo), w.T)
    factors = low_rank_factors(w, geo, 64, engine="exact")
    assert factors.first.shape == (64, 64) and factors.second.shape == (192, 64)
    assert torch.allclose(reconstruct(factors.first, factors.second, geo), w.double(), atol=1e-5)
    with pytest.raises(ValueError, match="only a Linear"):
        Geometry.from_weight_shape(LayerKind.CONV2D, (4, 4, 3, 3), has_bias=False, transposed=True)


def test_help_lists_the_orientation_overrides(cli):
    r = cli("apply", "--help")
    assert r.code == 0 and "--transposed" in r.stdout and "--not-transposed" in r.stdout
