"""silero-vad kept working at params:0.8: calibrated on the streaming calls of synthesized speech (espeak-ng),
compared with the original on other sentences spoken by other voices, frame by frame (32 ms)."""

from __future__ import annotations

import json

import pytest
import torch

from tests import speech
from tests.conftest import fetch_wheel_folder

SILERO = "silero-vad==6.2.3"
CONVS = ["--factorize-convs", "--min-channels", "64", "--rank-policy", "params:0.8", "-q", "--json"]


@pytest.mark.slow
def test_silero_vad_calibrated_on_speech_keeps_its_decisions(cli, tmp_path):
    if speech.espeak() is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no speech to run silero-vad on")
    silero = fetch_wheel_folder(SILERO, "silero_vad/data/", "silero-vad") / "silero_vad.jit"
    (tmp_path / "wav").mkdir()
    torch.save(speech.streaming_calls(speech.calibration_waves(tmp_path / "wav")), tmp_path / "calibration.pt")
    heard = speech.evaluation_waves(tmp_path / "wav")
    torch.save(speech.streaming_calls(heard[:4]), tmp_path / "heard.pt")

    r = cli("calibrate", silero, tmp_path / "calibration.pt", tmp_path / "stats.safetensors", "--reset",
            "reset_states", "-q")
    assert r.code == 0, r.stderr
    assert r.json["sequences"] == len(speech.CALIBRATION_TEXTS) * len(speech.CALIBRATION_VOICES)
    r = cli("apply", silero, tmp_path / "plain.jit", *CONVS)
    assert r.code == 0, r.stderr
    r = cli("apply", silero, tmp_path / "calibrated.jit", *CONVS, "--calibration", tmp_path / "stats.safetensors",
            "--verify", tmp_path / "heard.pt", "--reset", "reset_states", "--verify-tol", "0.5")
    assert r.code == 0, r.stderr
    done = [e for e in r.json["layers"] if e["action"] == "factorize"]
    totals = r.json["totals"]
    assert totals["candidate_params_after"] <= 0.8 * totals["candidate_params_before"]
    assert {e["name"] for e in done} == {"_model.encoder.0.reparam_conv", "_model.encoder.1.reparam_conv",
                                         "_model.encoder.3.reparam_conv"}  # the 8 kHz branch has no rows
    verify = r.json["verify"]

    original = torch.jit.load(str(silero))
    plain, calibrated = (speech.agreement(original, torch.jit.load(str(tmp_path / f"{n}.jit")), heard)
                         for n in ("plain", "calibrated"))
    print(f"\nsilero-vad params:0.8 on {plain['seconds']:.0f} s of other speech: plain {json.dumps(plain)}; "
          f"calibrated {json.dumps(calibrated)}; --verify {json.dumps(verify)}")
    # the README's figures: plain SVD 0.041 and 97.2%; calibrated 0.0037 and 99.7%
    assert calibrated["mean_abs_change"] == pytest.approx(0.0037, abs=0.004) and calibrated["frames_kept"] >= 0.993
    assert plain["mean_abs_change"] == pytest.approx(0.041, abs=0.012)
    assert plain["frames_kept"] == pytest.approx(0.9716, abs=0.01)  # the calibration is what helps
    assert calibrated["mean_abs_change"] <= 0.02 and calibrated["frames_kept"] >= 0.99  # the marks
    assert 0.2 < plain["speech_share"] < 0.9  # both speech and quiet frames are judged
    # --verify ran the streaming calls of the first four evaluation utterances, reset before each
    assert verify["calls"].startswith("4 sequence(s)") and verify["calls"].endswith("reset_states() before each "
                                                                                     "sequence")
    assert 0 < verify["max_abs_diff"] < 0.5 and verify["loaded_without_factorize"]
