"""``factorize apply MODEL_DIR OUT --data TEXT``: a Hugging Face folder calibrated and factorized in one
command, written in its own shape, loadable with ``load_pretrained``; and the measured sensitivities
that weigh a calibrated budget."""

from __future__ import annotations

import jsonschema
import pytest
import torch
from torch import nn

from factorize_cli import FactorizeConfig, SelectionConfig, factorize_, load_pretrained
from factorize_cli.config import BudgetMetric, BudgetPolicy
from factorize_cli.report import load_schema
from factorize_cli.textdata import TextDataConfig, text_batches
from tests.test_textdata import TEXT, gpt2_folder, write_lines

transformers = pytest.importorskip("transformers")

SELECT = ["--min-features", "1", "--rank-policy", "params:0.8"]


def live_reference(folder, data, sequential: bool):
    """The same run through the Python API on the loaded model: what the written folder must hold."""
    model = load_pretrained(folder)
    batches = text_batches(folder, data, TextDataConfig(samples=512, seq_len=256, batch_size=8))
    config = FactorizeConfig(selection=SelectionConfig(min_features=1), policy=BudgetPolicy(BudgetMetric.PARAMS, 0.8))
    report = factorize_(model, config, batches, sequential=sequential)
    return model, report


@pytest.mark.parametrize("strip_prefix", [False, True])
@pytest.mark.parametrize("sequential", [True, False])
def test_apply_data_writes_the_folder_the_live_run_computed(cli, tmp_path, strip_prefix, sequential):
    folder = gpt2_folder(tmp_path / "gpt2", strip_prefix=strip_prefix)
    data = write_lines(tmp_path / "text.txt", TEXT)
    out = tmp_path / "small"
    r = cli("apply", folder, out, "--data", data, *SELECT, "--json", "-q",
            *([] if sequential else ["--no-sequential"]))
    assert r.code == 0, r.stderr
    report = r.json
    jsonschema.validate(report, load_schema())
    done = [e for e in report["layers"] if e["action"] == "factorize"]
    assert done and {e["method"] for e in done} == {"sequential" if sequential else "whitened"}
    assert all(e["name"].startswith("h." if strip_prefix else "transformer.h.") for e in done)  # the file's names
    assert all(e["sensitivity"] is not None and e["sensitivity"] > 0 for e in done)
    assert "measured effect on the model output" in " ".join(report["notes"])
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    written = load_pretrained(out)
    reference, live = live_reference(folder, data, sequential)
    assert [e["rank"] for e in done] == [e["rank"] for e in live["layers"] if e["action"] == "factorize"]
    ids = torch.tensor([[2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        got, want = written(ids).logits, reference(ids).logits
        original = load_pretrained(folder)(ids).logits
    assert torch.equal(got, want)  # the very factors of the live run, under the file's names
    assert float((got - original).norm() / original.norm()) > 1e-3  # and the model did change


def test_apply_data_needs_a_runnable_model(cli, tmp_path):
    from safetensors.torch import save_file

    save_file({"w.weight": torch.randn(8, 8)}, str(tmp_path / "m.safetensors"))
    data = write_lines(tmp_path / "text.txt", TEXT)
    r = cli("apply", tmp_path / "m.safetensors", tmp_path / "o.safetensors", "--data", data, "--min-features", "1")
    assert r.code == 2 and r.stderr.count("\n") == 1 and "--data runs the model" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


class Branches(nn.Module):
    """y = a(x) + 10 b(x): b's output error reaches y 100 times more strongly than a's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return self.a(x) + 10 * self.b(x)


def test_sensitivity_is_the_output_error_per_unit_of_layer_error():
    torch.manual_seed(0)
    model = Branches()
    with torch.no_grad():  # same weights: any difference in sensitivity comes from the model around them
        model.b.weight.copy_(model.a.weight)
    data = [torch.randn(16, 32) for _ in range(3)]  # 48 samples: the probe measures on all of them
    config = FactorizeConfig(selection=SelectionConfig(min_features=1), policy=BudgetPolicy(BudgetMetric.PARAMS, 0.6))
    report = factorize_(model, config, data, sequential=False)
    sens = {e["name"]: e["sensitivity"] for e in report["layers"]}
    assert sens["b"] / sens["a"] == pytest.approx(100, rel=1e-6)
    # and the budget gives the layer that matters more of the rank
    ranks = {e["name"]: e["rank"] if e["action"] == "factorize" else 32 for e in report["layers"]}
    assert ranks["b"] > ranks["a"]


def test_calibrate_records_sensitivities_that_apply_calibration_uses(cli, tmp_path):
    from factorize_cli.calibration import StatsFile

    folder = gpt2_folder(tmp_path / "gpt2", strip_prefix=True)
    data = write_lines(tmp_path / "text.txt", TEXT)
    r = cli("calibrate", folder, data, tmp_path / "stats.safetensors", "-q")
    assert r.code == 0, r.stderr
    stats = StatsFile(tmp_path / "stats.safetensors")
    try:
        measured = {name: stats.sensitivity(name) for name in stats.layers}
    finally:
        stats.close()
    assert measured and all(v is not None and v > 0 for v in measured.values())
    r = cli("apply", folder / "model.safetensors", tmp_path / "o.safetensors", "--calibration",
            tmp_path / "stats.safetensors", *SELECT, "--json", "-q")
    assert r.code == 0, r.stderr
    budgeted = [e for e in r.json["layers"] if e["action"] == "factorize" or e["reason"] == "kept-whole"]
    assert budgeted and all(e["sensitivity"] == pytest.approx(measured[e["name"]]) for e in budgeted)
    assert "measured effect on the model output" in " ".join(r.json["notes"])
