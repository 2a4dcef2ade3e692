"""Exports take the model's own clips exactly; short audio is padded one way everywhere (issue 9, item 5).

A tiny model with a 5 s time embedding (input_t = 312 frames) exported to Hugging Face and ONNX
gives the native pipeline's logits (``models.inference``) on its own 312-frame clips, on 3.2 s of
audio (shorter than a clip: zero-padded centred) and on lengths between patch multiples; a 10 s
one (625) checks another length. The Hub's lengths stay an option (``max_length="hub"``).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import ASTForAudioClassification

from models import get_maest
from models.exchange.hf import export_hf, maest_from_hf
from models.exchange.onnx import export_onnx
from models.feature_extraction import MAESTFeatureExtractor
from models.inference import pad_centre, split_into_clips, track_probabilities
from models.mel import MelSpectrogram, normalize

CLIP_5S, CLIP_10S = 312, 625  # seconds * 16000 // 256
MEL = MelSpectrogram()


def tiny(input_t: int, seed: int = 0):
    model = get_maest("maest-tiny", n_classes=5, input_t=input_t)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def music(seconds: float, seed: int = 0) -> torch.Tensor:
    """A chord with noise: a signal whose logits depend on where its frames sit."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    chord = sum(torch.sin(2 * torch.pi * f * t) for f in (220.0, 277.2, 329.6)) / 3
    return (0.5 * chord * (1 + torch.sin(2 * torch.pi * 0.7 * t)) + 0.05 * torch.randn(t.shape, generator=g)).float()


@pytest.fixture(scope="module")
def model_5s():
    return tiny(CLIP_5S)


@pytest.fixture(scope="module")
def hf_5s(model_5s, tmp_path_factory):
    out = export_hf(model_5s, tmp_path_factory.mktemp("hf") / "maest-5s")
    return ASTForAudioClassification.from_pretrained(out).eval(), MAESTFeatureExtractor.from_pretrained(out), out


@pytest.fixture(scope="module")
def onnx_audio_5s(model_5s, tmp_path_factory):
    path = export_onnx(model_5s, tmp_path_factory.mktemp("onnx") / "maest-5s-audio.onnx", with_mel=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def hf_probabilities(hf, extractor, audio: torch.Tensor) -> torch.Tensor:
    features = extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt")["input_values"]
    with torch.no_grad():
        return torch.sigmoid(hf(features).logits[0])


# ---- one padding rule ---------------------------------------------------------------------------


def test_short_audio_is_padded_one_way_everywhere(model_5s, hf_5s, onnx_audio_5s):
    """3.2 s (201 frames) in a 312-frame clip: centred zero compressed-mel frames, as training pads short files."""
    audio = music(3.2)
    mel = MEL(audio)  # (96, 201) compressed
    assert mel.shape[1] == 201
    clip = split_into_clips(mel, CLIP_5S)[0]
    before = (CLIP_5S - 201) // 2
    torch.testing.assert_close(clip[:, before : before + 201], mel)  # the signal in the centre
    assert clip[:, :before].abs().max() == 0 and clip[:, before + 201 :].abs().max() == 0  # silence around it
    torch.testing.assert_close(clip, pad_centre(mel.T, CLIP_5S).T)  # the one rule (helpers/data.py uses it for training)

    native = track_probabilities(model_5s, [audio], CLIP_5S)[0]  # predict's path
    hf, extractor, _ = hf_5s
    features = extractor(audio.numpy(), sampling_rate=16000)["input_values"][0]
    torch.testing.assert_close(features.T, normalize(clip), atol=1e-5, rtol=0)  # the same model input
    torch.testing.assert_close(hf_probabilities(hf, extractor, audio), native, atol=1e-4, rtol=0)
    _, probabilities = onnx_audio_5s.run(None, {"audio": audio[None].numpy()})
    torch.testing.assert_close(torch.from_numpy(probabilities[0]), native, atol=1e-4, rtol=0)

    # The other padding would differ: what the exported pipeline gave before (frames appended, 316 of them).
    right = torch.zeros(96, 316)
    right[:, :201] = mel
    assert (torch.sigmoid(model_5s(normalize(right)[None]))[0] - native).abs().max() > 1e-3


# ---- Hugging Face --------------------------------------------------------------------------------


# 4.976 s: exactly one clip (311 * 256 samples -> 312 frames; 5.0 s gives 313, two clips natively, and AST
# takes the first); 4.87 s: a length between patch multiples; 3.2 s: short.
@pytest.mark.parametrize("seconds", [4.976, 4.87, 3.2])
def test_hugging_face_pipeline_gives_our_probabilities_on_any_clip(model_5s, hf_5s, seconds):
    hf, extractor, out = hf_5s
    assert json.loads((out / "config.json").read_text())["max_length"] == CLIP_5S == extractor.max_length
    audio = music(seconds, seed=1)
    frames = 1 + audio.numel() // 256
    assert frames <= CLIP_5S and (seconds != 4.87 or (frames - 16) % 10)  # 4.87 s: not a patch multiple
    torch.testing.assert_close(
        hf_probabilities(hf, extractor, audio), track_probabilities(model_5s, [audio], CLIP_5S)[0], atol=1e-4, rtol=0
    )


def test_hugging_face_logits_equal_ours_on_our_own_clips(model_5s, hf_5s):
    hf, _, out = hf_5s
    mel = normalize(split_into_clips(MEL(music(12.0, seed=2)), CLIP_5S))  # three 312-frame clips of a track
    with torch.no_grad():
        torch.testing.assert_close(hf(mel.transpose(1, 2)).logits, model_5s(mel), atol=1e-4, rtol=0)
    # The import restores the whole model: the time position AST has no room for comes back.
    back = maest_from_hf(out)
    assert back.config.input_t == CLIP_5S and back.config.grid_t == model_5s.config.grid_t
    longest = torch.randn(2, 96, model_5s.config.max_frames)  # uses that last position
    torch.testing.assert_close(back(longest), model_5s(longest), atol=1e-5, rtol=0)


def test_10s_model_and_the_hub_lengths(tmp_path):
    model = tiny(CLIP_10S, seed=3)
    audio = music(10.0, seed=3)  # 626 frames: two clips natively; AST's one clip is the first
    out = export_hf(model, tmp_path / "ours", feature_extractor=False)
    hf = ASTForAudioClassification.from_pretrained(out).eval()
    mel = normalize(split_into_clips(MEL(audio), CLIP_10S))
    with torch.no_grad():
        torch.testing.assert_close(hf(mel.transpose(1, 2)).logits, model(mel), atol=1e-4, rtol=0)

    # max_length="hub": the published models' 626 frames, every time position inside AST; no extra file.
    hub = export_hf(model, tmp_path / "hub", feature_extractor=False, max_length="hub")
    config = json.loads((hub / "config.json").read_text())
    assert config["max_length"] == 626 and not (hub / "maest_extra.safetensors").exists()
    whole = normalize(MEL(audio))[None]  # (1, 96, 626)
    with torch.no_grad():
        torch.testing.assert_close(
            ASTForAudioClassification.from_pretrained(hub).eval()(whole.transpose(1, 2)).logits, model(whole), atol=1e-4, rtol=0
        )
    # A Hub directory (no maest_input_t) imports as the 10 s model: input_t 625, the whole-second clip of 62 positions.
    del config["maest_input_t"]
    (hub / "config.json").write_text(json.dumps(config))
    assert maest_from_hf(hub).config.input_t == CLIP_10S
    assert get_maest("maest-tiny", checkpoint=out, n_classes=5, input_t=CLIP_10S)(whole).shape == (1, 5)

    with pytest.raises(ValueError, match=r"max_length must be None \(the model's clip, 625 frames\), 'hub'.*\[16, 635\]"):
        export_hf(model, tmp_path / "x", max_length=700)


# ---- ONNX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.05, 3.2, 4.87, 5.0, 13.3])
def test_onnx_audio_graph_gives_our_clips_and_probabilities_for_any_length(model_5s, onnx_audio_5s, seconds):
    audio = music(seconds, seed=4)
    logits, probabilities = onnx_audio_5s.run(None, {"audio": audio[None].numpy()})
    clips = normalize(split_into_clips(MEL(audio), CLIP_5S))  # what extract_logits feeds the model
    assert logits.shape == (1, len(clips), 5)  # 13.3 s: three clips, the last aligned to the end: nothing dropped
    torch.testing.assert_close(torch.from_numpy(logits[0]), model_5s(clips).detach(), atol=1e-4, rtol=0)
    expected = track_probabilities(model_5s, [audio], CLIP_5S)[0]
    torch.testing.assert_close(torch.from_numpy(probabilities[0]), expected, atol=1e-5, rtol=0)


def test_onnx_audio_graph_batches_tracks_of_one_length(model_5s, onnx_audio_5s):
    audio = torch.stack([music(7.1, seed=s) for s in (5, 6, 7)])
    _, probabilities = onnx_audio_5s.run(None, {"audio": audio.numpy()})
    expected = torch.stack(track_probabilities(model_5s, list(audio), CLIP_5S))
    torch.testing.assert_close(torch.from_numpy(np.asarray(probabilities)), expected, atol=1e-5, rtol=0)
