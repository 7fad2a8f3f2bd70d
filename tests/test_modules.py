"""Rebuilt models: the factorized checkpoint loads with strict=True and computes the rank-r model."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from factorize_cli.config import FactorizeConfig, SelectionConfig
from factorize_cli.modules import FactorizedConv2d, FactorizedLinear, convert_to_factorized, read_rank_map
from factorize_cli.pipeline import apply_checkpoint, factorize_state_dict


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 64, bias=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(32, 48, 3, dilation=2, padding=2, padding_mode="reflect", bias=False)
        self.c3 = nn.Conv2d(48, 40, (3, 1), stride=(1, 2), padding=(1, 0), padding_mode="circular")
        self.c4 = nn.Conv2d(40, 40, 3, padding="same", padding_mode="replicate")
        self.grouped = nn.Conv2d(40, 40, 1, groups=2)
        self.fc = nn.Linear(40, 12)

    def forward(self, x):
        for conv in (self.c1, self.c2, self.c3, self.c4, self.grouped):
            x = torch.tanh(conv(x))
        return self.fc(x.mean(dim=(2, 3)))


class Block(nn.Module):
    """A pre-norm transformer block with separate q/k/v/o projections."""

    def __init__(self, d: int = 64, heads: int = 4, mlp: int = 256) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


def truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Independent float64 reference: U_r S_r V_r^T of the flattened weight."""
    m = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(weight.shape).to(weight.dtype)


def reference_model(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, rank in ranks.items():
            layer = ref.get_submodule(name)
            layer.weight.copy_(truncated(layer.weight, rank))
    return ref


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Audio(nn.Module):
    """Conv1d stacks as in speech models."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(16, 48, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(48, 40, 3, dilation=2, padding=2, padding_mode="reflect", bias=False)
        self.c3 = nn.Conv1d(40, 32, 3, padding="same", padding_mode="circular")
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        for conv in (self.c1, self.c2, self.c3):
            x = torch.relu(conv(x))
        return self.fc(x.mean(dim=2))


CASES = [
    (MLP, (5, 64), []),
    (CNN, (2, 16, 17, 19), ["--exclude", "grouped"]),
    (Block, (2, 7, 64), []),
    (Audio, (3, 16, 50), []),
]


@pytest.mark.parametrize("factory,shape,extra", CASES, ids=["mlp", "cnn", "transformer-block", "conv1d"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_rebuilt_model_matches_rank_r_reference(cli, tmp_path, factory, shape, extra, suffix):
    torch.manual_seed(0)
    model = factory().eval()
    src = tmp_path / f"in{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), src)
    else:
        save_file(model.state_dict(), str(src))
    out = tmp_path / f"out{suffix}"
    r = cli("apply", src, out, "--min-features", "8", "--min-channels", "8", "--latent-features", "0.3",
            "--latent-channels", "0.4", *extra, "-q")
    assert r.code == 0, r.stderr
    ranks = read_rank_map(tmp_path / "out.factorize.json")
    assert ranks, "nothing was factorized"
    rebuilt = convert_to_factorized(factory(), ranks).eval()
    state = load_file(str(out)) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    rebuilt.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(*shape)
    with torch.no_grad():
        assert rel_diff(rebuilt(x), reference_model(model, ranks)(x)) < 1e-5


def test_cnn_keeps_conv_settings():
    conv = nn.Conv2d(32, 48, 3, stride=2, dilation=2, padding=2, padding_mode="reflect", bias=False).double()
    pair = FactorizedConv2d.from_conv(conv, 10)
    m0, m1 = pair.module0, pair.module1
    assert (m0.stride, m0.dilation, m0.padding, m0.padding_mode) == ((2, 2), (2, 2), (2, 2), "reflect")
    assert m0.bias is None and m1.kernel_size == (1, 1) and m1.bias is not None and not m1.bias.any()
    assert m0.weight.dtype == torch.float64
    x = torch.randn(1, 32, 15, 15, dtype=torch.float64)
    ref = nn.functional.conv2d(nn.functional.pad(x, (2, 2, 2, 2), mode="reflect"), truncated(conv.weight, 10),
                               stride=2, dilation=2)
    assert torch.allclose(pair(x), ref, atol=1e-10)


def test_from_linear_keeps_bias_and_is_optimal():
    lin = nn.Linear(40, 30).double()
    pair = FactorizedLinear.from_linear(lin, 7)
    assert torch.equal(pair.module1.bias, lin.bias) and pair.module0.bias is None
    x = torch.randn(3, 40, dtype=torch.float64)
    assert torch.allclose(pair(x), nn.functional.linear(x, truncated(lin.weight, 7), lin.bias), atol=1e-10)


def test_convert_refuses_what_it_cannot_do():
    model = CNN()
    with pytest.raises(ValueError, match="grouped"):
        convert_to_factorized(model, {"grouped": 4})
    with pytest.raises(TypeError, match="not an nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D"):
        convert_to_factorized(nn.Sequential(nn.LayerNorm(4)), {"0": 2})
    with pytest.raises(KeyError):
        convert_to_factorized(MLP(), {"nope": 2})


def test_in_memory_api_matches_module_conversion():
    torch.manual_seed(1)
    model = MLP().eval()
    config = FactorizeConfig(selection=SelectionConfig(min_features=8))
    state, report = factorize_state_dict(model.state_dict(), config)
    ranks = {e["name"]: e["rank"] for e in report["layers"] if e["action"] == "factorize"}
    rebuilt = convert_to_factorized(MLP(), ranks)
    rebuilt.load_state_dict(state, strict=True)
    live = convert_to_factorized(copy.deepcopy(model), ranks, from_weights=True)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert rel_diff(rebuilt(x), live(x)) < 1e-6


def test_api_keeps_dtype():
    model = MLP().to(torch.bfloat16)
    convert_to_factorized(model, {"fc1": 4})
    assert model.fc1.module0.weight.dtype == torch.bfloat16
    assert isinstance(model.fc1, FactorizedLinear)


def test_apply_api_checks_sizes(tmp_path):
    torch.manual_seed(2)
    save_file(MLP().state_dict(), str(tmp_path / "m.safetensors"))
    report = apply_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors",
                              FactorizeConfig(selection=SelectionConfig(min_features=8)))
    t = report["totals"]
    assert t["checkpoint_params_after"] == sum(v.numel() for v in load_file(str(tmp_path / "o.safetensors")).values())
