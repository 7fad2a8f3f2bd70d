"""Real speech without a network: espeak-ng speaks English text to a WAV file, resampled here to 16 kHz,
padded with quiet noise, and cut into the 512-sample streaming calls silero-vad takes."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import torch

RATE = 16000
CHUNK = 512  # silero-vad's call at 16 kHz: 32 ms

# calibration and evaluation use different sentences and different voices
CALIBRATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please remember to switch off the lights before you leave the office tonight.",
    "Our train was delayed by twenty minutes because of heavy snow in the mountains.",
    "She opened the window and listened to the birds singing in the garden.",
    "Numbers like seven hundred and forty two are spoken slowly and clearly.",
    "Good morning everyone, today we will talk about the history of maps.",
]
CALIBRATION_VOICES = ["en-us", "en-gb+f3", "en-us+m3"]
EVALUATION_TEXTS = [
    "A cup of hot tea on a cold afternoon is one of life's small pleasures.",
    "The museum will be closed on Monday for repairs to the roof.",
    "Could you tell me how to get to the nearest railway station, please?",
    "Thunder rolled across the valley while the children ran home from school.",
    "Engineers measured the bridge and found it had moved by three millimetres.",
]
EVALUATION_VOICES = ["en-gb-scotland+f2", "en-029+m1", "en-us-nyc+f4", "en-gb-x-rp+klatt"]


def espeak() -> str | None:
    return shutil.which("espeak-ng")


def speak(text: str, voice: str, folder: Path, *, speed: int = 160) -> torch.Tensor:
    """``text`` spoken by espeak-ng's ``voice`` at ``speed`` words per minute, as 16 kHz float samples."""
    path = folder / f"{abs(hash((text, voice, speed)))}.wav"
    subprocess.run([espeak(), "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True, timeout=60)
    with wave.open(str(path)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
    samples = torch.frombuffer(bytearray(frames), dtype=torch.int16).float() / 32768
    return resample(samples, rate, RATE)


def resample(x: torch.Tensor, rate: int, to: int) -> torch.Tensor:
    """Band-limit below the new Nyquist frequency (a Hann-windowed sinc), then interpolate linearly."""
    if to < rate:
        cutoff, taps = 0.45 * to / rate, 129  # cycles per input sample
        n = torch.arange(taps) - taps // 2
        kernel = 2 * cutoff * torch.sinc(2 * cutoff * n) * torch.hann_window(taps, periodic=False)
        x = torch.nn.functional.conv1d(x[None, None], (kernel / kernel.sum())[None, None], padding=taps // 2)[0, 0]
    length = int(len(x) * to / rate)
    return torch.nn.functional.interpolate(x[None, None], size=length, mode="linear", align_corners=True)[0, 0]


def utterance(text: str, voice: str, folder: Path, *, seed: int, speed: int = 160) -> torch.Tensor:
    """The spoken text between stretches of quiet, in light noise."""
    g = torch.Generator().manual_seed(seed)
    speech = speak(text, voice, folder, speed=speed)
    speech = speech / speech.abs().max().clamp_min(1e-6) * 0.5
    lead, tail = (int(RATE * s) for s in (0.4 + 0.4 * torch.rand(2, generator=g)).tolist())
    x = torch.cat([torch.zeros(lead), speech, torch.zeros(tail)])
    x = x + 0.002 * torch.randn(len(x), generator=g)
    return x[: len(x) // CHUNK * CHUNK]


def streaming_calls(waves: list[torch.Tensor]) -> dict:
    """The INPUTS of ``factorize calibrate`` for silero-vad: one sequence per wave, ``model(chunk, 16000)``."""
    return {"sequences": [[(w[i:i + CHUNK][None], RATE) for i in range(0, len(w), CHUNK)] for w in waves]}


def probabilities(model, w: torch.Tensor) -> torch.Tensor:
    """Speech probability of each 32 ms chunk of ``w``, streaming after a reset."""
    model.reset_states()
    with torch.no_grad():
        return torch.tensor([float(model(w[i:i + CHUNK][None], RATE)) for i in range(0, len(w), CHUNK)])


def agreement(model_a, model_b, waves: list[torch.Tensor], threshold: float = 0.5) -> dict:
    """Mean |p_a - p_b| over every frame, and the share of frames whose speech decision agrees."""
    a = torch.cat([probabilities(model_a, w) for w in waves])
    b = torch.cat([probabilities(model_b, w) for w in waves])
    return {"frames": len(a), "mean_abs_change": float((a - b).abs().mean()),
            "frames_kept": float(((a > threshold) == (b > threshold)).double().mean()),
            "speech_share": float((a > threshold).double().mean()), "seconds": len(a) * CHUNK / RATE}


def evaluation_waves(folder: Path) -> list[torch.Tensor]:
    return [utterance(t, v, folder, seed=100 + i, speed=140 + 15 * (i % 3))
            for i, (t, v) in enumerate((t, v) for v in EVALUATION_VOICES for t in EVALUATION_TEXTS)]


def calibration_waves(folder: Path) -> list[torch.Tensor]:
    return [utterance(t, v, folder, seed=i) for i, (t, v) in
            enumerate((t, v) for v in CALIBRATION_VOICES for t in CALIBRATION_TEXTS)]


