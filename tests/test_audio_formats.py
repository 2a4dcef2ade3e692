"""helpers/audio.py: files libsndfile cannot read decode through FFmpeg (PyAV); the others as before.

Every file is made here: PyAV's own encoders (aac, libopus, vorbis, libmp3lame, flac) and soundfile.
Each decoded file is checked for 16 kHz, mono, its duration and its content (the sine's frequency).
"""

from __future__ import annotations

import re
import struct

import av
import numpy as np
import pytest
import soundfile as sf

from helpers.audio import AUDIO_EXTENSIONS, AudioLoadError, list_audio_files, load_audio

SECONDS = 1.0
LAYOUTS = {1: "mono", 2: "stereo", 6: "6.0"}  # 6.0, not 5.1: an LFE channel would be low-passed


def sine(rate: int, freq: float, channels: int) -> np.ndarray:
    """``(channels, samples)`` float32: the same sine on every channel, at 0.5."""
    t = np.arange(int(SECONDS * rate)) / rate
    return np.tile(0.5 * np.sin(2 * np.pi * freq * t), (channels, 1)).astype(np.float32)


def encode(path, codec: str, rate: int, freq: float, channels: int = 2, container: str | None = None):
    """Write a sine with PyAV's encoder ``codec`` (timestamps set, so containers record encoder delay)."""
    signal = sine(rate, freq, channels)
    layout = LAYOUTS[channels]
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "-2"}  # FFmpeg's native Vorbis encoder is "experimental"
        to_codec = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        step = stream.codec_context.frame_size or 1024
        for start in range(0, signal.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[:, start : start + step]), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for converted in to_codec.resample(frame):
                for packet in stream.encode(converted):
                    out.mux(packet)
        for converted in to_codec.resample(None):
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.argmax(spectrum) * 16000 / audio.size)


def assert_sine(path, freq: float, duration_ms: float = 5.0, libsndfile_reads: bool = False):
    if not libsndfile_reads:
        with pytest.raises(sf.LibsndfileError):
            sf.info(str(path))  # not readable by libsndfile: this decodes through FFmpeg
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1  # 16 kHz mono
    assert abs(audio.size - SECONDS * 16000) <= duration_ms * 16, f"{audio.size / 16:.1f} ms"
    assert peak_hz(audio) == pytest.approx(freq, abs=3)
    middle = audio[2000:-2000]  # every channel holds the sine: the mono mean keeps its amplitude
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


@pytest.mark.parametrize(
    "name, codec, rate, container, freq",
    [
        ("song.m4a", "aac", 44100, None, 440.0),  # AAC in MP4: most personal libraries
        ("voice.webm", "libopus", 48000, None, 660.0),  # Opus in WebM (libsndfile reads Opus only in Ogg)
        ("tape.mka", "vorbis", 22050, "matroska", 523.25),  # Vorbis in Matroska
    ],
)
def test_codecs_libsndfile_refuses_decode_through_ffmpeg(tmp_path, name, codec, rate, container, freq):
    assert_sine(encode(tmp_path / name, codec, rate, freq, container=container), freq)


def test_a_wav_holding_mp3_decodes(tmp_path):
    # Format tag 0x0055: libsndfile >= 1.1 reads it itself, with a frame count that is an estimate
    # (MPEG has no length field): not a truncated file. Either way: the sine, 16 kHz mono.
    path = encode(tmp_path / "mp3.wav", "libmp3lame", 32000, 1000.0, container="wav")
    assert path.read_bytes()[20:22] == struct.pack("<H", 0x0055)
    audio = load_audio(path)
    assert abs(audio.size - 16000) <= 1152 * 16000 // 32000 * 2 and peak_hz(audio) == pytest.approx(1000.0, abs=3)


def test_six_channels_and_24_bit_flac_average_to_mono(tmp_path):
    # 5.1 AAC through FFmpeg; 24-bit FLAC through libsndfile (unchanged path), both down-mixed by the mean.
    assert_sine(encode(tmp_path / "surround.m4a", "aac", 48000, 880.0, channels=6), 880.0)
    flac = tmp_path / "hi-res.flac"
    sf.write(flac, sine(96000, 1200.0, 6).T, 96000, subtype="PCM_24")
    assert sf.info(str(flac)).subtype == "PCM_24" and sf.info(str(flac)).channels == 6
    audio = load_audio(flac)
    assert audio.size == 16000 and peak_hz(audio) == pytest.approx(1200.0, abs=3)


def test_unsupported_codecs_are_named(tmp_path):
    # A WAV with a format tag no decoder knows: "unsupported codec", naming the tag, not "corrupt".
    fmt = struct.pack("<HHIIHH", 0x1234, 1, 16000, 32000, 2, 16)
    data = np.zeros(8000, dtype="<i2").tobytes()
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    (tmp_path / "odd.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(AudioLoadError, match=r"odd\.wav: unsupported codec WAVE format tag 0x1234 in a wav container"):
        load_audio(tmp_path / "odd.wav")
    # Vorbis inside WAV (FFmpeg writes it, but its WAV reader cannot give the decoder whole packets).
    encode(tmp_path / "vorbis.wav", "vorbis", 44100, 440.0, container="wav")
    with pytest.raises(AudioLoadError, match=r"vorbis\.wav: unsupported codec vorbis in a wav container: FFmpeg reads \d+ bytes"):
        load_audio(tmp_path / "vorbis.wav")
    # Garbage behind an MP4 header: neither reader makes sense of it.
    (tmp_path / "fake.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(range(256)) * 8)
    with pytest.raises(AudioLoadError, match=r"fake\.m4a: soundfile says .*; FFmpeg says .*corrupt or not audio"):
        load_audio(tmp_path / "fake.m4a")


def test_folders_list_the_formats_ffmpeg_reads(tmp_path):
    for ext in ("m4a", "aac", "opus", "webm", "wma", "mka", "aiff", "M4A"):
        (tmp_path / f"x.{ext}").touch()
    (tmp_path / "notes.txt").touch()
    assert {".m4a", ".aac", ".opus", ".webm", ".wma"} <= set(AUDIO_EXTENSIONS)
    assert sorted(p.name for p in list_audio_files([tmp_path])) == sorted(
        f"x.{ext}" for ext in ("m4a", "aac", "opus", "webm", "wma", "mka", "aiff", "M4A")
    )


# ------------------------------------------------------------------------------ files cut short
def cut(path, keep: float):
    """Keep the first ``keep`` of the file's bytes (a copy or download that stopped)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def soundfile_writes(fmt: str, rate: int, channels: int):
    def write(path):
        sf.write(path, sine(rate, 440.0, channels).T, rate, format=fmt)
        return path

    return write


MAKERS = {
    "lame.mp3": soundfile_writes("MP3", 44100, 2),  # libsndfile's LAME: a Xing tag, no ID3
    "lame-mono-32k.mp3": soundfile_writes("MP3", 32000, 1),
    "ffmpeg.mp3": lambda path: encode(path, "libmp3lame", 48000, 440.0),  # an ID3v2 tag, then an Info tag
    "mpeg2-22k.mp3": lambda path: encode(path, "libmp3lame", 22050, 440.0, channels=1),  # MPEG-2: 576-sample frames
    "vorbis.ogg": soundfile_writes("OGG", 44100, 2),
    "opus.ogg": lambda path: encode(path, "libopus", 48000, 440.0, container="ogg"),
}
CUT_SHORT = {".mp3": r"is truncated: its header says 1\.00 s, the file holds 0\.\d\d s; re-encode or re-download it",
             ".ogg": r"is truncated: its last Ogg page does not end the stream \(the file was cut short"}


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_a_file_cut_short_is_an_error_naming_the_file_and_a_whole_one_reads(tmp_path, name, keep):
    path = MAKERS[name](tmp_path / name)
    whole = load_audio(path)  # whole: read in full, not mistaken for a cut file
    assert abs(whole.size - 16000) <= 16 and peak_hz(whole) == pytest.approx(440.0, abs=3)
    cut(path, keep)
    with pytest.raises(AudioLoadError, match=rf"audio file {re.escape(str(path))} {CUT_SHORT[path.suffix]}"):
        load_audio(path)


@pytest.mark.parametrize("name", ["vorbis.ogg", "opus.ogg"])
def test_an_ogg_file_missing_only_its_last_bytes_is_cut_short(tmp_path, name):
    path = MAKERS[name](tmp_path / name)
    path.write_bytes(path.read_bytes()[:-8])  # most of its last page is still there
    with pytest.raises(AudioLoadError, match=rf"audio file {re.escape(str(path))} {CUT_SHORT['.ogg']}"):
        load_audio(path)
