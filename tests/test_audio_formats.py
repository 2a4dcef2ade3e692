"""helpers/audio.py: files libsndfile cannot read decode through FFmpeg (PyAV); the others as before.

Every file is made here: PyAV's own encoders (aac, libopus, vorbis, libmp3lame, flac) and soundfile.
Each decoded file is checked for 16 kHz, mono, its duration and its content (the sine's frequency).
"""

from __future__ import annotations

import re
import struct
import sys

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
    with pytest.raises(AudioLoadError, match=r"fake\.m4a: soundfile says .*; FFmpeg says .*corrupt or not audio") as error:
        load_audio(tmp_path / "fake.m4a")
    assert "[Errno" not in str(error.value)  # FFmpeg's code is not an errno: its text alone
    assert str(error.value).endswith("or was cut short: download or export it again, or remove it")


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
CUT_SHORT = {".mp3": r"is truncated: its header says 1\.00 s, the file holds 0\.\d\d s; download it again or export it again from its source",
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


# An MP3's Xing/Info tag counts the bytes of its stream, from the tag's own frame to the end of the last one.
MP3_BYTES_CUT = r"is truncated: its Xing/Info tag counts (\d+) bytes of MP3 stream, the file holds (\d+); download it again or export it again from its source"


def first_frame_at(data: bytes) -> int:
    """Where an MP3's first frame starts: after its ID3v2 tag (10 bytes and a syncsafe size), if any."""
    return 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10])) if data[:3] == b"ID3" else 0


@pytest.mark.parametrize("name", [name for name in MAKERS if name.endswith(".mp3")])
@pytest.mark.parametrize("keep", [0.95, 0.98])
def test_an_mp3_missing_only_its_last_frames_is_cut_short(tmp_path, name, keep):
    # 5 % of a 1 s file is 1 to 3 frames, often fewer decoded samples than MPEG_LENGTH_SLACK; 2 % is less
    # than a frame. Both are more stream bytes than the 1 % libmpg123 tolerates between the tag and the file.
    path = MAKERS[name](tmp_path / name)
    whole = path.read_bytes()
    cut(path, keep)
    with pytest.raises(AudioLoadError, match=rf"audio file {re.escape(str(path))} (?:{MP3_BYTES_CUT}|{CUT_SHORT['.mp3']})") as error:
        load_audio(path)
    if keep == 0.98:  # no missing frame to see: the byte count says it
        counted, held = map(int, re.search(MP3_BYTES_CUT, str(error.value)).groups())
        assert counted == len(whole) - first_frame_at(whole)  # the whole stream, the ID3v2 tag not counted
        assert held == int(len(whole) * keep) - first_frame_at(whole)


@pytest.mark.parametrize("rate", [22050, 32000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_whole_mp3s_of_both_encoders_read_and_a_95_percent_cut_does_not(tmp_path, monkeypatch, rate, channels):
    # libsndfile's LAME (no ID3) and FFmpeg's libmp3lame (an ID3v2 tag, then its own Info tag) count the
    # same bytes in their tags: a whole file holds exactly that, whatever its length, rate and channels.
    for seconds in (0.3, 2.7):
        monkeypatch.setattr(sys.modules[__name__], "SECONDS", seconds)
        for path in (soundfile_writes("MP3", rate, channels)(tmp_path / "lame.mp3"),
                     encode(tmp_path / "ffmpeg.mp3", "libmp3lame", rate, 440.0, channels=channels)):
            data = path.read_bytes()
            tag = first_frame_at(data) + re.search(rb"Xing|Info", data[first_frame_at(data) :][:64]).start()
            flags, _frames, counted = struct.unpack(">III", data[tag + 4 : tag + 16])  # frames, then bytes
            assert flags & 0x03 == 0x03 and counted == len(data) - first_frame_at(data), path.name
            audio = load_audio(path)
            assert abs(audio.size - seconds * 16000) <= 16 and peak_hz(audio) == pytest.approx(440.0, abs=5)
            with pytest.raises(AudioLoadError, match=rf"{re.escape(str(cut(path, 0.95)))} is truncated"):
                load_audio(path)


def test_a_flac_cut_at_a_frame_boundary_is_cut_short(tmp_path):
    # libsndfile reads the length in STREAMINFO, then fails at the missing frame ("Internal psf_fseek()
    # failed"); FFmpeg decodes the frames that are there, without error: still not the whole file.
    path = tmp_path / "cut.flac"
    sf.write(path, np.concatenate([sine(44100, 440.0, 2)] * 2, axis=1).T, 44100)  # 2 s
    data = path.read_bytes()
    frames = []  # a frame opens with its sync code (fixed block size), 2 bytes, then its number (< 128: 1 byte)
    for at in (m.start() for m in re.finditer(b"\xff\xf8", data)):
        if data[at + 4] == len(frames):
            frames.append(at)
    assert len(frames) > 10
    path.write_bytes(data[: frames[len(frames) // 2]])
    with pytest.raises(AudioLoadError, match=rf"audio file {re.escape(str(path))} is truncated: its header says "
                       r"2\.00 s, the file holds [01]\.\d\d s; download it again or export it again from its source"):
        load_audio(path)


def test_a_flac_that_does_not_state_its_length_reads(tmp_path):
    # A FLAC written to a pipe has 0 total samples in its STREAMINFO (unknown); libsndfile then gives
    # 2**63 - 1 frames and fails to read that many: FFmpeg's decode is not held to that length.
    path = tmp_path / "piped.flac"
    sf.write(path, sine(44100, 440.0, 2).T, 44100)
    data = bytearray(path.read_bytes())
    data[8 + 13] &= 0xF0  # STREAMINFO's block starts at 8; its total samples are the last 36 bits of 8+13..8+17
    data[8 + 14 : 8 + 18] = bytes(4)
    path.write_bytes(bytes(data))
    audio = load_audio(path)
    assert audio.size == 16000 and peak_hz(audio) == pytest.approx(440.0, abs=3)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])  # AIFF, AIFF-C "fl32"
def test_an_aiff_file_cut_short_is_an_error_and_a_whole_one_reads(tmp_path, subtype):
    path = tmp_path / f"{subtype}.aiff"
    sf.write(path, sine(44100, 440.0, 2).T, 44100, format="AIFF", subtype=subtype)
    whole = load_audio(path)
    assert abs(whole.size - 16000) <= 16 and peak_hz(whole) == pytest.approx(440.0, abs=3)
    cut(path, 0.5)
    with pytest.raises(AudioLoadError, match=rf"audio file {re.escape(str(path))} is truncated: its header says 1\.00 s, the file holds 0\.\d\d s"):
        load_audio(path)
