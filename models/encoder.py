"""Frame-level MAEST outputs of whole waveforms on one regular time grid, and a MARBLE-style encoder.

``MAEST.timestamp_embeddings`` gives one embedding per time column of patches (every ``stride_t``
frames: 160 ms). Over a track longer than a clip, the clips are laid on that column grid: clip
``k + 1`` starts where clip ``k``'s columns end (``stride_t * columns`` frames later, so
consecutive clips overlap by ``n_frames - stride_t * columns`` frames, 15 for the 30 s model),
and the last clip starts at the first grid position from which it reaches the end, the few frames
it runs past the end zero-padded (silence, as ``pad_centre``). ``stitch_columns`` then takes every
column once, from the clip where it is most central, so the times step by exactly
``stride_t * 16`` ms across clip boundaries: HEAR requires regular timestamps, which the
end-aligned clips of ``split_into_clips`` (a start anywhere) would break at the last boundary.
A track no longer than a clip is one centre-padded clip, as everywhere in the project.

``MAESTEncoder`` is the MARBLE-style wrapper: waveforms ``(B, samples)`` at 16 kHz ->
``(B, n_layers, T, D)``, the frame-level outputs of every block from one pass per clip.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .inference import check_count, pad_centre, stitch_columns
from .maest import MAEST
from .mel import HOP_LENGTH, SAMPLE_RATE, MelSpectrogram, check_audio, normalize

FRAME_MS = 1000.0 * HOP_LENGTH / SAMPLE_RATE  # 16 ms between mel frames


def grid_clip_starts(total_frames: int, n_frames: int, stride_t: int, n_columns: int) -> tuple[np.ndarray, int]:
    """Start frames of the clips of a ``total_frames`` track on the column grid, and the padded length.

    Returns ``(starts, padded_frames)``: the track, zero-padded at the end to ``padded_frames``
    (at most ``stride_t - 1`` frames more), is covered by clips of ``n_frames`` at ``starts``, all
    multiples of ``stride_t``, each no more than ``stride_t * n_columns`` after the previous one,
    so their columns fall on one grid and leave none of it out. A track no longer than a clip is
    one clip (``[0]``, ``total_frames``: centre-padded by ``pad_centre``).
    ``grid_clip_starts(126, 62, 10, 5) -> ([0, 50, 70], 132)``.
    """
    for name, value in (("total_frames", total_frames), ("n_frames", n_frames), ("stride_t", stride_t), ("n_columns", n_columns)):
        check_count(name, value)
    if total_frames <= n_frames:
        return np.zeros(1, dtype=np.int64), int(total_frames)
    hop = stride_t * n_columns
    if hop > n_frames:
        raise ValueError(f"grid_clip_starts: {n_columns} columns of {stride_t} frames span more than the {n_frames}-frame clip")
    starts = np.arange(0, total_frames - n_frames + 1, hop, dtype=np.int64)
    if starts[-1] + n_frames < total_frames:
        last = -(-(total_frames - n_frames) // stride_t) * stride_t  # first grid start that reaches the end
        starts = np.append(starts, last)
    return starts, int(starts[-1] + n_frames)


def check_time_grid(model: MAEST) -> None:
    cfg = model.config
    if cfg.s_patchout_t_indices or cfg.s_patchout_t_interleaved:
        raise ValueError(
            "frame-level embeddings on a regular grid need every time column: this model drops time columns "
            f"(s_patchout_t_indices={cfg.s_patchout_t_indices}, s_patchout_t_interleaved={cfg.s_patchout_t_interleaved}); "
            "call model.set_inference_patchout() with no time patchout"
        )


def _plan(model: MAEST, total_frames: int, hop_columns: int | None = None) -> tuple[np.ndarray, int, int]:
    """(starts, padded frames, clip frames) of a ``total_frames`` track, clips ``hop_columns`` columns apart."""
    check_time_grid(model)
    cfg = model.config
    n_frames = cfg.input_t  # the model's clip
    n_columns = cfg.patches(n_frames)[1]
    hop_columns = n_columns if hop_columns is None else check_count("hop_columns", hop_columns)
    starts, padded = grid_clip_starts(total_frames, n_frames, cfg.stride_t, min(hop_columns, n_columns))
    return starts, padded, n_frames


def stitch_on_grid(model: MAEST, columns, starts: np.ndarray, padded: int, total_frames: int, n_frames: int):
    """``stitch_columns`` for clips at ``grid_clip_starts``: columns centred on the end padding are dropped.

    ``columns``: ``(n_clips, ..., T', D)`` (``MAEST.timestamp_embeddings`` of the clips of the track
    zero-padded to ``padded`` frames); returns ``(values (..., n, D), times_ms (n,))``.
    """
    values, times = stitch_columns(columns, starts, model.column_times_ms(n_frames), padded, n_frames)
    if padded > total_frames:  # multi-clip track, end-padded: keep the columns centred on the signal
        keep = np.flatnonzero(times <= (total_frames - 1) * FRAME_MS)
        values, times = values[..., keep, :], times[keep]
    return values, times


def frame_times_ms(model: MAEST, total_frames: int, hop_columns: int | None = None) -> np.ndarray:
    """Centre times (ms, float64) of the frame-level embeddings of a ``total_frames`` track (no forward pass)."""
    starts, padded, n_frames = _plan(model, check_count("total_frames", total_frames), hop_columns)
    n_columns = model.config.patches(n_frames)[1]
    dummy = np.zeros((len(starts), n_columns, 1), dtype=np.float32)
    return stitch_on_grid(model, dummy, starts, padded, total_frames, n_frames)[1]


def frame_embeddings(
    model: MAEST, mels: torch.Tensor, block: int | list[int] | str = 6, batch_size: int = 16, hop_columns: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Compressed (not normalised) mels ``(B, n_mels, T)`` of equal-length tracks -> frame-level embeddings.

    Returns ``(values, times_ms)``: ``values`` ``(B, n, D)`` for an int ``block``, ``(B, n_blocks, n, D)``
    for a list or ``"all"`` (one forward pass per clip); ``times_ms`` ``(n,)`` float64, the centre
    of each embedding from the track's first frame, regular (``stride_t * 16`` ms apart). The clips
    of all tracks run through the model ``batch_size`` at a time. Gradients flow when enabled.
    ``hop_columns``: clips start this many time columns apart (default: a clip's columns, so clips
    overlap by less than a column; half of them gives half-overlapping clips).
    """
    batch_size = check_count("batch_size", batch_size)
    if mels.dim() != 3:
        raise ValueError(f"frame_embeddings expects compressed mels (B, n_mels, frames), got shape {tuple(mels.shape)}")
    B, _, total = mels.shape
    starts, padded, n_frames = _plan(model, total, hop_columns)
    if len(starts) == 1:  # a track no longer than a clip: centre-padded, as in training
        clips = pad_centre(mels.permute(2, 0, 1), n_frames).permute(1, 2, 0).unsqueeze(1)  # (B, 1, n_mels, n_frames)
    else:
        mels = F.pad(mels, (0, padded - total))  # zero = silence in the compressed mel
        index = torch.as_tensor(starts, device=mels.device)[:, None] + torch.arange(n_frames, device=mels.device)
        clips = mels[:, :, index].transpose(1, 2)  # (B, n_clips, n_mels, n_frames)
    flat = normalize(clips.flatten(0, 1))  # clip-major per track: (B * n_clips, n_mels, n_frames)
    out = torch.cat([model.timestamp_embeddings(flat[i : i + batch_size], block) for i in range(0, flat.shape[0], batch_size)])
    columns = out.unflatten(0, (B, len(starts))).movedim(1, 0)  # (n_clips, B, [n_blocks,] T', D)
    return stitch_on_grid(model, columns, starts, padded, total, n_frames)


class MAESTEncoder(nn.Module):
    """MARBLE-style encoder: waveforms ``(B, samples)`` at 16 kHz -> ``(B, n_layers, T, D)``.

    The frame-level outputs (per time column, mean over frequency of the patch tokens, not
    normalised) after each block of ``block`` (default ``"all"``: ``n_layers = depth``, block
    ``i`` at index ``i``; no input-embedding layer), from one forward pass per clip, clips stitched
    on a regular 160 ms grid (``frame_embeddings``). ``times_ms(n_samples)`` gives the centre of
    each of the ``T`` frames; ``forward_with_times`` returns both. The tracks of a batch have the
    same length (pad them first, as MARBLE's data loaders do). The waveforms must pass
    ``models.mel.check_audio`` (real floating-point, mono, finite); errors name the waveform.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model: MAEST, block: int | list[int] | str = "all", batch_size: int = 16):
        super().__init__()
        if not isinstance(model, MAEST):
            raise TypeError(f"MAESTEncoder wraps a models.MAEST (get_maest(...)), got {type(model).__name__}")
        check_time_grid(model)
        self.model = model
        self.blocks = model.block_indices(block)
        self.batch_size = check_count("batch_size", batch_size)
        self.mel = MelSpectrogram()

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def times_ms(self, n_samples: int) -> np.ndarray:
        """Centre (ms from the first sample) of each output frame of an ``n_samples`` waveform."""
        return frame_times_ms(self.model, self.mel.n_frames(check_count("n_samples", n_samples)))

    def forward_with_times(self, waveforms: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        if not torch.is_tensor(waveforms):
            raise TypeError(f"MAESTEncoder expects a torch.Tensor of waveforms (B, samples) at 16 kHz, got {type(waveforms).__name__}")
        check_audio(waveforms, "MAESTEncoder", "waveforms (B, samples) at 16 kHz", name="the batch", rows="waveform", ndims=(2,))
        device = next(self.model.parameters()).device
        mels = self.mel.to(device)(waveforms.to(device))
        return frame_embeddings(self.model, mels, self.blocks, self.batch_size)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.forward_with_times(waveforms)[0]
