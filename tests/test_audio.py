"""helpers/audio.py: reading any audio file as 16 kHz mono, stored-file mels, listing audio files."""

import os

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from helpers.audio import AudioLoadError, audio_to_mel, find_audio_files, list_audio_files, load_audio
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
    with pytest.raises(TypeError, match=r"load_audio reads an audio file: give its path, not a ndarray \(audio already in memory"):
        load_audio(np.zeros(16000, dtype=np.float32))


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


@pytest.mark.parametrize("name", ["empty.mp3", "empty.wav", "empty.flac"])
def test_a_zero_byte_file_is_empty_not_missing(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(AudioLoadError) as error:
        load_audio(tmp_path / name)
    assert str(error.value).startswith(f"audio file {tmp_path / name} is empty (0 bytes): ")
    assert "regular file" not in str(error.value) and "does not exist" not in str(error.value)


@pytest.mark.parametrize("name", ["garbage.flac", "garbage.mp3", "garbage.wav", "garbage.ogg"])
def test_random_bytes_are_corrupt_or_not_audio_not_empty(tmp_path, name):
    # FFmpeg opens random bytes named .flac as a FLAC container with no packets: not an empty recording.
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(AudioLoadError) as error:
        load_audio(path)
    message = str(error.value)
    assert message.startswith(f"cannot decode audio file {path}: ") and "corrupt or not audio" in message
    assert "remove it" in message  # the fix
    assert "empty" not in message and "regular file" not in message and "Error opening" not in message


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
    # A path that does not exist: list_audio_files refuses it, find_audio_files returns it with its reason.
    with pytest.raises(FileNotFoundError, match=r"missing does not exist: check the path"):
        list_audio_files([tmp_path / "missing"])
    assert find_audio_files([tmp_path / "sub", tmp_path / "missing", tmp_path / "gone.wav"]) == (
        [tmp_path / "sub/a.FLAC", tmp_path / "sub/deeper/c.mp3"],
        {str(tmp_path / "missing"): f"{tmp_path / 'missing'} does not exist: check the path",
         str(tmp_path / "gone.wav"): f"{tmp_path / 'gone.wav'} does not exist: check the path"},
    )


def test_a_path_typed_in_another_unicode_form_than_on_disk_is_found(tmp_path):
    import unicodedata

    on_disk = tmp_path / unicodedata.normalize("NFD", "café.wav")  # as copied from macOS: e + combining accent
    on_disk.write_bytes(b"")
    typed = tmp_path / unicodedata.normalize("NFC", "café.wav")
    assert str(typed) != str(on_disk) and not typed.exists()
    assert find_audio_files([typed]) == ([on_disk], {})
    assert find_audio_files([tmp_path / "cafe.wav"])[1]  # another name is still missing


def test_symlinked_folders_are_followed_and_cycles_skipped(tmp_path, caplog):
    # prepare_folder's case: AUDIO_DIR/rock is a link to a folder elsewhere.
    (tmp_path / "my_audio/rock/live").mkdir(parents=True)
    for name in ["my_audio/rock/a.wav", "my_audio/rock/live/b.mp3", "labelled/jazz/c.flac"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    labelled = tmp_path / "labelled"
    (labelled / "rock").symlink_to(tmp_path / "my_audio/rock", target_is_directory=True)
    (labelled / "jazz/again").symlink_to(labelled, target_is_directory=True)  # a cycle: a link to an ancestor
    (tmp_path / "my_audio/rock/live/up").symlink_to("..", target_is_directory=True)  # a cycle through the first link
    (labelled / "jazz/gone.wav").symlink_to(tmp_path / "nowhere.wav")  # a link to nothing is listed (reading reports it)
    (labelled / "jazz/above").symlink_to("../..", target_is_directory=True)  # a cycle: a link to a folder above the one given

    with caplog.at_level("WARNING", logger="helpers.audio"):
        found = list_audio_files([labelled])

    assert found == [labelled / "jazz/c.flac", labelled / "jazz/gone.wav", labelled / "rock/a.wav", labelled / "rock/live/b.mp3"]
    skipped = sorted(r.getMessage() for r in caplog.records if "a cycle" in r.getMessage())
    assert skipped == [
        f"not following {labelled / 'jazz/above'}: it links to {os.path.realpath(tmp_path)}, a folder it lies in (a cycle)",
        f"not following {labelled / 'jazz/again'}: it links to {os.path.realpath(labelled)}, a folder it lies in (a cycle)",
        f"not following {labelled / 'rock/live/up'}: it links to {os.path.realpath(tmp_path / 'my_audio/rock')}, a folder it lies in (a cycle)",
    ]
