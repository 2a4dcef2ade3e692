"""The MAEST mel front-end as a batched torch module (SPEC §2).

Matches the published models' Essentia front-end: 16 kHz mono, 512-sample Hann frames with a
256-sample hop, centred with zero padding, power spectrum, 96 Slaney mel bands from 0 to 8 kHz
with unit-area normalisation, compressed with ``log10(1 + 10000 * mel)``. The filterbank comes
from librosa so the numbers equal ``librosa.feature.melspectrogram`` with the same settings.
No torchaudio: it has no CPU build next to every torch.

``check_audio`` is the one rule for what every waveform entry point takes (this module,
``track_probabilities``, ``MAESTEncoder``, ``MAESTFeatureExtractor``): real floating-point samples
in [-1, 1], mono, not empty, finite. Each refusal says what to do, because the mistakes it catches
otherwise compute without an error: integer PCM 32768 times too loud (as integers, or cast to float
without its scale), or ``(samples, channels)``
(what ``soundfile.read`` returns) read as a batch of ``samples`` one-frame tracks.
"""

from __future__ import annotations

import librosa
import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 512
HOP_LENGTH = 256
N_MELS = 96
F_MIN = 0.0
F_MAX = 8000.0
LOG_SCALE = 10000.0

MAX_CHANNELS = 8  # 7.1 surround: a trailing axis this short beside a longer one holds channels, not samples
RESAMPLE_HINT = "resample it to 16 kHz first (helpers.audio.load_audio does, or librosa.resample)"

# Statistics of the compressed Discogs mels; the models see (x - mean) / (2 * std).
DISCOGS_MEAN = 2.06755686098554
DISCOGS_STD = 1.268292820667291


def n_frames_for(clip_length: float, hop_length: int = HOP_LENGTH, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames in a training clip of ``clip_length`` seconds: 5 s -> 312, 10 s -> 625, 30 s -> 1875."""
    return int(clip_length * sample_rate) // hop_length


def slaney_filterbank(dtype=np.float32) -> np.ndarray:
    """SPEC §2's mel filterbank, ``(n_mels, n_fft // 2 + 1) = (96, 257)``: Slaney scale, 0-8000 Hz, unit area."""
    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX, htk=False, norm="slaney", dtype=dtype
    )


def looks_like_channels(shape) -> bool:
    """True for a 2-D ``(samples, channels)`` shape: a trailing axis of 1 to ``MAX_CHANNELS`` beside a longer leading one.

    ``(192000, 2)`` (stereo, as ``soundfile.read`` returns) -> True; ``(2, 192000)`` -> False.
    """
    return len(shape) == 2 and 0 < shape[1] <= MAX_CHANNELS and shape[0] > shape[1]


def mono_fix(shape) -> str:
    """What to do with multi-channel audio of ``shape``, for error messages: which axis to average."""
    shape = tuple(shape)
    if len(shape) == 2:
        axis = 1 if shape[1] <= shape[0] else 0  # the channels are the shorter axis
        return f"average the channels to mono first (audio.mean({axis})), or pass one channel"
    return "mix multi-channel audio down to mono first (average the channels)"


def check_dtype(audio, who: str, name: str = "the audio") -> None:
    """Refuse integer, bool and complex samples (tensor or array); the message says how to convert integer PCM."""
    if torch.is_tensor(audio):
        is_float, is_complex, is_bool = audio.is_floating_point(), audio.is_complex(), audio.dtype == torch.bool
    else:
        kind = np.asarray(audio).dtype.kind
        is_float, is_complex, is_bool = kind == "f", kind == "c", kind == "b"
    if is_float:
        return
    hint = ""
    if is_complex:
        hint = ": pass real samples, not a complex spectrum"
    elif not is_bool:
        hint = ": divide integer PCM by its full scale (e.g. int16 / 32768) first"
    raise TypeError(f"{who} expects real floating-point audio in [-1, 1]; {name} is {audio.dtype}{hint}")


def check_layout(shape, who: str, expected: str, name: str = "the audio", ndims: tuple[int, ...] = (1, 2)) -> None:
    """Refuse a rank other than ``ndims``, a ``(samples, channels)`` shape (``looks_like_channels``) and empty audio."""
    shape = tuple(int(n) for n in shape)
    channels = looks_like_channels(shape)
    if len(shape) not in ndims or channels:
        layout = ", which looks like (samples, channels) as soundfile.read returns" if channels else ""
        if channels or len(shape) > max(ndims):
            fix = mono_fix(shape)
        elif len(shape) == 0:
            fix = "pass a waveform, not a single number"
        else:
            fix = "add a batch axis first (audio[None])"
        raise ValueError(f"{who} expects {expected}; {name} has shape {shape}{layout}: {fix}")
    if 0 in shape:
        raise ValueError(f"{who} got empty audio: {name} is empty (shape {shape})")


def check_finite(audio, who: str, name: str = "the audio", rows: str = "row") -> None:
    """Refuse NaN or inf samples, naming where: ``name`` for 1-D audio, ``"{rows} i"`` for each bad row of a batch."""
    finite = torch.isfinite(audio) if torch.is_tensor(audio) else torch.from_numpy(np.isfinite(np.asarray(audio)))
    if finite.dim() < 2:
        if bool(finite.all()):
            return
        where = name
    else:
        bad = torch.nonzero(~finite.flatten(1).all(1)).flatten().tolist()
        if not bad:
            return
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        where = ", ".join(f"{rows} {i}" for i in bad[:5]) + more
    raise ValueError(f"{who} got NaN or inf samples in {where}: a corrupt or badly decoded file? Decode it again or leave it out")


# Float samples peaking above this are integer PCM converted to float without its scale (16-bit
# PCM of music peaks in the thousands); float files may go a little over 1, never near it.
PCM_SCALE_PEAK = 64.0


def check_scale(audio, who: str, name: str = "the audio") -> None:
    """Refuse float audio at the scale of integer PCM (``int16`` cast to float without dividing by 32768)."""
    peak = float(audio.abs().max()) if torch.is_tensor(audio) else float(np.abs(np.asarray(audio)).max())
    if peak > PCM_SCALE_PEAK:
        raise ValueError(
            f"{who} expects floating-point audio in [-1, 1]; {name} peaks at {peak:g}, the scale of integer PCM: divide it by "
            "its full scale first (32768 for 16-bit, 2**31 for 32-bit)"
        )


def check_audio(
    audio, who: str, expected: str, name: str = "the audio", rows: str = "row", ndims: tuple[int, ...] = (1, 2), finite: bool = True
) -> None:
    """The one rule for waveform inputs (module docstring): ``check_layout``, ``check_dtype``, ``check_finite``, ``check_scale``.

    ``who`` starts each message, ``expected`` says what it takes (``"mono 16 kHz audio (samples,) per
    track"``), ``name`` what was given (``"track 3"``), ``rows`` what the rows of a batch are
    (``"sound"``: NaN in row 2 is reported as ``"sound 2"``). ``audio``: a tensor or a numpy array.
    """
    check_layout(audio.shape, who, expected, name, ndims)
    check_dtype(audio, who, name)
    if finite:
        check_finite(audio, who, name, rows)
    check_scale(audio, who, name)


def normalize(mel: torch.Tensor | np.ndarray, mean: float = DISCOGS_MEAN, std: float = DISCOGS_STD):
    """Model input normalisation of compressed mels (works on tensors and arrays)."""
    return (mel - mean) / (2 * std)


class MelSpectrogram(nn.Module):
    """Audio ``(B, samples)`` or ``(samples,)`` at 16 kHz -> compressed mel ``(B, n_mels, frames)``.

    ``frames = 1 + samples // hop_length`` (centred frames). Set ``normalized=True`` to also apply
    the model-input normalisation, giving exactly what ``MAEST.forward`` expects. The front end is
    fixed at 16 kHz (SPEC §2): another ``sample_rate`` is refused, since it would build a different
    filterbank and time axis that no MAEST model was trained on. Audio goes through ``check_audio``
    (without the finiteness check, which would need the values: a NaN reaches ``MAEST``'s own check).
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        n_mels: int = N_MELS,
        f_min: float = F_MIN,
        f_max: float = F_MAX,
        log_scale: float = LOG_SCALE,
        normalized: bool = False,
    ):
        super().__init__()
        if sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"MelSpectrogram is the MAEST front end, fixed at {SAMPLE_RATE} Hz (SPEC §2); got sample_rate={sample_rate!r}. "
                f"For audio at another rate, {RESAMPLE_HINT}, then use MelSpectrogram()"
            )
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.log_scale = log_scale
        self.normalized = normalized
        mel_basis = librosa.filters.mel(
            sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=False, norm="slaney"
        )
        # Buffers follow .to(device); not saved in state dicts (they are derived, not learned).
        self.register_buffer("mel_basis", torch.from_numpy(mel_basis.astype(np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def n_frames(self, n_samples: int) -> int:
        return 1 + n_samples // self.hop_length

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(audio):
            raise TypeError(f"MelSpectrogram expects a torch.Tensor of audio samples, got {type(audio).__name__}")
        check_dtype(audio, "MelSpectrogram")
        if not torch.compiler.is_compiling():  # a test of the length would pin the ONNX exporter's free samples axis
            check_layout(audio.shape, "MelSpectrogram", "mono 16 kHz audio (samples,) or (batch, samples)")
            if audio.device.type == "cpu":  # elsewhere a device sync per call; the entry points check their audio before
                check_scale(audio, "MelSpectrogram")  # scipy.io.wavfile's int16 cast to float32 computes without an error
        squeeze = audio.dim() == 1
        if squeeze:
            audio = audio.unsqueeze(0)
        # The STFT runs in fp32 even under autocast: bf16 power spectra lose the quiet bands.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            spec = torch.stft(
                audio.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                window=self.window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            )  # (B, n_fft // 2 + 1, frames)
            power = spec.real.square() + spec.imag.square()
            mel = torch.matmul(self.mel_basis, power)  # (B, n_mels, frames)
            out = torch.log10(1 + self.log_scale * mel)
        if self.normalized:
            out = normalize(out)
        return out.squeeze(0) if squeeze else out
