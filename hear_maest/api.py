"""The HEAR 2021 common API for MAEST (https://hearbenchmark.com/hear-api.html).

Choices (options of ``load_model``):

- **block** (default 6, 0-based: the paper's best for downstream tasks, "the 7th block"; the
  last block of a model with fewer blocks, such as the small test models);
- **scene embedding**: per clip of the model's length (``split_into_clips``: consecutive clips,
  the last one aligned to the end, a short sound centre-padded: no audio dropped), the tokens
  ``token`` (default ``"cdt"``: CLS, DIST and the mean of the patch tokens, as ``ex_tl.py``'s
  paper setting) after ``block``, side by side (``combine="concat"``: 3 x 768 = 2304 for ViT-B) or
  averaged (``combine="mean"``: 768); the clips of a sound are averaged;
- **timestamp embedding**: per time column of patches, the mean over frequency of the patch
  tokens after ``block`` (768 for ViT-B), every ``stride_t`` frames = 160 ms, clips stitched on one
  regular grid (``models.encoder.frame_embeddings``) with every time region once.

Embeddings are not normalised (no final LayerNorm), float32, on the audio's device; the network
runs on the model's device (the caller moves the model: ``load_model(...).to("cuda")``, as
``hear-validator`` and hear-eval-kit do), ``batch_size`` clips at a time, without gradients.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from models.encoder import frame_embeddings, frame_times_ms
from models.inference import check_count, split_into_clips
from models.maest import MAEST
from models.mel import SAMPLE_RATE, MelSpectrogram, check_audio, normalize
from models.registry import pretrained_path

from .loading import load_maest

_logger = logging.getLogger(__name__)

DEFAULT_ARCH = "discogs-maest-30s-pw-129e"  # the released 30 s model: load_model("") reads its weights
DEFAULT_BLOCK = 6  # 0-based: the MAEST paper's best block for downstream tasks (its "7th block")
TOKENS = "cdt"  # order of model.embeddings' axis 1: CLS, DIST, mean of the patch tokens (as ex_tl.py's token)
COMBINES = ("concat", "mean")


def token_indices(token: str) -> list[int]:
    """Positions of the named tokens (``"cd"`` -> ``[0, 1]``); ex_tl.py's ``token`` vocabulary."""
    if not isinstance(token, str) or not token or any(ch not in TOKENS for ch in token) or len(set(token)) != len(token):
        raise ValueError(
            f"token={token!r}: use one or more distinct letters of {TOKENS!r} "
            "(c: CLS, d: DIST, t: mean of the patch tokens), e.g. 'c' or 'cdt'"
        )
    return [TOKENS.index(ch) for ch in token]


class HEARMAEST(nn.Module):
    """A MAEST network with the HEAR attributes; always in eval mode (a frozen feature extractor)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: MAEST, block: int | None = None, token: str = "cdt", combine: str = "concat", batch_size: int = 16):
        super().__init__()
        if block is None:  # hear-validator passes only the file: a shallow model gets its last block
            block = min(DEFAULT_BLOCK, model.config.depth - 1)
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"block must be one integer (0-based), got {block!r}: HEAR embeddings come from one block")
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r}: use one of {COMBINES}")
        self.maest = model.eval()
        self.block = model.block_index(block)
        self.token = token
        self.tokens = token_indices(token)
        self.combine = combine
        self.batch_size = check_count("batch_size", batch_size)
        self.mel = MelSpectrogram()  # compressed, un-normalised: clips are padded with silence, then normalised
        d = model.embed_dim
        self.scene_embedding_size = int(len(self.tokens) * d if combine == "concat" else d)
        self.timestamp_embedding_size = int(d)
        self.train(False)

    def train(self, mode: bool = True) -> "HEARMAEST":
        return super().train(False)  # dropout and patchout stay off: the embeddings are deterministic

    @property
    def device(self) -> torch.device:
        return next(self.maest.parameters()).device

    def extra_repr(self) -> str:
        return (f"block={self.block}, token={self.token!r}, combine={self.combine!r}, scene_embedding_size="
                f"{self.scene_embedding_size}, timestamp_embedding_size={self.timestamp_embedding_size}")


def load_model(
    model_file_path: str = "",
    arch: str | None = None,
    block: int | None = None,
    token: str = "cdt",
    combine: str = "concat",
    batch_size: int = 16,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    weights_directory: str | os.PathLike | None = None,
    checkpoint_swa_weights: bool | None = None,
    trust_checkpoint: bool = False,
    **overrides,
) -> HEARMAEST:
    """The HEAR model: a MAEST checkpoint (any file ``get_maest`` reads, or a Hugging Face directory).

    ``model_file_path``: a checkpoint; its architecture comes from the file (this project's record,
    else the weights' shapes; ``arch=`` names it when neither tells). Empty: the released
    ``discogs-maest-30s-pw-129e`` from the weights directory (``weights_directory``, else
    ``$MAEST_WEIGHTS_DIR``, else ``<project>/weights``); a missing file is an error saying which
    file to put where. ``block``: 0-based, default 6 (the last block of a shallower model);
    ``token``/``combine``: see the module docstring. ``batch_size``:
    clips per forward pass. ``precision``: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA:
    pass ``device="cuda"``), applied with ``models.precision.prepare_for_inference``; embeddings
    are returned as float32 either way. ``device``: where to put the model (default: stays on the
    CPU; the caller moves it). ``overrides``: ``MAESTConfig`` fields (``input_t=``, ``n_classes=``).
    """
    if model_file_path:
        model = load_maest(model_file_path, arch, checkpoint_swa_weights, trust_checkpoint, **overrides)
    else:
        path = pretrained_path(arch or DEFAULT_ARCH, weights_directory)  # the error names the file and the URL
        model = load_maest(path, arch or DEFAULT_ARCH, checkpoint_swa_weights, trust_checkpoint, **overrides)
    if device is not None:
        model.to(device)
    if precision != "fp32":
        from models.precision import prepare_for_inference

        prepare_for_inference(model, precision)
    hear = HEARMAEST(model, block=block, token=token, combine=combine, batch_size=batch_size)
    _logger.info("HEAR MAEST model: %s", hear.extra_repr())
    return hear.to(model.cls_token.device)


def _check(audio, model) -> torch.Tensor:
    if not isinstance(model, HEARMAEST):
        raise TypeError(f"model must come from hear_maest.load_model, got {type(model).__name__}")
    if not torch.is_tensor(audio):
        raise ValueError(f"audio must be a tensor (n_sounds, n_samples) of 16 kHz mono sounds, got {type(audio).__name__}")
    # models.mel.check_audio: the rule of every waveform entry point (a NaN is named by its sound)
    check_audio(audio, "hear_maest", "audio (n_sounds, n_samples) of 16 kHz mono sounds, at least one of each", rows="sound", ndims=(2,))
    return model.mel.to(model.device)(audio.to(model.device))  # (n_sounds, n_mels, frames), compressed


def get_scene_embeddings(audio: torch.Tensor, model: HEARMAEST) -> torch.Tensor:
    """``audio`` ``(n_sounds, n_samples)`` at 16 kHz -> ``(n_sounds, model.scene_embedding_size)`` float32.

    Each sound is cut into clips of the model's length with no audio dropped (``split_into_clips``);
    the chosen tokens of each clip after ``model.block`` are averaged over the sound's clips.
    """
    with torch.no_grad():
        mels = _check(audio, model)
        n_frames = model.maest.config.input_t
        clips = torch.stack([split_into_clips(m, n_frames) for m in mels])  # (n_sounds, n_clips, n_mels, n_frames)
        flat = normalize(clips.flatten(0, 1))
        emb = torch.cat([
            model.maest.embeddings(flat[i : i + model.batch_size], model.block)[:, model.tokens]
            for i in range(0, flat.shape[0], model.batch_size)
        ]).float()  # (n_sounds * n_clips, n_tokens, D)
        emb = emb.flatten(1) if model.combine == "concat" else emb.mean(dim=1)
        return emb.unflatten(0, clips.shape[:2]).mean(dim=1).to(audio.device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HEARMAEST) -> tuple[torch.Tensor, torch.Tensor]:
    """``audio`` ``(n_sounds, n_samples)`` -> ``(embeddings (n_sounds, n, D), timestamps_ms (n_sounds, n))``, float32.

    One embedding per time column of patches (160 ms apart for the released models), the mean
    over frequency of the patch tokens after ``model.block``, every time region once; the
    timestamps are the columns' centres in milliseconds from the first sample, the same for every
    sound of the batch (all sounds of a batch have one length).
    """
    with torch.no_grad():
        mels = _check(audio, model)
        values, times = frame_embeddings(model.maest, mels, model.block, model.batch_size)
        stamps = torch.as_tensor(times, dtype=torch.float32, device=audio.device).expand(audio.shape[0], -1)
        return values.float().to(audio.device), stamps.contiguous()


def timestamps_ms(n_samples: int, model: HEARMAEST) -> torch.Tensor:
    """The timestamps (ms, float64) ``get_timestamp_embeddings`` gives a sound of ``n_samples``, without running the network."""
    return torch.as_tensor(frame_times_ms(model.maest, model.mel.n_frames(check_count("n_samples", n_samples))))
