"""models/exchange/hf.py: MAEST <-> Hugging Face ASTForAudioClassification, with equal logits."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils as dynamic_module_utils
from safetensors.torch import load_file
from transformers import ASTConfig, ASTForAudioClassification, pipeline

from models import get_maest
from models.checkpoints import CheckpointError
from models.exchange.hf import (
    check_hf_config,
    export_hf,
    hf_to_maest_state_dict,
    maest_from_hf,
    maest_to_hf_state_dict,
    merge_position_embeddings,
    read_hf_config,
    read_hf_state_dict,
    split_position_embeddings,
)
from models.mel import MelSpectrogram

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LABELS = ["Rock---Punk", "Jazz---Bop", "Electronic---Techno", "Pop---Ballad", "Folk---Celtic"]
TINY = dict(n_classes=5, input_t=100)  # 10 time positions: max_frames = 106
CLIP = 100  # the tiny model's own clip (input_t): export_hf's default max_length, 9 time patches


def randomised(model, seed: int = 0):
    """Weights far from their initialisation, so that a wrong mapping cannot hide behind zeros and ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tiny(seed: int = 0, **overrides):
    return randomised(get_maest("maest-tiny", **{**TINY, **overrides}), seed)


@pytest.fixture
def hf_modules_cache(tmp_path_factory, monkeypatch):
    """Where transformers copies a directory's custom code: one folder per test session, because it
    imports its ``transformers_modules`` package once, from the first folder it is given."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.getbasetemp() / "hf_modules"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny()
    out = export_hf(model, tmp_path_factory.mktemp("hf") / "maest-tiny", labels=LABELS)
    return model, out


def hf_logits(hf_model, mel):
    with torch.no_grad():
        return hf_model(input_values=mel.transpose(1, 2)).logits  # AST takes (B, frames, mel bands)


# ---- export ------------------------------------------------------------------------------------


def test_export_writes_an_ast_directory_with_our_config(exported):
    model, out = exported
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["ASTForAudioClassification"]
    assert cfg["model_type"] == "audio-spectrogram-transformer"
    expected = dict(num_mel_bins=96, max_length=CLIP, frequency_stride=10, time_stride=10, patch_size=16, hidden_size=64)
    assert {k: cfg[k] for k in expected} == expected
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (2, 4, 256)
    assert cfg["layer_norm_eps"] == 1e-6 and cfg["qkv_bias"] is True
    assert cfg["problem_type"] == "multi_label_classification"
    assert cfg["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert cfg["label2id"]["Jazz---Bop"] == 1
    sd = load_file(str(out / "model.safetensors"))
    assert sd["audio_spectrogram_transformer.embeddings.position_embeddings"].shape == (1, 2 + 9 * 9, 64)  # 9 time patches
    assert cfg["maest_input_t"] == 100  # the 10th time position AST has no room for is kept beside it
    assert load_file(str(out / "maest_extra.safetensors"))["time_new_pos_embed_tail"].shape == (1, 64, 1, 1)
    assert "audio_spectrogram_transformer.encoder.layer.1.attention.attention.query.weight" in sd
    assert not any("head_dist" in k for k in sd)


def test_every_exported_file_has_the_mode_of_a_file_the_user_writes(exported):
    _, out = exported
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert "model.safetensors" in modes and "maest_extra.safetensors" in modes  # safetensors alone writes 0600
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_transformers_loads_the_export_with_equal_logits(exported):
    model, out = exported
    hf, info = ASTForAudioClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    mel = torch.randn(3, 96, CLIP)  # AST needs exactly max_length frames: the model's own clip
    ours = model(mel)
    theirs = hf_logits(hf.eval(), mel)
    assert ours.abs().max() > 0.5  # a real signal, not an all-zero output
    torch.testing.assert_close(theirs, ours.detach(), atol=1e-4, rtol=0)


def test_the_audio_classification_pipeline_gives_our_sigmoid_scores(exported, hf_modules_cache):
    model, out = exported
    # The feature extractor's code is in the directory: raw audio in, labels out, all offline.
    classify = pipeline("audio-classification", model=str(out), trust_remote_code=True)
    audio = torch.randn((CLIP - 1) * 256, generator=torch.Generator().manual_seed(1)) * 0.1
    scores = {r["label"]: r["score"] for r in classify(audio.numpy(), top_k=5)}
    expected = torch.sigmoid(model(MelSpectrogram(normalized=True)(audio[None])))[0]
    assert scores == pytest.approx({label: float(p) for label, p in zip(LABELS, expected)}, abs=1e-4)


def test_round_trip_gives_the_same_state_dict_and_logits(exported):
    model, out = exported
    original = model.state_dict()
    back = read_hf_state_dict(out)
    assert set(back) == set(original)
    position = {"freq_new_pos_embed", "time_new_pos_embed"}
    for key in sorted(set(original) - position - {"head_dist.weight", "head_dist.bias"}):
        torch.testing.assert_close(back[key], original[key], atol=0, rtol=0, msg=key)
    # The split is unique up to a constant moved between frequency and time: their sum is what counts.
    torch.testing.assert_close(
        back["freq_new_pos_embed"] + back["time_new_pos_embed"],
        original["freq_new_pos_embed"] + original["time_new_pos_embed"],
        atol=1e-6,
        rtol=0,
    )
    # AST has one head; head_dist becomes a copy of it (unused by a "mean" model).
    torch.testing.assert_close(back["head_dist.weight"], original["head.1.weight"], atol=0, rtol=0)

    mel = torch.randn(2, 96, model.config.max_frames)
    reloaded = maest_from_hf(out)
    assert not reloaded.training and reloaded.config.distilled_type == "mean"
    assert reloaded.config.grid_t == model.config.grid_t
    torch.testing.assert_close(reloaded(mel), model(mel), atol=1e-5, rtol=0)
    short = mel[..., :50]  # shorter inputs use the first time positions: the split must not shift them
    torch.testing.assert_close(reloaded(short), model(short), atol=1e-5, rtol=0)
    via_registry = get_maest("maest-tiny", checkpoint=out, **TINY)
    torch.testing.assert_close(via_registry(mel), model(mel), atol=1e-5, rtol=0)


def test_position_grid_merge_and_split_are_inverse():
    new_pos, freq, time = torch.randn(1, 2, 8), torch.randn(1, 8, 9, 1), torch.randn(1, 8, 1, 7)
    pos = merge_position_embeddings(new_pos, freq, time)
    assert pos.shape == (1, 2 + 63, 8)
    # frequency-major: token 2 + f * T + t holds freq[f] + time[t]
    torch.testing.assert_close(pos[0, 2 + 3 * 7 + 5], freq[0, :, 3, 0] + time[0, :, 0, 5])
    n, f, t = split_position_embeddings(pos, (9, 7))
    assert f.shape == freq.shape and t.shape == time.shape
    torch.testing.assert_close(merge_position_embeddings(n, f, t), pos, atol=1e-6, rtol=0)


# ---- import of models written by transformers -------------------------------------------------


def ast_model(num_labels=5, max_length=106, additive=True, seed=0, **config):
    torch.manual_seed(seed)
    cfg = ASTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, num_mel_bins=96,
        max_length=max_length, num_labels=num_labels, layer_norm_eps=1e-6, **config,
    )
    model = ASTForAudioClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        pos = model.audio_spectrogram_transformer.embeddings.position_embeddings
        if additive:  # a MAEST model: frequency + time
            n_t = (max_length - 16) // 10 + 1
            pos.copy_(merge_position_embeddings(torch.randn(1, 2, 64), torch.randn(1, 64, 9, 1), torch.randn(1, 64, 1, n_t)))
    return model


def test_a_model_saved_by_transformers_imports_with_equal_logits(tmp_path):
    hf = ast_model()
    hf.save_pretrained(tmp_path / "ast")
    model = maest_from_hf(tmp_path / "ast")
    mel = torch.randn(2, 96, 106)
    torch.testing.assert_close(model(mel), hf_logits(hf, mel), atol=1e-4, rtol=0)
    # transformers 5 names its modules differently in memory (q_proj, o_proj, mlp.fc1): accepted too.
    in_memory, _ = hf_to_maest_state_dict(hf.state_dict(), hf.config.to_dict())
    from_file = read_hf_state_dict(tmp_path / "ast")
    assert set(in_memory) == set(from_file)
    for key in from_file:
        torch.testing.assert_close(in_memory[key], from_file[key], atol=0, rtol=0, msg=key)


def test_half_precision_and_pytorch_bin_checkpoints_import(tmp_path):
    hf = ast_model().half()
    hf.save_pretrained(tmp_path / "fp16")  # fp16 rounding leaves the frequency + time grid a few ulps off
    sd = read_hf_state_dict(tmp_path / "fp16")
    assert sd["freq_new_pos_embed"].dtype == torch.float16
    # pytorch_model.bin instead of model.safetensors
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "fp16" / "config.json").read_text())
    torch.save(load_file(str(tmp_path / "fp16" / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    from_bin = read_hf_state_dict(tmp_path / "bin")
    for key in sd:
        torch.testing.assert_close(from_bin[key], sd[key], atol=0, rtol=0, msg=key)


def test_a_non_additive_position_grid_is_rejected_naming_the_directory(tmp_path):
    ast_model(additive=False).save_pretrained(tmp_path / "audioset-ast")
    with pytest.raises(CheckpointError, match=r"audioset-ast.*not a sum of a frequency and a time embedding"):
        get_maest("maest-tiny", checkpoint=tmp_path / "audioset-ast", **TINY)


def test_missing_files_name_the_directory_and_the_expected_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*config\.json"):
        read_hf_state_dict(tmp_path / "empty")
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg" / "config.json").write_text(json.dumps(ASTConfig(num_mel_bins=96).to_dict()))
    with pytest.raises(FileNotFoundError, match=r"nocfg.*model\.safetensors.*pytorch_model\.bin"):
        read_hf_state_dict(tmp_path / "nocfg")


def test_config_mismatches_say_which_option_to_set(tmp_path):
    ast_model(num_labels=7, max_length=206).save_pretrained(tmp_path / "other")
    # Through the registry the strict load names the option (n_classes here; input_t below).
    with pytest.raises(CheckpointError, match=r"n_classes=7"):
        get_maest("maest-tiny", checkpoint=tmp_path / "other", n_classes=5, input_t=200)
    with pytest.raises(CheckpointError, match=r"max_length=206 frames gives 20 time positions, the model has 10: set input_t=200"):
        get_maest("maest-tiny", checkpoint=tmp_path / "other", n_classes=7, input_t=100)
    assert get_maest("maest-tiny", checkpoint=tmp_path / "other", n_classes=7, input_t=200).config.grid_t == 20
    # check_hf_config compares the whole config before loading.
    tiny_cfg = get_maest("maest-tiny", **TINY).config
    with pytest.raises(CheckpointError, match=r"n_classes=7 \(maest\.n_classes\)[\s\S]*input_t=200 \(maest\.input_t"):
        check_hf_config(tmp_path / "other", tiny_cfg)
    with pytest.raises(CheckpointError, match=r"use an arch of that shape"):
        check_hf_config(tmp_path / "other", get_maest("maest-demo", n_classes=7, input_t=200).config)
    check_hf_config(read_hf_config(tmp_path / "other"), tiny_cfg.replace(n_classes=7, input_t=200))  # fits: no error


def test_ast_models_with_another_front_end_are_rejected(tmp_path):
    cfg = ASTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=256, max_length=106)
    ASTForAudioClassification(cfg).save_pretrained(tmp_path / "kaldi128")  # AudioSet AST: 128 mel bands
    with pytest.raises(CheckpointError, match=r"kaldi128.*num_mel_bins=128.*num_mel_bins=96"):
        read_hf_state_dict(tmp_path / "kaldi128")


# ---- separated (teacher-student) models --------------------------------------------------------


def test_separated_models_export_only_on_request_with_mean_token_logits(tmp_path, caplog):
    model = tiny(distilled_type="separated")
    with pytest.raises(ValueError, match=r"separated.*allow_separated=True"):
        export_hf(model, tmp_path / "ts", feature_extractor=False)
    with caplog.at_level(logging.WARNING, logger="models.exchange.hf"):
        out = export_hf(model, tmp_path / "ts", feature_extractor=False, allow_separated=True)
    assert "logits differ" in caplog.text
    assert not (tmp_path / "ts" / "preprocessor_config.json").exists()
    mel = torch.randn(2, 96, CLIP)
    with torch.no_grad():
        tokens = model.forward_features(mel)
        expected = model.head((tokens[:, 0] + tokens[:, 1]) / 2)
    hf = ASTForAudioClassification.from_pretrained(out).eval()
    torch.testing.assert_close(hf_logits(hf, mel), expected, atol=1e-4, rtol=0)


def test_export_checks_the_labels(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match=r"3 labels given for a model with n_classes=5"):
        export_hf(model, tmp_path / "x", labels=LABELS[:3])
    with pytest.raises(ValueError, match=r"unique.*Rock---Punk"):
        export_hf(model, tmp_path / "x", labels=["Rock---Punk"] * 5)
    assert maest_to_hf_state_dict(model.state_dict(), model.config)["classifier.dense.weight"].shape == (5, 64)


def test_a_loaded_model_exports_the_label_names_it_was_saved_with(tmp_path):
    from models.checkpoints import MODEL_RECORD_KEY, model_record

    model = tiny()
    ckpt = tmp_path / "named.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                MODEL_RECORD_KEY: model_record("maest-tiny", model.config, LABELS)}, ckpt)
    loaded = get_maest(checkpoint=ckpt, checkpoint_swa_weights=False)
    assert loaded.labels == LABELS
    out = export_hf(loaded, tmp_path / "hf")  # no labels= given: the checkpoint's names, not LABEL_<i>
    assert read_hf_config(out)["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert maest_from_hf(out).labels == LABELS
    assert get_maest(checkpoint=out).labels == LABELS
    assert export_hf(loaded, tmp_path / "given", labels=list("abcde")) and read_hf_config(tmp_path / "given")["id2label"]["0"] == "a"

    assert get_maest(checkpoint=ckpt, checkpoint_swa_weights=False, n_classes=3, reinit_heads=True).labels is None  # new heads: no names
    assert get_maest("maest-tiny", **TINY).labels is None  # random weights
    unnamed = export_hf(tiny(), tmp_path / "unnamed")
    assert read_hf_config(unnamed)["id2label"]["4"] == "LABEL_4" and maest_from_hf(unnamed).labels is None


# ---- without transformers ----------------------------------------------------------------------


def test_export_and_import_work_without_transformers(tmp_path):
    script = f"""
import sys
sys.modules["transformers"] = None  # as if it were not installed
import torch
from models import get_maest
from models.exchange.hf import export_hf, maest_from_hf
from models.feature_extraction import MAESTFeatureExtractor
torch.manual_seed(0)
model = get_maest("maest-tiny", n_classes=5, input_t=100)
export_hf(model, {str(tmp_path / 'plain')!r}, labels={LABELS!r})
mel = torch.randn(2, 96, 106)
assert torch.allclose(maest_from_hf({str(tmp_path / 'plain')!r})(mel), model(mel), atol=1e-5)
features = MAESTFeatureExtractor.from_pretrained({str(tmp_path / 'plain')!r})(torch.zeros(4000).numpy())
assert type(features) is dict and tuple(features["input_values"].shape) == (1, 100, 96)
torch.save({{"state_dict": model.state_dict(), "mel": mel}}, {str(tmp_path / 'ref.pt')!r})
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["max_length"] == CLIP
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    model = get_maest("maest-tiny", **TINY)
    model.load_state_dict(ref["state_dict"])
    hf = ASTForAudioClassification.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(hf_logits(hf, ref["mel"][..., :CLIP]), model(ref["mel"][..., :CLIP]).detach(), atol=1e-4, rtol=0)


def test_a_failed_re_export_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    """Files are staged beside the folder and renamed into place: a crash mid-export changes nothing."""
    import models.exchange.hf as hf

    out = export_hf(tiny(seed=0), tmp_path / "maest", labels=LABELS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "_write_weights", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_hf(tiny(seed=1), out, labels=LABELS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maest"]  # no staging folder left behind
