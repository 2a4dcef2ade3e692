"""Audio files -> 16 kHz mono float32 -> stored-file mels (SPEC §2, §3).

``load_audio`` reads wav, flac, ogg and mp3 with soundfile (libsndfile >= 1.1 decodes mp3) and
decodes what libsndfile cannot (AAC/ALAC in M4A, Opus in WebM or Matroska, WMA, WAV files holding
Vorbis or MP3, ...) with FFmpeg through PyAV (``av``, which ships FFmpeg in its wheel). Channels
are averaged, then the signal is resampled with soxr (``soxr_hq``). Every failure is an
``AudioLoadError`` naming the file and the cause: "empty (0 bytes)", "unsupported codec X" when
FFmpeg finds an audio stream it has no decoder for, "corrupt or not audio" when neither reader
makes sense of the file (or finds no audio in it); batch preparers skip and list it.

``audio_to_mel`` gives the stored-file convention: ``(frames, 96)`` float32 compressed log mels,
not normalised (normalisation happens when the model input is built).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch

from models.mel import SAMPLE_RATE, MelSpectrogram

log = logging.getLogger(__name__)

# What folders are searched for (files named explicitly are read whatever their name).
AUDIO_EXTENSIONS = (
    ".wav", ".flac", ".ogg", ".oga", ".mp3", ".opus", ".m4a", ".mp4", ".aac", ".alac", ".webm", ".mka", ".wma",
    ".aif", ".aiff", ".aifc", ".caf", ".ac3", ".mp2", ".wv", ".ape",
)
RESAMPLE_TYPE = "soxr_hq"


class AudioLoadError(ValueError):
    """An audio file that is missing, unreadable, empty or not finite; the message names the file."""


def _describe(error: Exception) -> str:
    return str(error).strip() or type(error).__name__


def _describe_ffmpeg(error: Exception) -> str:
    """FFmpeg's reason without PyAV's "[Errno N] " prefix: N is an FFmpeg error code (e.g. 1094995529,
    AVERROR_INVALIDDATA), not an errno, and tells the reader nothing the text does not."""
    return re.sub(r"^\[Errno -?\d+\] ", "", _describe(error))


def _describe_soundfile(error: Exception, path: Path) -> str:
    """libsndfile's reason without the "Error opening '<path>': " prefix (the message names the file already).

    Its MPEG reader says "File does not exist or is not a regular file" of any mp3 it cannot
    parse; the file does exist here (``load_audio`` checked), so that text would only mislead.
    """
    text = _describe(error).removeprefix(f"Error opening {str(path)!r}: ").strip()
    if "does not exist or is not a regular file" in text:
        return "not a format it can decode"
    return text.rstrip(".")


# An MPEG file may decode up to this many samples short of its Xing/Info tag's count and be whole:
# some encoders count the tag's own frame, and a frame is 1152 samples (576 in MPEG-2 layer III).
MPEG_LENGTH_SLACK = 2 * 1152
# An MP3 may hold up to this share fewer stream bytes than its Xing/Info tag counts and be whole:
# libmpg123's own threshold ("Xing stream size off by more than 1%"), which tolerates encoders' rounding.
MPEG_BYTES_SLACK = 0.01

# libsndfile subtypes FFmpeg decodes to exactly the frames libsndfile's header reading states (FLAC's
# are PCM_*). Not Vorbis or Opus (FFmpeg drops up to 256 samples of Vorbis's first block; an Ogg file's
# last page is checked instead), nor ADPCM and the like, nor MPEG (its length is a tag's or an estimate).
_EXACT_LENGTH_SUBTYPES = ("PCM_", "FLOAT", "DOUBLE", "ULAW", "ALAW")
# libsndfile's frame count of a file whose header leaves its length unknown (a FLAC written to a pipe
# has 0 total samples in its STREAMINFO): not a promise.
_SF_COUNT_MAX = 2**63 - 1


def _read(path: Path) -> tuple[np.ndarray, int, int | None, int, tuple[int, int] | None]:
    """``(samples, channels)`` float32, the file's sample rate, the frames its header declares (None:
    unknown), how many fewer it may hold and still be whole, and for an MP3 whose Xing/Info tag counts
    its bytes, ``(bytes counted, bytes the file holds from its first frame)``.

    When libsndfile opens a file and reads its length but fails in its frames (a FLAC cut at a frame
    boundary: "Internal psf_fseek() failed"), FFmpeg decodes what is there and is held to that length
    where it decodes the codec to exactly that many frames: the file is refused as truncated, not read
    as a shorter one.
    """
    declared, slack, exact = None, 0, False
    counted_bytes, held_bytes = None, 0  # an MP3's Xing/Info tag's stream size, and what the file holds
    try:
        with sf.SoundFile(path) as f:
            # An MPEG stream has no length field: libsndfile estimates one from the file's size, unless the
            # file opens with a Xing/Info tag (LAME and most encoders write one) that counts its frames.
            if not f.subtype.startswith("MPEG"):
                declared = f.frames if f.frames < _SF_COUNT_MAX else None  # other codecs state their length
                exact = f.format != "OGG" and f.subtype.startswith(_EXACT_LENGTH_SUBTYPES)
            elif f.format in ("MP3", "MPEG"):  # an MPEG stream, not MPEG inside a WAV
                counts_frames, counted_bytes, held_bytes = _xing_tag(path)
                declared, slack = (f.frames if counts_frames else None), MPEG_LENGTH_SLACK
            audio = f.read(dtype="float32", always_2d=True)
            sr = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_error:
        log.debug("soundfile cannot read %s (%s); trying FFmpeg (PyAV)", path, sf_error)
        audio, sr = _read_ffmpeg(path, sf_error)
        if not exact:  # FFmpeg's length may differ by the codec's priming; a WAV's own header is read below
            declared, slack = None, 0
    # libsndfile clamps a WAV's or AIFF's data size to the bytes present: read the header's own promise.
    header = _wav_header_frames(path) or _aiff_header_frames(path)
    stream_bytes = (counted_bytes, held_bytes) if counted_bytes else None
    return audio, int(sr), max(declared or 0, header or 0) or None, slack if header is None else 0, stream_bytes


# Neither reader decodes a file that exists: a file cut short cannot be re-encoded, only fetched again.
# ("corrupt or not audio" stays: the module's docstring and the README name the cause so.)
_UNREADABLE = "The file is corrupt or not audio, or was cut short: download or export it again, or remove it"


def _read_ffmpeg(path: Path, sf_error: Exception) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg (PyAV): ``(samples, channels)`` float32 and its sample rate."""
    try:
        import av
    except ImportError as e:
        raise AudioLoadError(
            f"cannot decode audio file {path}: soundfile says {_describe_soundfile(sf_error, path)}, and PyAV "
            "(FFmpeg), which reads m4a/aac/opus/webm/wma and other codecs, is not installed: pip install -r requirements.txt"
        ) from e
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise AudioLoadError(
            f"cannot decode audio file {path}: soundfile says {_describe_soundfile(sf_error, path)}; FFmpeg says "
            f"{_describe_ffmpeg(e)}. {_UNREADABLE}"
        ) from e
    with container:
        if not container.streams.audio:
            raise AudioLoadError(f"audio file {path} has no audio stream (FFmpeg reads it as {container.format.name})")
        stream = container.streams.audio[0]
        codec = stream.codec_context
        if codec is None or codec.name in (None, "", "none"):
            tag = _wave_format_tag(path)
            name = f"WAVE format tag 0x{tag:04x}" if tag is not None else "unknown to FFmpeg"
            raise AudioLoadError(
                f"audio file {path}: unsupported codec {name} in a {container.format.name} container (neither "
                "libsndfile nor FFmpeg decodes it): re-encode it (e.g. to flac) with the tool that made it"
            )
        # Any sample format and layout -> planar float32 at the stream's own rate; soxr resamples later.
        resampler = av.AudioResampler(format="fltp", layout=codec.layout, rate=codec.sample_rate)
        chunks, data_bytes = [], 0
        try:
            for packet in container.demux(stream):
                data_bytes += packet.size
                for frame in packet.decode():
                    chunks += [f.to_ndarray() for f in resampler.resample(frame)]  # (channels, samples) each
            chunks += [f.to_ndarray() for f in resampler.resample(None)]
        except av.FFmpegError as e:
            raise AudioLoadError(
                f"cannot decode audio file {path} ({codec.name} in {container.format.name}): FFmpeg says {_describe_ffmpeg(e)}. "
                "The file is corrupt or cut short: download it again or export it again from its source"
            ) from e
        rate = codec.sample_rate
        if not chunks and data_bytes:
            # e.g. Vorbis in WAV: the WAV demuxer cuts the stream into blocks the Vorbis decoder cannot parse.
            raise AudioLoadError(
                f"audio file {path}: unsupported codec {codec.name} in a {container.format.name} container: FFmpeg "
                f"reads {data_bytes} bytes of {codec.name} data but decodes no audio from them; re-encode the file "
                f"(e.g. to flac, or {codec.name} in its usual container) with the tool that made it"
            )
        if not chunks:
            # libsndfile refused the file and FFmpeg, guessing a container (often from the name alone), finds
            # no audio packet in it: random bytes named .flac end here; they are not an empty recording.
            raise AudioLoadError(
                f"cannot decode audio file {path}: soundfile says {_describe_soundfile(sf_error, path)}; FFmpeg opens "
                f"it as {container.format.name} but finds no audio data in it. {_UNREADABLE}"
            )
    audio = np.concatenate(chunks, axis=1).T  # (samples, channels)
    # Encoders pad the last frame (AAC: up to 1024 samples); the container's duration says where the
    # signal ends. Trim at most that one frame: a longer excess means the duration is an estimate.
    if stream.duration and stream.time_base and codec.frame_size:
        declared = round(float(stream.duration * stream.time_base) * rate)
        if 0 < audio.shape[0] - declared <= codec.frame_size:
            audio = audio[:declared]
    return np.ascontiguousarray(audio, dtype=np.float32), rate


# WAVE format tags whose data size is a whole number of frames: PCM, IEEE float, A-law, mu-law, extensible.
_FRAME_ALIGNED_WAVE_FORMATS = (0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE)


def _iff_form(f) -> tuple[bytes, str] | None:
    """A RIFF/RIFX (WAV) or FORM (AIFF) file's form type (``b"WAVE"``, ``b"AIFF"``, ``b"AIFC"``) and byte
    order for ``struct``, read from its 12-byte header; None for other files."""
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX", b"FORM"):
        return None
    return head[8:12], "<" if head[:4] == b"RIFF" else ">"


def _iff_chunks(f, order: str) -> Iterator[tuple[bytes, int]]:
    """The chunks after the header: ``(id, size)`` with ``f`` at the chunk's data, which the caller may read
    in part; the walk goes on at the next chunk (chunks are padded to an even size)."""
    while len(chunk := f.read(8)) == 8:
        chunk_id, size = chunk[:4], struct.unpack(order + "I", chunk[4:])[0]
        start = f.tell()
        yield chunk_id, size
        f.seek(start + size + (size & 1))


def _wave_format_tag(path: Path) -> int | None:
    """The ``fmt `` chunk's format tag of a RIFF/WAVE file (0x0001 PCM, 0x0055 MP3, ...); None for other files."""
    with open(path, "rb") as f:
        form = _iff_form(f)
        if form is None or form[0] != b"WAVE":
            return None
        for chunk_id, _size in _iff_chunks(f, form[1]):
            if chunk_id == b"fmt ":
                fmt = f.read(2)
                return struct.unpack(form[1] + "H", fmt)[0] if len(fmt) == 2 else None
    return None


def _xing_tag(path: Path) -> tuple[bool, int | None, int]:
    """An MPEG audio file's Xing or Info tag: whether it counts the frames, the bytes of stream it counts
    (None: no tag, or no count) and the bytes the file holds from its first frame on.

    The tag sits in the first frame, after its 4-byte header and side information (9 to 32 bytes, by
    version and channel mode; 2 more with a CRC), behind any ID3v2 tag. Its flags (4 bytes, big-endian)
    say which counts follow, 4 bytes big-endian each: bit 0 the frames (the decoder's length then is the
    encoder's, not an estimate from the file's size), bit 1 the bytes, from the tag's own frame to the end
    of the last (LAME >= 3.98 and FFmpeg write exactly that; an ID3v1 or APE tag behind it is not counted).
    """
    with open(path, "rb") as f:
        head = f.read(10)
        start = 0
        if len(head) == 10 and head[:3] == b"ID3":  # ID3v2: a 10-byte header, a syncsafe size, a footer flag
            size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
            start = 10 + size + (10 if head[5] & 0x10 else 0)
        f.seek(start)
        data = f.read(16384)
        file_size = f.seek(0, os.SEEK_END)
    for sync in range(len(data) - 1):  # the first frame header: 11 set bits, a valid version and layer
        if data[sync] == 0xFF and data[sync + 1] & 0xE0 == 0xE0 and data[sync + 1] & 0x18 != 0x08 and data[sync + 1] & 0x06:
            held = file_size - start - sync
            window = data[sync + 4: sync + 4 + 40]
            at = max(window.find(b"Xing"), window.find(b"Info"))
            if at < 0 or len(window) < at + 8:
                return False, None, held
            tag = data[sync + 4 + at:]  # "Xing" or "Info", the flags, then the counts they announce
            flags = tag[7]
            byte_count = tag[12:16] if flags & 0x01 else tag[8:12]  # after the frame count, if there is one
            counted = struct.unpack(">I", byte_count)[0] if flags & 0x02 and len(byte_count) == 4 else None
            return bool(flags & 0x01), counted or None, held  # a count of 0 bytes states nothing
    return False, None, 0


# AIFF-C compression types whose COMM chunk counts sample frames of plain samples (PCM or float).
_PLAIN_AIFC_TYPES = (b"NONE", b"sowt", b"twos", b"raw ", b"in24", b"in32", b"fl32", b"FL32", b"fl64", b"FL64")


def _aiff_header_frames(path: Path) -> int | None:
    """Sample frames the ``COMM`` chunk of an AIFF (or plain AIFF-C) file declares; None for other files."""
    with open(path, "rb") as f:
        form = _iff_form(f)
        if form is None or form[0] not in (b"AIFF", b"AIFC"):
            return None
        for chunk_id, size in _iff_chunks(f, form[1]):
            if chunk_id == b"COMM":
                comm = f.read(size)
                if len(comm) < 18 or (form[0] == b"AIFC" and comm[18:22] not in _PLAIN_AIFC_TYPES):
                    return None
                return struct.unpack(">I", comm[2:6])[0] or None
    return None


def _ogg_cut_short(path: Path) -> bool:
    """Whether an Ogg file's last page is incomplete or lacks the end-of-stream flag: the file was cut short.

    Ogg states no length up front (readers take the last page's position as the length), but its
    writers mark the last page of a stream (header type bit 0x04); a copy cut anywhere loses it,
    or leaves that page without all of its bytes.
    A page is at most 65 307 bytes, so the last one starts within the file's last 65 307 bytes.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"OggS":
            return False
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 65307))
        tail = f.read()
    last = tail.rfind(b"OggS\x00")  # capture pattern and stream structure version 0
    if last < 0 or last + 27 > len(tail):
        return True
    # A page: a 27-byte header (type at 5, segment count at 26), the segment sizes, their bytes.
    n_segments = tail[last + 26]
    sizes = tail[last + 27: last + 27 + n_segments]
    whole = len(sizes) == n_segments and last + 27 + n_segments + sum(sizes) <= len(tail)
    return not (whole and tail[last + 5] & 0x04)


def _ogg_cut_error(path: Path) -> AudioLoadError:
    return AudioLoadError(
        f"audio file {path} is truncated: its last Ogg page does not end the stream (the file was cut short, "
        "e.g. by a copy or download that stopped); download it again or export it again from its source"
    )


def _wav_header_frames(path: Path) -> int | None:
    """Frames the ``data`` chunk of a RIFF/WAVE header declares; None for other files and unset sizes.

    Streaming writers leave the size at 0 or 0xFFFFFFFF (unknown): those are not promises.
    """
    with open(path, "rb") as f:
        form = _iff_form(f)
        if form is None or form[0] != b"WAVE":
            return None
        block_align = None
        for chunk_id, size in _iff_chunks(f, form[1]):
            if chunk_id == b"fmt ":
                fmt = f.read(size)
                if len(fmt) < 14:
                    return None
                tag, _channels, _rate, _byte_rate, block_align = struct.unpack(form[1] + "HHIIH", fmt[:14])
                if tag not in _FRAME_ALIGNED_WAVE_FORMATS:
                    return None
            elif chunk_id == b"data":
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
    return None


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate`` (any input rate and channel count).

    Raises ``AudioLoadError`` for a missing, undecodable, empty, truncated or non-finite file.
    Truncated: fewer frames than the file declares (a WAV's or AIFF's header, a FLAC's STREAMINFO, an MP3's
    Xing/Info tag; an M4A's cut frames fail to decode), fewer bytes of MP3 stream than its Xing/Info
    tag counts (by more than 1 %), or an Ogg file (Vorbis, Opus, ...) whose last page does not end
    its stream.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_audio reads an audio file: give its path, not a {type(path).__name__} (audio already in memory "
                        "needs no loading: 16 kHz mono float32 in [-1, 1] goes to models.mel.MelSpectrogram as it is)")
    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(f"audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise AudioLoadError(f"audio file {path} is empty (0 bytes): download or export it again, or remove it")
    try:
        audio, file_sr, declared, slack, stream_bytes = _read(path)
    except AudioLoadError:
        if _ogg_cut_short(path):  # the cut left no whole page to decode
            raise _ogg_cut_error(path) from None
        raise
    if _ogg_cut_short(path):
        raise _ogg_cut_error(path)
    if audio.size == 0 or audio.shape[0] == 0:  # a well-formed file that holds no samples (e.g. a bare WAV header)
        raise AudioLoadError(f"audio file {path} is empty (0 samples): it holds no audio; export it again, or remove it")
    if declared is not None and audio.shape[0] < declared - slack:
        raise AudioLoadError(
            f"audio file {path} is truncated: its header says {declared / file_sr:.2f} s, the file holds "
            f"{audio.shape[0] / file_sr:.2f} s; download it again or export it again from its source"
        )
    if stream_bytes is not None and stream_bytes[1] < stream_bytes[0] * (1 - MPEG_BYTES_SLACK):
        # A cut near an MP3's end can lose fewer frames than MPEG_LENGTH_SLACK; the tag's byte count sees it.
        raise AudioLoadError(
            f"audio file {path} is truncated: its Xing/Info tag counts {stream_bytes[0]} bytes of MP3 stream, the "
            f"file holds {stream_bytes[1]}; download it again or export it again from its source"
        )
    mono = audio.mean(axis=1, dtype=np.float32)  # (samples,)
    if not np.isfinite(mono).all():
        raise AudioLoadError(
            f"audio file {path} contains NaN or inf samples (a float file written from a broken computation): "
            "export it again from its source, or remove it"
        )
    if file_sr != sample_rate:
        mono = librosa.resample(mono, orig_sr=file_sr, target_sr=sample_rate, res_type=RESAMPLE_TYPE)
    return np.ascontiguousarray(mono, dtype=np.float32)


_default_mel: MelSpectrogram | None = None


def _mel_module() -> MelSpectrogram:
    global _default_mel  # a cache of a derived constant (the filterbank), not a behaviour flag
    if _default_mel is None:
        _default_mel = MelSpectrogram()
    return _default_mel


def audio_to_mel(audio: np.ndarray, mel: MelSpectrogram | None = None) -> np.ndarray:
    """16 kHz mono ``(samples,)`` -> compressed, un-normalised mel ``(frames, n_mels)`` float32.

    ``frames = 1 + samples // 256``: the layout of stored mel files (``helpers.melfiles.write_mel``).
    """
    mel = _mel_module() if mel is None else mel
    if mel.normalized:
        raise ValueError(
            "audio_to_mel writes the stored-file convention (compressed, not normalised): "
            "pass a MelSpectrogram(normalized=False)"
        )
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio_to_mel expects mono audio of shape (samples,), got {audio.shape}")
    with torch.no_grad():
        spec = mel(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)))  # (n_mels, frames)
    return np.ascontiguousarray(spec.T.numpy(), dtype=np.float32)  # (frames, n_mels)


def find_audio_files(
    paths: Iterable[str | os.PathLike], extensions: Iterable[str] = AUDIO_EXTENSIONS
) -> tuple[list[Path], dict[str, str]]:
    """Files named in ``paths``, with folders expanded recursively to their audio files (sorted), and
    ``{path: reason}`` of the paths that name neither a file nor a folder (missing ones: "does not exist").

    Extensions are matched case-insensitively with or without the dot; hidden files and folders
    (names starting with ``.``, e.g. macOS ``._x.mp3``) are skipped while expanding folders.
    Files named explicitly are kept whatever their extension. Symlinked folders are followed; a
    link back to a folder it lies in (a cycle) is skipped with a warning.
    """
    suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    found: set[Path] = set()
    unusable: dict[str, str] = {}
    for p in map(Path, paths):
        if not p.exists():  # typed in one Unicode form, on disk in the other (a file copied from macOS: 'café' as e + U+0301)
            p = next((q for q in (Path(unicodedata.normalize(f, str(p))) for f in ("NFC", "NFD")) if q.exists()), p)
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            found.update(_audio_files_under(p, suffixes))
        elif not p.exists():  # also a symlink to nothing
            unusable[str(p)] = f"{p} does not exist: check the path"
        else:
            unusable[str(p)] = f"{p} is neither an audio file nor a folder (a pipe, socket or device)"
    return sorted(found, key=str), unusable


def _audio_files_under(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Audio files below ``folder``, through symlinked folders too (``os.walk`` would skip those).

    Each folder on the stack carries the real paths of the folders it lies in, ``folder``'s own
    parents included: a link to one of them is a cycle (it holds the link) and is not entered. A
    folder reached by two links is listed under both names.
    """
    files = []
    stack = [(folder, frozenset(str(p) for p in Path(os.path.realpath(folder)).parents))]
    while stack:
        current, inside = stack.pop()
        real = os.path.realpath(current)
        if real in inside:
            log.warning("not following %s: it links to %s, a folder it lies in (a cycle)", current, real)
            continue
        try:
            entries = list(os.scandir(current))
        except OSError as e:
            log.warning("cannot read folder %s (%s): its files are left out", current, e)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows symlinks
                stack.append((current / entry.name, inside | {real}))
            elif entry.name.lower().endswith(suffixes):  # files, and links to nothing (reading them reports it)
                files.append(current / entry.name)
    return files


def list_audio_files(
    paths: Iterable[str | os.PathLike], extensions: Iterable[str] = AUDIO_EXTENSIONS
) -> list[Path]:
    """``find_audio_files`` for callers that need every path to exist: raises ``FileNotFoundError``
    naming every path that is neither a file nor a folder ("... does not exist")."""
    found, unusable = find_audio_files(paths, extensions)
    if unusable:
        raise FileNotFoundError("; ".join(unusable.values()))
    return found
