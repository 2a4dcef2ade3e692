import pytest
import torch

from helpers.augment import mixup, roll, spec_mask


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, n = [], 0
    for v in mask.tolist() + [False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_spec_mask_input_is_untouched_and_p0_leaves_only_frequency_masks():
    x = torch.randn(4, 1, 12, 30) + 10  # no natural zeros
    before = x.clone()
    out = spec_mask(x, p=1.0)
    assert torch.equal(x, before) and not torch.equal(out, x)
    # torchaudio's p caps the time masks at int(p * frames) frames; upstream gave frequency masks no p.
    zero = spec_mask(x, p=0.0, generator=torch.Generator().manual_seed(0))[:, 0] == 0
    assert zero.any() and torch.equal(zero, zero.all(dim=2, keepdim=True).expand_as(zero))  # whole frequency rows only
    assert torch.equal(spec_mask(x, p=0.0, n_freq_masks=0), x)


def test_spec_mask_masks_whole_bands_with_zero():
    x = torch.randn(64, 1, 12, 40) + 10  # no natural zeros
    out = spec_mask(x, n_time_masks=2, max_time_width=4, n_freq_masks=1, max_freq_width=3, p=1.0,
                    generator=torch.Generator().manual_seed(0))
    zero = out[:, 0] == 0  # (B, F, T)
    torch.testing.assert_close(out[~zero[:, None]], x[~zero[:, None]])
    cols = zero.all(dim=1)  # (B, T): masked time frames
    rows = zero.all(dim=2)  # (B, F): masked bins
    assert torch.equal(zero, cols[:, None, :] | rows[:, :, None])  # only whole bands
    for b in range(64):
        time_runs, freq_runs = _runs(cols[b]), _runs(rows[b])
        assert len(time_runs) <= 2 and all(r <= 6 for r in time_runs)  # two bands of <= 3 may touch
        assert len(freq_runs) <= 1 and all(r <= 2 for r in freq_runs)
    assert cols.any(dim=1).float().mean() > 0.5 and rows.any(dim=1).float().mean() > 0.5


def test_spec_mask_widths_follow_torchaudio():
    # torchaudio: width floor(U * mask_param), uniform in 0..mask_param-1, every mask applied.
    x = torch.ones(4000, 1, 4, 50)
    out = spec_mask(x, n_time_masks=1, max_time_width=4, n_freq_masks=0, p=1.0,
                    generator=torch.Generator().manual_seed(1))
    widths = (out[:, 0, 0] == 0).sum(dim=1)  # (B,)
    counts = torch.bincount(widths, minlength=5).float() / len(widths)
    assert counts[4] == 0 and torch.allclose(counts[:4], torch.full((4,), 0.25), atol=0.03)
    # p = 0.1 of 50 frames caps the width parameter at 5: widths 0..4 instead of 0..7.
    capped = spec_mask(torch.ones(2000, 1, 4, 50), n_time_masks=1, max_time_width=8, n_freq_masks=0, p=0.1,
                       generator=torch.Generator().manual_seed(2))
    assert (capped[:, 0, 0] == 0).sum(dim=1).max().item() == 4
    with pytest.raises(ValueError, match=r"spec_mask p .* must be in \[0, 1\]"):
        spec_mask(x, p=1.5)


def test_spec_mask_is_reproducible_with_a_generator():
    x = torch.randn(8, 1, 12, 30)
    a = spec_mask(x, p=0.5, generator=torch.Generator().manual_seed(7))
    b = spec_mask(x, p=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\(B, 1, n_mels, n_frames\)"):
        spec_mask(x[0])


def test_mixup_is_convex_with_one_lambda_for_every_target():
    torch.manual_seed(0)
    batch = 16
    x = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 1, 3, 5).contiguous()
    y = torch.eye(batch)
    y_teacher = torch.eye(batch).roll(1, dims=1)
    xm, ym, tm = mixup(x, y, 0.3, y_teacher)
    assert xm.shape == x.shape and ym.shape == y.shape and tm.shape == y_teacher.shape
    assert ((ym >= 0) & (ym <= 1)).all() and ((tm >= 0) & (tm <= 1)).all()
    torch.testing.assert_close(ym.sum(1), torch.ones(batch))
    lam = ym.diagonal()  # own share of each sample
    partner = torch.where(lam < 1, (ym - torch.diag(lam)).argmax(1), torch.arange(batch))
    assert (lam >= 0.5).all() and (lam < 1).any()
    torch.testing.assert_close(tm, lam[:, None] * y_teacher + (1 - lam[:, None]) * y_teacher[partner])
    torch.testing.assert_close(xm[:, 0, 0, 0], lam * torch.arange(batch) + (1 - lam) * partner.float())


def test_mixup_without_extra_targets_and_bad_alpha():
    x, y = torch.randn(4, 1, 2, 3), torch.randint(0, 2, (4, 5)).float()
    out = mixup(x, y)
    assert len(out) == 2 and out[1].min() >= 0 and out[1].max() <= 1
    with pytest.raises(TypeError, match="mixup alpha must be a positive number"):
        mixup(x, y, torch.zeros(4, 5))


def test_roll_shifts_each_sample_circularly_in_range():
    batch, n_time = 32, 20
    x = torch.arange(n_time, dtype=torch.float32).expand(batch, 1, 3, n_time).contiguous()
    out = roll(x, max_shift=6, generator=torch.Generator().manual_seed(0))
    shifts = []
    for b in range(batch):
        shift = int((-out[b, 0, 0, 0].item()) % n_time)
        shift = shift - n_time if shift > n_time // 2 else shift
        assert -6 <= shift <= 6
        assert torch.equal(out[b], x[b].roll(shift, dims=-1))
        shifts.append(shift)
    assert len(set(shifts)) > 3  # per sample, not one shift for the batch
    assert torch.equal(roll(x, max_shift=0), x)
