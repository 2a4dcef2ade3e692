"""Batch augmentations for training: SpecAugment-style masking, mixup and time rolling.

Each takes a normalised batch ``x (B, 1, n_mels, n_frames)`` and draws its randomness on
``x.device`` with vectorised ops (no loop over the batch). They are training-only: the
Lightning module calls them in ``training_step`` and never in evaluation.
"""

from __future__ import annotations

import numbers

import torch


def _band_mask(batch: int, size: int, n_masks: int, mask_param: int, device, generator) -> torch.Tensor:
    """``(batch, size)`` bool: the union of ``n_masks`` bands per sample, torchaudio's draw.

    As ``torchaudio.functional.mask_along_axis``: ``value = U * mask_param``, the band is
    ``floor(value)`` wide (0 to ``mask_param - 1``) and starts at ``floor(U * (size - value))``;
    drawn for all samples and masks at once.
    """
    if n_masks == 0 or mask_param < 1:
        return torch.zeros(batch, size, dtype=torch.bool, device=device)
    shape = (batch, n_masks)
    value = torch.rand(shape, device=device, generator=generator) * mask_param
    start = (torch.rand(shape, device=device, generator=generator) * (size - value)).long()
    end = start + value.long()
    pos = torch.arange(size, device=device)  # (size,)
    inside = (pos >= start[..., None]) & (pos < end[..., None])  # (batch, n_masks, size)
    return inside.any(dim=1)


def spec_mask(
    x: torch.Tensor,
    n_time_masks: int = 20,
    max_time_width: int = 8,
    n_freq_masks: int = 8,
    max_freq_width: int = 5,
    p: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SpecAugment masking of ``x (B, 1, F, T)`` with 0 (the normalised mean), as upstream configured it.

    Upstream MAEST's ``SpecMasking`` applies ``n_time_masks`` times torchaudio's
    ``TimeMasking(time_mask_param=max_time_width, p=p, iid_masks=True)`` and ``n_freq_masks`` times
    ``FrequencyMasking(freq_mask_param=max_freq_width, iid_masks=True)`` to every sample: each
    time band is 0 to ``max_time_width - 1`` frames wide, and at most ``int(p * T)`` frames when
    ``p < 1`` (torchaudio's ``p`` is a proportion of the frames, not a probability: at 0.2 it
    binds only below 40 frames); each frequency band is 0 to ``max_freq_width - 1`` bins wide.
    Bands are drawn independently per sample. Returns a new tensor; ``x`` is not modified.
    (Upstream discarded the result, so its released models trained without masking.)
    """
    if x.dim() != 4:
        raise ValueError(f"spec_mask expects a batch (B, 1, n_mels, n_frames), got shape {tuple(x.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"spec_mask p (the largest fraction of the frames a time mask covers) must be in [0, 1], got {p}")
    batch, _, n_freq, n_time = x.shape
    time_param = max_time_width if p == 1.0 else min(max_time_width, int(n_time * p))  # torchaudio's _get_mask_param
    time = _band_mask(batch, n_time, n_time_masks, time_param, x.device, generator)  # (B, T)
    freq = _band_mask(batch, n_freq, n_freq_masks, max_freq_width, x.device, generator)  # (B, F)
    mask = time[:, None, None, :] | freq[:, None, :, None]  # (B, 1, F, T)
    return x.masked_fill(mask, 0.0)


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float = 0.3, *extra_targets: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Mix every sample with a random partner of the batch: ``lam * a + (1 - lam) * b``.

    ``lam ~ Beta(alpha, alpha)`` per sample, folded to ``max(lam, 1 - lam)`` so the sample keeps
    most of its own content (as upstream MAEST). The same ``lam`` and partner mix ``x``, ``y``
    and every extra target (e.g. teacher targets): ``mixup(x, y, 0.3, y_teacher)``. Returns
    ``(x_mixed, y_mixed, *extra_mixed)``; multi-hot targets stay in [0, 1].
    """
    if not isinstance(alpha, numbers.Real) or alpha <= 0:
        raise TypeError(
            f"mixup alpha must be a positive number, got {alpha!r}; pass extra targets after it: "
            "mixup(x, y, alpha, y_teacher)"
        )
    batch = x.shape[0]
    for t in (y, *extra_targets):
        if t.shape[0] != batch:
            raise ValueError(f"mixup: a target has batch size {t.shape[0]} but x has {batch}")
    concentration = torch.full((batch,), float(alpha), device=x.device)
    lam = torch.distributions.Beta(concentration, concentration).sample()  # (B,)
    lam = torch.maximum(lam, 1.0 - lam)
    partner = torch.randperm(batch, device=x.device)

    def mix(t: torch.Tensor) -> torch.Tensor:
        lam_t = lam.to(t.dtype).view((batch,) + (1,) * (t.dim() - 1))
        return lam_t * t + (1.0 - lam_t) * t[partner]

    return (mix(x), mix(y), *(mix(t) for t in extra_targets))


def roll(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Circularly shift every sample of ``x (B, ..., T)`` along time by its own random shift in
    ``[-max_shift, max_shift]`` frames (upstream MAEST's roll augmentation, vectorised)."""
    if max_shift < 0:
        raise ValueError(f"roll max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return x
    batch, n_time = x.shape[0], x.shape[-1]
    shift = torch.randint(-max_shift, max_shift + 1, (batch,), device=x.device, generator=generator)  # (B,)
    source = (torch.arange(n_time, device=x.device) - shift[:, None]) % n_time  # (B, T)
    source = source.view((batch,) + (1,) * (x.dim() - 2) + (n_time,)).expand_as(x)
    return x.gather(-1, source)
