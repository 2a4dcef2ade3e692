"""The MAEST mel front-end as a batched torch module (SPEC §2).

Matches the published models' Essentia front-end: 16 kHz mono, 512-sample Hann frames with a
256-sample hop, centred with zero padding, power spectrum, 96 Slaney mel bands from 0 to 8 kHz
with unit-area normalisation, compressed with ``log10(1 + 10000 * mel)``. The filterbank comes
from librosa so the numbers equal ``librosa.feature.melspectrogram`` with the same settings.
No torchaudio: it has no CPU build next to every torch.
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


def normalize(mel: torch.Tensor | np.ndarray, mean: float = DISCOGS_MEAN, std: float = DISCOGS_STD):
    """Model input normalisation of compressed mels (works on tensors and arrays)."""
    return (mel - mean) / (2 * std)


class MelSpectrogram(nn.Module):
    """Audio ``(B, samples)`` or ``(samples,)`` at 16 kHz -> compressed mel ``(B, n_mels, frames)``.

    ``frames = 1 + samples // hop_length`` (centred frames). Set ``normalized=True`` to also apply
    the model-input normalisation, giving exactly what ``MAEST.forward`` expects.
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
        squeeze = audio.dim() == 1
        if squeeze:
            audio = audio.unsqueeze(0)
        if audio.dim() != 2:
            raise ValueError(
                f"MelSpectrogram expects audio of shape (samples,) or (batch, samples), got {tuple(audio.shape)}; "
                "mix multi-channel audio down to mono first"
            )
        if audio.shape[-1] == 0:
            raise ValueError("MelSpectrogram got empty audio (0 samples)")
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
