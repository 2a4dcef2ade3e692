"""A Hugging Face style feature extractor for MAEST: raw 16 kHz audio -> normalised mel ``(B, T, 96)``.

``MAESTFeatureExtractor`` follows the transformers feature-extractor API (``__call__`` returning a
``BatchFeature`` with ``input_values``, ``save_pretrained``/``from_pretrained``) so that a MAEST model
exported with ``models.exchange.hf.export_hf`` runs in ``transformers`` like the published ones. The numbers
are this project's front-end: ``models.mel.MelSpectrogram`` followed by ``models.mel.normalize``.

Layout: ``input_values`` is ``(batch, frames, mel bands)`` as ``ASTForAudioClassification`` wants;
our ``MAEST`` takes ``input_values.transpose(1, 2)``.

Padding is the project's one rule (``models.inference.pad_centre``, SPEC §3), the one training
used for files shorter than a clip: the clip's own mel frames sit in the centre, between zero
(silent) compressed-mel frames, before normalisation; an odd frame goes to the end. So this
extractor plus an exported model give the native pipeline's logits on short audio too (the Hub's
own ``feature_extraction_maest.py`` appends the frames instead, AST's convention). The
configuration keys equal those of the published models' ``preprocessor_config.json``, so their
files load into this class.

Without transformers installed the class still works, on a small local base class with the same
methods; ``__call__`` then returns a plain ``dict``. When this file is saved next to an exported
model it becomes the directory's custom code: ``AutoFeatureExtractor.from_pretrained(dir,
trust_remote_code=True)`` loads it (it imports ``.mel``, saved beside it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .inference import pad_centre
from .mel import (
    DISCOGS_MEAN,
    DISCOGS_STD,
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    RESAMPLE_HINT,
    SAMPLE_RATE,
    MelSpectrogram,
    check_audio,
    check_layout,
    normalize,
)

_logger = logging.getLogger(__name__)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PADDING_STRATEGIES = ("max_length", "longest", "do_not_pad")
DEFAULT_MAX_LENGTH = 1876  # frames of a 30 s clip: the published 30 s models' max_length
PADDING_SIDE = "center"  # the one padding rule (models.inference.pad_centre); saved so the file says so

try:  # transformers is optional: the API is the same without it
    from transformers import BatchFeature, SequenceFeatureExtractor
except ImportError:
    BatchFeature = None
    SequenceFeatureExtractor = None


class _LocalFeatureExtractorBase:
    """The parts of ``transformers.SequenceFeatureExtractor`` used here, for installs without transformers."""

    def __init__(self, feature_size: int, sampling_rate: int, padding_value: float, **kwargs):
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.padding_value = padding_value
        self.padding_side = kwargs.pop("padding_side", "right")
        self.return_attention_mask = kwargs.pop("return_attention_mask", True)
        kwargs.pop("processor_class", None)
        for key, value in kwargs.items():  # e.g. feature_extractor_type, auto_map of a saved file
            setattr(self, key, value)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["feature_extractor_type"] = type(self).__name__
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise NotADirectoryError(f"save_pretrained needs a directory, {save_directory} is a file")
        save_directory.mkdir(parents=True, exist_ok=True)
        path = save_directory / PREPROCESSOR_CONFIG
        path.write_text(self.to_json_string(), encoding="utf-8")
        return [str(path)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            path = path / PREPROCESSOR_CONFIG
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: from_pretrained needs a directory holding {PREPROCESSOR_CONFIG} "
                "(install transformers to load from the Hugging Face Hub)"
            )
        return cls(**{**json.loads(path.read_text(encoding="utf-8")), **kwargs})


_Base = SequenceFeatureExtractor if SequenceFeatureExtractor is not None else _LocalFeatureExtractorBase


class MAESTFeatureExtractor(_Base):
    """Raw mono audio at 16 kHz -> normalised compressed mel ``input_values`` ``(B, max_length, 96)``.

    ``max_length`` is the model's input length in frames: what ``models.exchange.hf.export_hf`` writes, by
    default the model's own clip (312, 625, 1250 or 1875 for the 5, 10, 20 and 30 s models; the
    published models use 316, 626, 1256 and 1876). ``mean``/``std`` are the Discogs statistics of the
    model-input normalisation ``(x - mean) / (2 * std)`` (SPEC §2). Short clips are padded centred
    (module docstring); ``padding_side`` other than ``"center"`` (the Hub files say ``"right"``) is
    not followed, and a log line says so.
    """

    model_input_names = ["input_values"]

    def __init__(
        self,
        feature_size: int = 1,
        sampling_rate: int = SAMPLE_RATE,
        num_mel_bins: int = N_MELS,
        max_length: int = DEFAULT_MAX_LENGTH,
        padding_value: float = 0.0,
        do_normalize: bool = True,
        mean: float = DISCOGS_MEAN,
        std: float = DISCOGS_STD,
        return_attention_mask: bool = False,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        log_compression: str = "logC",
        **kwargs,
    ):
        if log_compression != "logC":
            raise ValueError(
                f"log_compression={log_compression!r} is not supported: MAEST models use 'logC' (log10(1 + 10000 * mel))"
            )
        if max_length < 1:
            raise ValueError(f"max_length must be a positive number of frames, got {max_length}")
        if sampling_rate != SAMPLE_RATE:
            raise ValueError(
                f"sampling_rate={sampling_rate!r}: the MAEST front end is fixed at {SAMPLE_RATE} Hz (SPEC §2); "
                f"keep sampling_rate={SAMPLE_RATE} and {RESAMPLE_HINT}"
            )
        padding_side = kwargs.pop("padding_side", PADDING_SIDE)
        if padding_side != PADDING_SIDE:
            _logger.info(
                "MAESTFeatureExtractor pads short clips centred, as MAEST training did; padding_side=%r is not followed",
                padding_side,
            )
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.padding_side = PADDING_SIDE
        self.num_mel_bins = int(num_mel_bins)
        self.max_length = int(max_length)
        self.do_normalize = bool(do_normalize)
        self.mean = float(mean)
        self.std = float(std)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.log_compression = log_compression
        self._mel = MelSpectrogram(
            sample_rate=self.sampling_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            n_mels=self.num_mel_bins,
            f_max=self.sampling_rate / 2,
        )

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("_mel", None)  # derived from the saved settings, not a setting itself
        return out

    # ------------------------------------------------------------------ input handling
    def _as_waveforms(self, raw_speech) -> list[np.ndarray]:
        """One float32 1-D array per clip, from any of the accepted input forms; each clip passes ``check_audio``."""
        who = type(self).__name__
        if torch.is_tensor(raw_speech):
            raw_speech = raw_speech.detach().cpu().numpy()
        if isinstance(raw_speech, np.ndarray):
            # (samples, channels) would otherwise be read as a batch of `samples` clips: refused before splitting.
            check_layout(raw_speech.shape, who, "mono audio (samples,) or a batch (batch, samples)", name="the input")
            clips = [raw_speech] if raw_speech.ndim == 1 else list(raw_speech)
        elif isinstance(raw_speech, (list, tuple)):
            if len(raw_speech) == 0:
                raise ValueError(f"{type(self).__name__} got an empty list of clips")
            first = raw_speech[0]
            batched = torch.is_tensor(first) or isinstance(first, (np.ndarray, list, tuple))
            clips = list(raw_speech) if batched else [raw_speech]
        else:
            raise TypeError(
                f"{type(self).__name__} expects audio as a numpy array, a torch tensor or a list of them, "
                f"got {type(raw_speech).__name__}"
            )
        out = []
        for i, clip in enumerate(clips):
            if torch.is_tensor(clip):
                clip = clip.detach().cpu().numpy()
            clip = np.asarray(clip)  # its own dtype first: integer PCM is refused, not cast
            check_audio(clip, who, "mono audio (samples,) per clip", name=f"clip {i}", ndims=(1,))
            out.append(clip.astype(np.float32, copy=False))
        return out

    def _n_frames(self, n_samples: int) -> int:
        return 1 + n_samples // self.hop_length  # centred frames (SPEC §2)

    # ------------------------------------------------------------------ features
    def __call__(
        self,
        raw_speech,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
        return_attention_mask: bool | None = None,
        **kwargs,
    ):
        """Audio -> ``{"input_values": (B, frames, num_mel_bins)}`` (and ``attention_mask`` on request).

        ``raw_speech``: one clip (1-D array, list of floats, tensor) or a batch (2-D array, list of
        1-D arrays) of real floating-point samples in [-1, 1]; integer PCM, ``(samples, channels)``
        arrays, empty clips and NaN or inf samples are refused (``models.mel.check_audio``).
        ``sampling_rate`` must equal the extractor's (16000): resample first otherwise.
        ``padding``: ``"max_length"`` (every clip to ``max_length`` frames, what AST needs),
        ``"longest"``/``True`` (to the longest clip of the batch) or ``"do_not_pad"``/``False``;
        a clip's frames are centred in the padded length (``models.inference.pad_centre``).
        ``truncation``: cut clips longer than ``max_length`` frames. ``return_tensors``: ``"pt"``,
        ``"np"`` or ``None`` (a list of arrays).
        """
        if kwargs:
            _logger.debug("ignoring feature-extractor arguments %s", sorted(kwargs))
        if sampling_rate is None:  # as Hugging Face's own extractors do: a silent wrong rate is the likely mistake
            _logger.warning(
                "MAESTFeatureExtractor was called without sampling_rate: pass sampling_rate=%d to confirm the audio's rate "
                "(other rates must be resampled first)", self.sampling_rate)
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio at {sampling_rate} Hz given, but MAEST expects {self.sampling_rate} Hz: resample it first "
                f"(e.g. librosa.resample(y, orig_sr={sampling_rate}, target_sr={self.sampling_rate}))"
            )
        strategy = _padding_strategy(padding)
        max_length = self.max_length if max_length is None else int(max_length)
        return_attention_mask = self.return_attention_mask if return_attention_mask is None else return_attention_mask

        clips = self._as_waveforms(raw_speech)
        if truncation:
            # Frame i is centred on sample i * hop and reaches n_fft // 2 samples to each side: samples past
            # the last kept frame's reach change nothing, so long clips are cut before the STFT.
            keep = (max_length - 1) * self.hop_length + self.n_fft // 2
            clips = [c[:keep] for c in clips]
        lengths = [min(self._n_frames(len(c)), max_length) if truncation else self._n_frames(len(c)) for c in clips]

        batch = torch.zeros(len(clips), max(len(c) for c in clips))
        for i, c in enumerate(clips):
            batch[i, : len(c)] = torch.from_numpy(c)
        with torch.no_grad():
            mel = self._mel(batch).transpose(1, 2)  # (B, frames, n_mels)

        if strategy == "max_length":
            target = max(max_length, *lengths)  # never below a clip's own length (truncation=False)
        else:
            target = max(lengths)
        # Frames past a clip's own end are dropped (they would hold the batch's zero audio), then the clip
        # is zero-padded centred: zero compressed mel = silence, the rule of training and of the native pipeline.
        out = torch.stack([pad_centre(mel[i, :n], target) for i, n in enumerate(lengths)])
        starts = [(target - n) // 2 for n in lengths]  # where each clip's frames begin
        if self.do_normalize:
            out = normalize(out, self.mean, self.std)
        values = out.numpy()

        data = {}
        if strategy == "do_not_pad":
            data["input_values"] = [values[i, s : s + n] for i, (s, n) in enumerate(zip(starts, lengths))]
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(
                    f"clips of different lengths ({sorted(set(lengths))} frames) cannot form one tensor with "
                    "padding='do_not_pad': use padding='max_length' or 'longest', or return_tensors=None"
                )
        else:
            data["input_values"] = values
        if return_attention_mask:
            mask = np.zeros((len(clips), target), dtype=np.int32)
            for i, (s, n) in enumerate(zip(starts, lengths)):
                mask[i, s : s + n] = 1
            data["attention_mask"] = [mask[i, s : s + n] for i, (s, n) in enumerate(zip(starts, lengths))] if strategy == "do_not_pad" else mask
        return _batch_feature(data, return_tensors)


def _padding_strategy(padding) -> str:
    if padding is True:
        return "longest"
    if padding is False or padding is None:
        return "do_not_pad"
    value = getattr(padding, "value", padding)  # transformers' PaddingStrategy enum
    if value not in PADDING_STRATEGIES:
        raise ValueError(f"padding must be one of {PADDING_STRATEGIES} or a bool, got {padding!r}")
    return value


def _batch_feature(data: dict, return_tensors: str | None):
    if return_tensors not in (None, "pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    if BatchFeature is not None:
        return BatchFeature(data, tensor_type=return_tensors)
    if return_tensors == "pt":
        return {k: torch.as_tensor(np.stack(v) if isinstance(v, list) else v) for k, v in data.items()}
    if return_tensors == "np":
        return {k: np.stack(v) if isinstance(v, list) else v for k, v in data.items()}
    return {k: list(v) for k, v in data.items()}


if SequenceFeatureExtractor is not None:
    # save_pretrained then copies this file (and the .mel it imports) beside preprocessor_config.json and
    # records it under "auto_map", so AutoFeatureExtractor(..., trust_remote_code=True) finds the class.
    MAESTFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
