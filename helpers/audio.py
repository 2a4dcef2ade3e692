"""Audio files -> 16 kHz mono float32 -> stored-file mels (SPEC §2, §3).

``load_audio`` reads wav, flac, ogg and mp3 with soundfile (libsndfile >= 1.1 decodes mp3) and
falls back to ``librosa.load`` (audioread) only when soundfile cannot open a file. Channels are
averaged, then the signal is resampled with soxr (``soxr_hq``). Every failure is an
``AudioLoadError`` naming the file and the cause, so batch preparers can skip and list it.

``audio_to_mel`` gives the stored-file convention: ``(frames, 96)`` float32 compressed log mels,
not normalised (normalisation happens when the model input is built).
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch

from models.mel import SAMPLE_RATE, MelSpectrogram

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
RESAMPLE_TYPE = "soxr_hq"


class AudioLoadError(ValueError):
    """An audio file that is missing, unreadable, empty or not finite; the message names the file."""


def _describe(error: Exception) -> str:
    return str(error).strip() or type(error).__name__  # audioread's NoBackendError has no message


def _read(path: Path) -> tuple[np.ndarray, int, int | None]:
    """``(samples, channels)`` float32, the file's sample rate, and the frames its header declares (None: unknown)."""
    try:
        with sf.SoundFile(path) as f:
            # MPEG lengths are estimates (no length field in the stream); other formats state theirs.
            declared = None if f.format == "MPEG" else f.frames
            audio = f.read(dtype="float32", always_2d=True)
            sr = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_error:
        log.debug("soundfile cannot read %s (%s); trying librosa/audioread", path, sf_error)
        try:
            with warnings.catch_warnings():  # librosa warns that it falls back; we already know and log it
                warnings.simplefilter("ignore")
                audio, sr = librosa.load(path, sr=None, mono=False, dtype=np.float32)
        except Exception as fallback_error:  # audioread raises many unrelated types; re-raised as one below
            raise AudioLoadError(
                f"cannot decode audio file {path}: soundfile says {_describe(sf_error)}; "
                f"librosa/audioread says {_describe(fallback_error)}. The file is corrupt or not audio: "
                "re-encode it (e.g. to flac) or remove it"
            ) from fallback_error
        audio, declared = np.atleast_2d(audio).T, None  # librosa gives (channels, samples)
    # libsndfile clamps a WAV's data size to the bytes present: read the header's own promise.
    header = _wav_header_frames(path)
    return audio, int(sr), max(declared or 0, header or 0) or None


# WAVE format tags whose data size is a whole number of frames: PCM, IEEE float, A-law, mu-law, extensible.
_FRAME_ALIGNED_WAVE_FORMATS = (0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE)


def _wav_header_frames(path: Path) -> int | None:
    """Frames the ``data`` chunk of a RIFF/WAVE header declares; None for other files and unset sizes.

    Streaming writers leave the size at 0 or 0xFFFFFFFF (unknown): those are not promises.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None
        order = "<" if head[:4] == b"RIFF" else ">"
        block_align = None
        while len(chunk := f.read(8)) == 8:
            chunk_id, size = chunk[:4], struct.unpack(order + "I", chunk[4:])[0]
            if chunk_id == b"fmt ":
                fmt = f.read(size)
                if len(fmt) < 14:
                    return None
                tag, _channels, _rate, _byte_rate, block_align = struct.unpack(order + "HHIIH", fmt[:14])
                if tag not in _FRAME_ALIGNED_WAVE_FORMATS:
                    return None
                f.seek(size & 1, os.SEEK_CUR)
            elif chunk_id == b"data":
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even size
    return None


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono at ``sample_rate`` (any input rate and channel count).

    Raises ``AudioLoadError`` for a missing, undecodable, empty, truncated (fewer frames than its
    header declares) or non-finite file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(f"audio file {path} does not exist")
    audio, file_sr, declared = _read(path)
    if audio.size == 0 or audio.shape[0] == 0:
        raise AudioLoadError(f"audio file {path} is empty (0 samples)")
    if declared is not None and audio.shape[0] < declared:
        raise AudioLoadError(
            f"audio file {path} is truncated: its header says {declared / file_sr:.2f} s, the file holds "
            f"{audio.shape[0] / file_sr:.2f} s; re-encode or re-download it"
        )
    mono = audio.mean(axis=1, dtype=np.float32)  # (samples,)
    if not np.isfinite(mono).all():
        raise AudioLoadError(f"audio file {path} contains NaN or inf samples")
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


def list_audio_files(
    paths: Iterable[str | os.PathLike], extensions: Iterable[str] = AUDIO_EXTENSIONS
) -> list[Path]:
    """Files named in ``paths``, with folders expanded recursively to their audio files, sorted.

    Extensions are matched case-insensitively with or without the dot; hidden files and folders
    (names starting with ``.``, e.g. macOS ``._x.mp3``) are skipped while expanding folders.
    Files named explicitly are kept whatever their extension.
    """
    suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.update(
                    Path(root) / f for f in files if not f.startswith(".") and f.lower().endswith(suffixes)
                )
        else:
            raise FileNotFoundError(f"{p} is neither an audio file nor a folder")
    return sorted(found, key=str)
