"""Upstream's current checkpoints (with their torchaudio mel front-end) and release assets (SPEC §5.1)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from models import MAEST, MAESTConfig, get_maest
from models.checkpoints import CheckpointError
from models.registry import REGISTRY, download_weights, get_spec, pretrained_path

TINY = dict(embed_dim=64, depth=2, num_heads=4, n_classes=10, input_t=625)


def tiny(seed):
    torch.manual_seed(seed)
    return MAEST(MAESTConfig(**TINY)).eval()


# ------------------------------------------------------------------------------ mel front-end
def torchaudio_melscale_fbanks(n_freqs=257, f_min=0.0, f_max=8000.0, n_mels=96, sample_rate=16000, mel_scale="slaney"):
    """torchaudio.functional.melscale_fbanks(norm="slaney"), float32 as MelScale stores it: (n_freqs, n_mels).

    Written out here because torchaudio is not a dependency; the arithmetic follows torchaudio's.
    """
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def hz_to_mel(f):
        if mel_scale == "htk":
            return 2595.0 * math.log10(1.0 + f / 700.0)
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep

    def mel_to_hz(m):
        if mel_scale == "htk":
            return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
        hz = f_sp * m
        log_t = m >= min_log_mel
        hz[log_t] = min_log_hz * torch.exp(logstep * (m[log_t] - min_log_mel))
        return hz

    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    f_pts = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down, up = -slopes[:, :-2] / f_diff[:-1], slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.min(down, up), min=0)
    return fb * (2.0 / (f_pts[2 : n_mels + 2] - f_pts[:n_mels])).unsqueeze(0)


def upstream_checkpoint(net, swa, window=None, fb=None):
    """Upstream's current Lightning layout: net(_swa).melspectrogram.{spec.window, mel_scale.fb} besides the ViT."""
    window = torch.hann_window(512) if window is None else window
    fb = torchaudio_melscale_fbanks() if fb is None else fb
    sd = {}
    for prefix, model in (("net.", net), ("net_swa.", swa)):
        sd.update({f"{prefix}{k}": v for k, v in model.state_dict().items()})
        sd[f"{prefix}melspectrogram.spec.window"] = window.clone()
        sd[f"{prefix}melspectrogram.mel_scale.fb"] = fb.clone()
    return {"state_dict": sd, "epoch": 128, "pytorch-lightning_version": "2.1.0"}


def test_upstream_checkpoint_with_its_mel_front_end_loads_and_logs_the_dropped_buffers(tmp_path, caplog):
    net, swa = tiny(0), tiny(1)
    path = tmp_path / "upstream-2025.ckpt"
    torch.save(upstream_checkpoint(net, swa), path)
    with caplog.at_level(logging.INFO, logger="models.checkpoints"):
        loaded_swa = get_maest("maest-tiny", checkpoint=path, **TINY)
        loaded_plain = get_maest("maest-tiny", checkpoint=path, checkpoint_swa_weights=False, **TINY)
    for loaded, expected in ((loaded_swa, swa), (loaded_plain, net)):
        assert loaded.state_dict().keys() == expected.state_dict().keys()
        for key, value in expected.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert "dropped upstream's mel front-end buffers melspectrogram.spec.window, melspectrogram.mel_scale.fb" in caplog.text


def test_the_filterbank_reference_is_the_librosa_one_of_spec_2():
    import librosa
    import numpy as np

    ref = librosa.filters.mel(sr=16000, n_fft=512, n_mels=96, fmin=0, fmax=8000, htk=False, norm="slaney", dtype=np.float64).T
    fb = torchaudio_melscale_fbanks().double().numpy()
    assert fb.shape == (257, 96)
    assert np.abs(fb - ref).max() / ref.max() < 1e-5  # what torchaudio stores is SPEC §2's filterbank


@pytest.mark.parametrize(
    "window, fb, message",
    [
        (torch.hamming_window(512), None, r"melspectrogram.spec.window is not a periodic 512-point Hann window"),
        (torch.hann_window(512, periodic=False), None, r"melspectrogram.spec.window is not a periodic 512-point Hann window"),
        (torch.hann_window(1024), None, r"melspectrogram.spec.window has shape \(1024,\); expected \(512,\)"),
        (None, torchaudio_melscale_fbanks(mel_scale="htk"), r"melspectrogram.mel_scale.fb is not the 257x96 Slaney mel filterbank of SPEC §2"),
        (None, torchaudio_melscale_fbanks(f_max=7000.0), r"melspectrogram.mel_scale.fb is not the 257x96 Slaney"),
        (None, torchaudio_melscale_fbanks(n_mels=128), r"melspectrogram.mel_scale.fb has shape \(257, 128\); expected \(257, 96\)"),
        (None, torchaudio_melscale_fbanks().T.contiguous(), r"melspectrogram.mel_scale.fb has shape \(96, 257\)"),
        (None, torch.full((257, 96), float("nan")), r"melspectrogram.mel_scale.fb is not the 257x96"),
    ],
    ids=["hamming", "symmetric-hann", "1024-window", "htk", "fmax-7000", "128-mels", "transposed", "nan"],
)
def test_another_mel_front_end_is_an_error_naming_the_key(tmp_path, window, fb, message):
    path = tmp_path / "other-mels.ckpt"
    torch.save(upstream_checkpoint(tiny(0), tiny(1), window=window, fb=fb), path)
    with pytest.raises(CheckpointError, match=rf"{path}: {message}"):
        get_maest("maest-tiny", checkpoint=path, **TINY)


def test_a_bare_state_dict_with_the_front_end_loads_too(tmp_path):
    net = tiny(2)
    sd = dict(net.state_dict(), **{"melspectrogram.spec.window": torch.hann_window(512), "melspectrogram.mel_scale.fb": torchaudio_melscale_fbanks()})
    torch.save(sd, tmp_path / "bare.pt")
    loaded = get_maest("maest-tiny", checkpoint=tmp_path / "bare.pt", **TINY)
    assert torch.equal(loaded.cls_token, net.cls_token)


# ------------------------------------------------------------------------------ release assets
RELEASE = "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/"
RELEASED = {  # registry name -> (local weights file, URL): upstream's assets, written out in full
    "discogs-maest-5s-pw-129e": (
        "discogs-maest-5s-pw-129e-swa.ckpt",
        "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-5s-pw-129e-swa.ckpt",
    ),
    "discogs-maest-10s-pw-129e": (
        "discogs-maest-10s-pw-129e-swa.ckpt",
        "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-10s-pw-129e-swa.ckpt",
    ),
    "discogs-maest-10s-fs-129e": (
        "discogs-maest-10s-fs-129e-swa.ckpt",
        "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-10s-fs-129e-swa.ckpt",
    ),
    "discogs-maest-10s-dw-75e": (
        "discogs-maest-10s-dw-75e-swa.ckpt",
        "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-10s-dw-75e-swa.ckpt",
    ),
    "discogs-maest-20s-pw-129e": (
        "discogs-maest-20s-pw-129e-swa.ckpt",
        "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-20s-pw-129e-swa.ckpt",
    ),
    "discogs-maest-30s-pw-129e": (
        "discogs-maest-30s-pw-129e-swa.ckpt",
        "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-30s-pw-129e-swa.ckpt",
    ),
    "discogs-maest-30s-pw-73e-ts": (
        "discogs-maest-30s-pw-73e-ts-swa.ckpt",
        "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-30s-pw-73e-ts-swa.ckpt",
    ),
    "discogs-maest-30s-pw-129e-519l": (
        "discogs-maest-30s-pw-129e-519l-swa.ckpt",
        "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-30s-pw-129e-519l-swa.ckpt",
    ),
}


def test_the_registry_lists_exactly_the_eight_released_models():
    assert sorted(name for name, spec in REGISTRY.items() if spec.url and spec.url.startswith(RELEASE)) == sorted(RELEASED)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_release_urls_and_file_names_are_upstreams_assets(name, tmp_path):
    weights_file, url = RELEASED[name]
    spec = get_spec(name)
    assert (spec.weights_file, spec.url) == (weights_file, url)
    with pytest.raises(FileNotFoundError) as error:  # the missing-file message points at the real asset
        pretrained_path(name, tmp_path)
    assert f"Download {url} and save it as {tmp_path / weights_file}" in str(error.value)


def test_weights_saved_under_the_old_local_name_are_still_found(tmp_path):
    old = tmp_path / "discogs-maest-30s-pw-129e.ckpt"
    old.write_bytes(b"x")
    assert pretrained_path("discogs-maest-30s-pw-129e", tmp_path) == old
    assert download_weights("discogs-maest-30s-pw-129e", tmp_path, url="file:///nonexistent") == old  # nothing fetched
    new = tmp_path / "discogs-maest-30s-pw-129e-swa.ckpt"
    new.write_bytes(b"y")
    assert pretrained_path("discogs-maest-30s-pw-129e", tmp_path) == new  # the asset's own name wins


def test_download_saves_under_the_asset_name(tmp_path):
    source = tmp_path / "remote.ckpt"
    source.write_bytes(b"weights")
    target = download_weights("discogs-maest-10s-dw-75e", tmp_path / "w", url=source.as_uri())
    assert target == tmp_path / "w" / "discogs-maest-10s-dw-75e-swa.ckpt" and target.read_bytes() == b"weights"
