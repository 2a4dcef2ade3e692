"""Cutting long inputs into model-sized clips and aggregating clip outputs per track (SPEC §3, §6).

Clips start at ``0, hop, 2 * hop, ...``; when the last one stops short of the end, one more
clip is aligned to the end, so no frame is dropped and every clip has the model's length. A
track shorter than a clip is zero-padded (silence, before normalisation) around its centre,
as in training. Outputs are averaged over the clips of one track, never across tracks.

``pad_centre`` is the project's one padding rule: training crops (``helpers.data``), test,
extraction and ``predict`` (``split_into_clips``), ``MAESTFeatureExtractor`` and the ONNX audio
graph (``models.exchange.onnx``, which traces the same arithmetic) all pad this way, so a short file
gets the same logits on every path. It is the rule training used for files shorter than a clip
(SPEC §3), applied to the mel of the whole file (``1 + samples // 256`` frames), not to the audio:
padding the audio would shift the frame grid and add partly silent frames.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from .mel import HOP_LENGTH, SAMPLE_RATE, MelSpectrogram, check_audio, normalize


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum``; anything else (a float, a bool, text) is a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def clip_starts(total_frames: int, clip_frames: int, hop_frames: int) -> np.ndarray:
    """Start frames of the clips that cover ``total_frames`` with no frame dropped.

    ``clip_starts(25, 10, 10) -> [0, 10, 15]``; a file no longer than a clip gives ``[0]``.
    """
    if total_frames < 1 or clip_frames < 1 or hop_frames < 1:
        raise ValueError(
            f"clip_starts needs positive sizes, got total_frames={total_frames}, "
            f"clip_frames={clip_frames}, hop_frames={hop_frames}"
        )
    if hop_frames > clip_frames:
        raise ValueError(
            f"clip_starts got hop_frames={hop_frames} longer than clip_frames={clip_frames}: the frames between "
            "clips would be dropped; use a hop of at most one clip"
        )
    if total_frames <= clip_frames:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, total_frames - clip_frames + 1, hop_frames, dtype=np.int64)
    if starts[-1] + clip_frames < total_frames:
        starts = np.append(starts, total_frames - clip_frames)
    return starts


def pad_centre(mel, n_frames: int):
    """Zero-pad a ``(frames, ...)`` array or tensor to ``n_frames`` frames, signal in the centre.

    The extra frame of an odd padding goes to the end, as upstream MAEST does.
    """
    frames = mel.shape[0]
    if frames > n_frames:
        raise ValueError(f"pad_centre got {frames} frames, more than the {n_frames} to pad to: crop it first")
    if frames == n_frames:
        return mel
    before = (n_frames - frames) // 2
    shape = (n_frames,) + tuple(mel.shape[1:])
    out = mel.new_zeros(shape) if torch.is_tensor(mel) else np.zeros(shape, dtype=mel.dtype)
    out[before : before + frames] = mel
    return out


def split_into_clips(mel: torch.Tensor, n_frames: int, hop_frames: int | None = None) -> torch.Tensor:
    """A compressed mel ``(n_mels, T)`` -> clips ``(n_clips, n_mels, n_frames)`` covering all of it.

    ``hop_frames``: frames from one clip's start to the next, 1 to ``n_frames``; None: ``n_frames``
    (consecutive clips). Any other value (0, negative, longer than a clip) is a ValueError, whatever
    the mel's length.
    """
    if mel.dim() != 2:
        raise ValueError(f"split_into_clips expects one mel (n_mels, frames), got shape {tuple(mel.shape)}")
    n_frames = check_count("n_frames", n_frames)
    if hop_frames is None:
        hop_frames = n_frames
    elif isinstance(hop_frames, bool) or not isinstance(hop_frames, numbers.Integral) or not 1 <= hop_frames <= n_frames:
        raise ValueError(
            f"split_into_clips: hop_frames must be an integer from 1 to n_frames={n_frames} (a longer hop would drop "
            f"the frames between clips), or None for consecutive clips; got {hop_frames!r}"
        )
    T = mel.shape[1]
    if T <= n_frames:
        return pad_centre(mel.T, n_frames).T.unsqueeze(0)
    starts = torch.as_tensor(clip_starts(T, n_frames, hop_frames), device=mel.device)
    index = starts[:, None] + torch.arange(n_frames, device=mel.device)  # (n_clips, n_frames)
    return mel[:, index].permute(1, 0, 2)  # (n_clips, n_mels, n_frames)


@torch.no_grad()
def track_probabilities(
    model: torch.nn.Module,
    audios: list[torch.Tensor],
    n_frames: int,
    hop_frames: int | None = None,
    batch_size: int = 16,
    mel: MelSpectrogram | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Mean sigmoid probabilities ``(n_classes,)`` per track for 16 kHz mono audio (tensors or numpy arrays).

    Each track is cut into clips of ``n_frames`` every ``hop_frames`` (None: ``n_frames``, as
    ``split_into_clips``); all clips of all tracks run in shared batches and their probabilities
    are averaged per track. ``mel`` must give compressed, un-normalised
    mels (the default); the model-input normalisation is applied here. Each track must pass
    ``models.mel.check_audio`` (real floating-point, 1-D, not empty, finite); errors name the track.
    """
    batch_size = check_count("batch_size", batch_size)
    if torch.is_tensor(audios) or isinstance(audios, np.ndarray):
        raise TypeError(
            f"track_probabilities takes a list of tracks, got one {type(audios).__name__} of shape {tuple(audios.shape)}: "
            "pass [audio] for one track, or list(batch) for a (tracks, samples) batch"
        )
    if not audios:
        return []
    if mel is None:
        mel = MelSpectrogram()
    elif mel.normalized:
        raise ValueError(
            "track_probabilities normalises the mels itself: pass a MelSpectrogram(normalized=False), "
            "or none for the default front-end"
        )
    device = next(model.parameters()).device
    mel = mel.to(device)
    clips, owners = [], []
    for i, audio in enumerate(audios):
        if isinstance(audio, np.ndarray):
            audio = torch.from_numpy(np.ascontiguousarray(audio))
        elif not torch.is_tensor(audio):
            raise TypeError(f"track_probabilities expects each track as a torch.Tensor or numpy array; track {i} is a {type(audio).__name__}")
        check_audio(audio, "track_probabilities", "mono 16 kHz audio (samples,) per track", name=f"track {i}", ndims=(1,))
        m = split_into_clips(mel(audio.to(device).float()), n_frames, hop_frames)
        clips.append(normalize(m))
        owners += [i] * m.shape[0]
    clips = torch.cat(clips)
    owner = torch.as_tensor(owners, device=device)
    probs = []
    for start in range(0, clips.shape[0], batch_size):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            probs.append(torch.sigmoid(model(clips[start : start + batch_size]).float()))
    probs = torch.cat(probs)
    sums = torch.zeros(len(audios), probs.shape[1], device=device).index_add_(0, owner, probs)
    counts = torch.bincount(owner, minlength=len(audios)).clamp(min=1).unsqueeze(1)
    return list((sums / counts).cpu())


def stitch_columns(columns, starts, clip_times_ms, total_frames: int, n_frames: int):
    """Frame-level outputs of a track's clips -> every time region of the track once.

    ``columns``: ``(n_clips, ..., T', D)`` array or tensor (e.g. ``MAEST.timestamp_embeddings`` of the
    clips of ``split_into_clips``); ``starts``: the clips' first frames (``clip_starts``);
    ``clip_times_ms``: ``(T',)`` centre of each column from its clip's start
    (``MAEST.column_times_ms(n_frames)``). Returns ``(values (..., n, D), times_ms (n,))``, times
    from the track's first frame, increasing.

    Where clips overlap, each column comes from the clip in which it lies nearer the centre: the
    boundary between clips ``k`` and ``k + 1`` is the middle of their overlap (the start of ``k + 1``
    when they only touch). A track shorter than a clip was padded around its centre (``pad_centre``):
    columns centred on the padding are dropped, keeping at least the one nearest the signal.
    """
    starts = np.asarray(starts, dtype=np.float64).reshape(-1)
    clip_times = np.asarray(clip_times_ms.cpu() if torch.is_tensor(clip_times_ms) else clip_times_ms, dtype=np.float64)
    n_clips, n_cols = columns.shape[0], columns.shape[-2]
    if starts.shape[0] != n_clips or clip_times.shape != (n_cols,):
        raise ValueError(
            f"stitch_columns got {n_clips} clips of {n_cols} columns, {starts.shape[0]} starts and "
            f"{clip_times.shape[0]} column times: pass one start per clip and one time per column"
        )
    frame_ms = 1000.0 * HOP_LENGTH / SAMPLE_RATE
    if total_frames <= n_frames:  # one centre-padded clip
        before = (n_frames - total_frames) // 2
        times = clip_times - before * frame_ms
        keep = np.flatnonzero((times >= 0) & (times <= (total_frames - 1) * frame_ms))
        if keep.size == 0:
            keep = np.array([np.argmin(np.abs(times - (total_frames - 1) * frame_ms / 2))])
        clip_index, col_index, times = np.zeros_like(keep), keep, np.clip(times[keep], 0, (total_frames - 1) * frame_ms)
    else:
        times = starts[:, None] * frame_ms + clip_times[None, :]  # (n_clips, T')
        ends = starts + n_frames
        bounds = (starts[1:] + ends[:-1]) / 2 * frame_ms  # middle of each overlap
        low = np.concatenate(([-np.inf], bounds))[:, None]
        high = np.concatenate((bounds, [np.inf]))[:, None]
        clip_index, col_index = np.nonzero((times >= low) & (times < high))  # clip-major, columns in order
        times = times[clip_index, col_index]
    if torch.is_tensor(columns):
        values = columns[torch.as_tensor(clip_index), ..., torch.as_tensor(col_index), :].movedim(0, -2)
    else:
        values = np.moveaxis(columns[clip_index, ..., col_index, :], 0, -2)
    return values, times
