"""models/feature_extraction.py: MAESTFeatureExtractor equals the project's mel front-end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers.dynamic_module_utils as dynamic_module_utils
from transformers import AutoFeatureExtractor, BatchFeature

from models.feature_extraction import MAESTFeatureExtractor
from models.mel import DISCOGS_MEAN, DISCOGS_STD, MelSpectrogram, normalize

MAX_LENGTH = 106  # frames; the tiny test models' max_frames
SAMPLES = (MAX_LENGTH - 1) * 256  # audio that gives exactly MAX_LENGTH frames
PAD = (0.0 - DISCOGS_MEAN) / (2 * DISCOGS_STD)  # a zero (silent) compressed-mel frame, normalised
BEFORE = (MAX_LENGTH - 20) // 2  # silent frames before a 20-frame clip: padded centred (models.inference.pad_centre)


def audio(n_samples: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n_samples) * 0.1).astype(np.float32)


def front_end(y: np.ndarray) -> torch.Tensor:
    """The project's front-end: normalised mel (n_mels, frames)."""
    return normalize(MelSpectrogram()(torch.from_numpy(y)))


@pytest.fixture
def hf_modules_cache(tmp_path_factory, monkeypatch):
    """Where transformers copies a directory's custom code: one folder per test session, because it
    imports its ``transformers_modules`` package once, from the first folder it is given."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.getbasetemp() / "hf_modules"))


@pytest.fixture
def extractor():
    return MAESTFeatureExtractor(max_length=MAX_LENGTH)


def test_features_equal_the_mel_front_end(extractor):
    y = audio(SAMPLES)
    out = extractor(y, sampling_rate=16000)
    assert isinstance(out, BatchFeature)
    values = out["input_values"]
    assert isinstance(values, torch.Tensor) and values.shape == (1, MAX_LENGTH, 96) and values.dtype == torch.float32
    torch.testing.assert_close(values[0].T, front_end(y), atol=1e-6, rtol=0)


def test_a_call_without_sampling_rate_warns_as_hugging_faces_extractors_do(extractor, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="models.feature_extraction")
    y = audio(SAMPLES)
    torch.testing.assert_close(extractor(y)["input_values"], extractor(y, sampling_rate=16000)["input_values"], atol=0, rtol=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["MAESTFeatureExtractor was called without sampling_rate: pass sampling_rate=16000 to confirm the "
                        "audio's rate (other rates must be resampled first)"]


def test_short_clips_get_silent_frames_and_long_clips_are_cut(extractor):
    short = audio(5000)  # 1 + 5000 // 256 = 20 frames
    out = extractor(short)["input_values"][0]
    torch.testing.assert_close(out[BEFORE : BEFORE + 20].T, front_end(short), atol=1e-6, rtol=0)
    silent = torch.cat((out[:BEFORE], out[BEFORE + 20 :]))
    torch.testing.assert_close(silent, torch.full((MAX_LENGTH - 20, 96), PAD), atol=1e-6, rtol=0)
    assert BEFORE == 43 and len(out) - BEFORE - 20 == 43  # centred; an odd extra frame would go to the end

    long = audio(3 * SAMPLES, seed=1)
    cut = extractor(long)["input_values"][0]
    assert cut.shape == (MAX_LENGTH, 96)
    # The audio is cut before the STFT; the frames equal those of the whole clip's mel.
    torch.testing.assert_close(cut.T, front_end(long)[:, :MAX_LENGTH], atol=1e-6, rtol=0)
    uncut = extractor(long, truncation=False)["input_values"]
    assert uncut.shape == (1, 1 + 3 * SAMPLES // 256, 96)


def test_batches_pad_each_clip_alone(extractor):
    a, b = audio(SAMPLES), audio(5000, seed=2)
    batch = extractor([a, b])["input_values"]
    assert batch.shape == (2, MAX_LENGTH, 96)
    torch.testing.assert_close(batch[0].T, front_end(a), atol=1e-6, rtol=0)
    torch.testing.assert_close(batch[1, BEFORE : BEFORE + 20].T, front_end(b), atol=1e-6, rtol=0)  # not the mel of b padded with a's length
    torch.testing.assert_close(batch[1, :BEFORE], torch.full((BEFORE, 96), PAD), atol=1e-6, rtol=0)

    longest = extractor([b, audio(8000)], padding="longest", return_tensors="np")["input_values"]
    assert isinstance(longest, np.ndarray) and longest.shape == (2, 1 + 8000 // 256, 96)
    two_d = extractor(np.stack([a, a]))["input_values"]
    torch.testing.assert_close(two_d[1], batch[0])
    ragged = extractor([a, b], padding="do_not_pad", return_tensors=None)["input_values"]
    assert [x.shape for x in ragged] == [(MAX_LENGTH, 96), (20, 96)]
    with pytest.raises(ValueError, match=r"different lengths.*padding='max_length'"):
        extractor([a, b], padding=False, return_tensors="pt")
    mask = extractor([a, b], return_attention_mask=True)["attention_mask"]
    assert mask.sum(dim=1).tolist() == [MAX_LENGTH, 20] and mask[1, BEFORE : BEFORE + 20].all()


def test_features_feed_maest_like_its_own_front_end(extractor):
    from models import get_maest

    model = get_maest("maest-tiny", n_classes=5, input_t=100)
    y = np.stack([audio(SAMPLES, seed=3), audio(SAMPLES, seed=4)])
    features = extractor(y)["input_values"]
    torch.testing.assert_close(model(features.transpose(1, 2)), model(front_end(y)), atol=1e-6, rtol=0)


def test_invalid_inputs_are_rejected(extractor):
    with pytest.raises(ValueError, match=r"44100 Hz given.*expects 16000 Hz: resample"):
        extractor(audio(1000), sampling_rate=44100)
    with pytest.raises(ValueError, match=r"mono"):
        extractor(np.zeros((2, 2, 1000), dtype=np.float32))
    with pytest.raises(ValueError, match=r"clip 1 is empty"):
        extractor([audio(1000), np.zeros(0, dtype=np.float32)])
    with pytest.raises(ValueError, match=r"padding must be one of"):
        extractor(audio(1000), padding="shortest")
    with pytest.raises(ValueError, match=r"log_compression='log' is not supported"):
        MAESTFeatureExtractor(log_compression="log")


def test_save_and_load_round_trip(tmp_path, hf_modules_cache, extractor):
    extractor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "MAESTFeatureExtractor"
    assert saved["max_length"] == MAX_LENGTH and saved["sampling_rate"] == 16000 and "_mel" not in saved
    loaded = MAESTFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.to_dict() == extractor.to_dict()
    y = audio(9000)
    torch.testing.assert_close(loaded(y)["input_values"], extractor(y)["input_values"], atol=0, rtol=0)

    # The saved directory carries the class's code: AutoFeatureExtractor loads it offline.
    auto = AutoFeatureExtractor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "MAESTFeatureExtractor" and auto.max_length == MAX_LENGTH
    torch.testing.assert_close(auto(y)["input_values"], extractor(y)["input_values"], atol=0, rtol=0)


def test_published_preprocessor_configs_load(tmp_path):
    # The keys of the preprocessor_config.json of the published MAEST models on the Hub.
    published = {
        "auto_map": {"AutoFeatureExtractor": "feature_extraction_maest.MAESTFeatureExtractor"},
        "do_normalize": True,
        "feature_extractor_type": "MAESTFeatureExtractor",
        "feature_size": 1,
        "hop_length": 256,
        "log_compression": "logC",
        "max_length": 1876,
        "mean": 2.06755686098554,
        "n_fft": 512,
        "num_mel_bins": 96,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
        "sampling_rate": 16000,
        "std": 1.268292820667291,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(published))
    extractor = MAESTFeatureExtractor.from_pretrained(tmp_path)
    assert (extractor.max_length, extractor.num_mel_bins, extractor.hop_length) == (1876, 96, 256)
    assert extractor(audio(16000))["input_values"].shape == (1, 1876, 96)
