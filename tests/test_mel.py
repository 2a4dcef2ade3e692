import librosa
import numpy as np
import pytest
import torch

from models.mel import DISCOGS_MEAN, DISCOGS_STD, MelSpectrogram, n_frames_for, normalize


def librosa_logmel(y):
    mel = librosa.feature.melspectrogram(
        y=y, sr=16000, n_fft=512, hop_length=256, win_length=512, window="hann", center=True,
        pad_mode="constant", power=2.0, n_mels=96, fmin=0, fmax=8000, htk=False, norm="slaney",
    )
    return np.log10(1 + 10000 * mel)


def test_matches_librosa_within_1e_3():
    rng = np.random.default_rng(0)
    t = np.arange(3 * 16000) / 16000
    y = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    ours = MelSpectrogram()(torch.from_numpy(y)).numpy()
    ref = librosa_logmel(y)
    assert ours.shape == ref.shape == (96, 1 + y.size // 256)
    assert np.abs(ours - ref).max() < 1e-3


def test_thirty_seconds_give_1876_frames_and_clip_lengths():
    mel = MelSpectrogram()(torch.zeros(2, 30 * 16000))
    assert mel.shape == (2, 96, 1876)
    assert [n_frames_for(s) for s in (5, 10, 20, 30)] == [312, 625, 1250, 1875]


def test_batch_equals_single_and_a_tone_lands_in_its_band():
    t = torch.arange(16000) / 16000
    a, b = torch.sin(2 * torch.pi * 1000 * t), torch.sin(2 * torch.pi * 4000 * t)
    mel = MelSpectrogram()
    batch = mel(torch.stack([a, b]))
    assert torch.allclose(batch[0], mel(a), atol=1e-5)
    freqs = librosa.mel_frequencies(n_mels=96, fmin=0, fmax=8000, htk=False)
    assert abs(freqs[batch[0].mean(-1).argmax()] - 1000) < 100
    assert abs(freqs[batch[1].mean(-1).argmax()] - 4000) < 250


def test_normalized_output():
    x = torch.randn(16000) * 0.1
    raw, norm = MelSpectrogram()(x), MelSpectrogram(normalized=True)(x)
    assert torch.allclose(norm, (raw - DISCOGS_MEAN) / (2 * DISCOGS_STD))
    assert np.allclose(normalize(np.array([DISCOGS_MEAN])), 0)


def test_bad_audio_errors():
    mel = MelSpectrogram()
    with pytest.raises(TypeError, match="torch.Tensor"):
        mel(np.zeros(100))
    with pytest.raises(ValueError, match="mix multi-channel audio down to mono"):
        mel(torch.zeros(2, 2, 100))
    with pytest.raises(ValueError, match="empty audio"):
        mel(torch.zeros(1, 0))


def test_stft_stays_fp32_under_bf16_autocast():
    x = torch.randn(16000) * 0.1
    mel = MelSpectrogram()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = mel(x)
    assert low.dtype == torch.float32
    assert torch.allclose(low, mel(x))
