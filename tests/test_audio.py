"""helpers/audio.py: reading any audio file as 16 kHz mono, stored-file mels, listing audio files."""

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from helpers.audio import AudioLoadError, audio_to_mel, list_audio_files, load_audio
from models.mel import MelSpectrogram

SECONDS = 1.5


def mel_band_of(freq_hz: float) -> int:
    """Index of the mel band whose centre is closest to ``freq_hz`` (96 Slaney bands, 0-8 kHz)."""
    centres = librosa.mel_frequencies(n_mels=96 + 2, fmin=0.0, fmax=8000.0, htk=False)[1:-1]
    return int(np.argmin(np.abs(centres - freq_hz)))


def stereo_sine(sample_rate: int, freq_hz: float = 1000.0, amplitudes=(0.5, 0.3)) -> np.ndarray:
    t = np.arange(int(SECONDS * sample_rate)) / sample_rate
    return np.stack([a * np.sin(2 * np.pi * freq_hz * t) for a in amplitudes], axis=1).astype(np.float32)


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_44k_stereo_becomes_16k_mono_with_its_content(tmp_path, fmt):
    path = tmp_path / f"sine.{fmt}"
    sf.write(path, stereo_sine(44100), 44100)

    audio = load_audio(path)

    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - SECONDS * 16000) <= 1
    # mono = mean of the channels: a 0.4-amplitude sine, RMS 0.4 / sqrt(2) away from the edges
    middle = audio[1000:-1000]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.01)
    mel = audio_to_mel(audio)
    assert int(np.argmax(mel.mean(axis=0))) == mel_band_of(1000.0)


@pytest.mark.parametrize("fmt", ["ogg", "mp3"])
def test_lossy_formats_are_read(tmp_path, fmt):
    path = tmp_path / f"sine.{fmt}"
    sf.write(path, stereo_sine(44100, freq_hz=3000.0), 44100)

    audio = load_audio(path)

    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - SECONDS * 16000) < 0.05 * SECONDS * 16000  # codec padding
    assert int(np.argmax(audio_to_mel(audio).mean(axis=0))) == mel_band_of(3000.0)


def test_16k_mono_float_wav_is_returned_unchanged(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 4000).astype(np.float32)
    sf.write(tmp_path / "x.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "x.wav"), x)


def test_other_target_rate(tmp_path):
    sf.write(tmp_path / "x.flac", stereo_sine(22050), 22050)
    assert abs(load_audio(tmp_path / "x.flac", sample_rate=8000).size - SECONDS * 8000) <= 1


def test_missing_file(tmp_path):
    with pytest.raises(AudioLoadError, match=r"nope\.wav does not exist"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_file_names_the_file_and_the_cause(tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF" + bytes(range(200)))
    with pytest.raises(AudioLoadError, match=r"cannot decode audio file .*broken\.wav.*corrupt or not audio"):
        load_audio(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0, 2), dtype=np.float32), 44100)
    with pytest.raises(AudioLoadError, match=r"empty\.wav is empty \(0 samples\)"):
        load_audio(path)


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(path, np.array([0.0, np.nan, 0.1], dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioLoadError, match=r"nan\.wav contains NaN"):
        load_audio(path)


def test_audio_load_error_is_a_value_error():
    assert issubclass(AudioLoadError, ValueError)


def test_audio_to_mel_is_the_compressed_unnormalised_front_end():
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 16000).astype(np.float32)

    mel = audio_to_mel(x)

    assert mel.shape == (1 + 16000 // 256, 96) and mel.dtype == np.float32
    expected = MelSpectrogram()(torch.from_numpy(x)).T.numpy()
    np.testing.assert_allclose(mel, expected, rtol=1e-6, atol=1e-6)
    assert mel.min() >= 0  # log10(1 + 10000 mel) >= 0: compressed, not normalised


def test_audio_to_mel_rejects_normalised_module_and_multichannel():
    with pytest.raises(ValueError, match="not normalised"):
        audio_to_mel(np.zeros(1000, dtype=np.float32), mel=MelSpectrogram(normalized=True))
    with pytest.raises(ValueError, match=r"mono audio of shape \(samples,\)"):
        audio_to_mel(np.zeros((2, 1000), dtype=np.float32))


def test_list_audio_files_expands_folders_recursively(tmp_path):
    for name in ["b.wav", "sub/a.FLAC", "sub/deeper/c.mp3", "d.ogg", "notes.txt", ".hidden.wav", "sub/._e.mp3", ".git/f.wav"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    extra = tmp_path / "notes.txt"

    found = list_audio_files([tmp_path, extra])

    assert found == sorted(
        [tmp_path / "b.wav", tmp_path / "d.ogg", tmp_path / "sub/a.FLAC", tmp_path / "sub/deeper/c.mp3", extra],
        key=str,
    )
    assert list_audio_files([tmp_path], extensions=("mp3",)) == [tmp_path / "sub/deeper/c.mp3"]
    with pytest.raises(FileNotFoundError, match="neither an audio file nor a folder"):
        list_audio_files([tmp_path / "missing"])
