"""What a wrong ``checkpoint=`` gets: files that are no checkpoint, a missing released weights file,
Hugging Face export folders (which record their model) and folders that are no model, and the
hints of a key that contradicts a checkpoint's record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from ex_maest import ex
from models import get_maest
from models.checkpoints import CheckpointError, read_checkpoint
from models.exchange.hf import INPUT_T_KEY, export_hf
from models.registry import REGISTRY, config_from_record, read_record

TINY = dict(n_classes=5, input_t=100)  # maest-tiny: width 64, depth 2, 4 heads
LABELS = ["Rock---Punk", "Jazz---Bop", "Electronic---Techno", "Pop---Ballad", "Folk---Celtic"]


def tiny_record(**config) -> dict:
    """The record of a maest-tiny checkpoint of this project (``models.checkpoints.record_of``)."""
    arch = get_maest("maest-tiny", **TINY).config.architecture()
    return {"arch": "maest-tiny", "config": {**arch, **config}, "labels": None}


def write_wav(path, seconds: float = 1.0):
    sf.write(path, 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(16000 * seconds)) / 16000).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = get_maest("maest-tiny", **TINY)
    return model, export_hf(model, tmp_path_factory.mktemp("hf") / "export", labels=LABELS, feature_extractor=False)


# ---- files that are no checkpoint ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content",
    [("hello.ckpt", b"hello world\n"), ("abc.ckpt", b"abc"), ("config.ckpt", b'{"a": 1}\n')],
)
def test_a_text_file_is_not_a_torch_checkpoint(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint .*{name}: it is not a torch checkpoint"):
        get_maest("maest-tiny", checkpoint=path)
    with pytest.raises(CheckpointError, match=rf"{name}: it is not a torch checkpoint"):
        read_record(path)  # what every command reads first


def test_an_audio_file_is_not_a_torch_checkpoint(tmp_path):
    path = write_wav(tmp_path / "song.wav")
    with pytest.raises(CheckpointError, match=r"song\.wav: it is not a torch checkpoint .*begins with b'RIFF"):
        get_maest(checkpoint=path)
    with pytest.raises(CheckpointError, match=r"song\.wav: it is not a torch checkpoint"):
        read_checkpoint(path, trust_checkpoint=True)  # the trusted route checks first too


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: the file is empty \(truncated"):
        get_maest("maest-tiny", checkpoint=tmp_path / "empty.ckpt")


def test_a_zip_that_is_no_torch_archive_names_the_file(tmp_path):
    (tmp_path / "zip.ckpt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*zip\.ckpt: .*truncated or not a torch checkpoint"):
        get_maest("maest-tiny", checkpoint=tmp_path / "zip.ckpt")


def test_a_corrupt_safetensors_file_names_the_file(tmp_path, exported):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage bytes here")
    with pytest.raises(CheckpointError, match=r"cannot read .*bad\.safetensors: .*truncated or not a safetensors file"):
        get_maest("maest-tiny", checkpoint=bad, **TINY)
    # ... and inside a Hugging Face directory
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text((exported[1] / "config.json").read_text())
    (folder / "model.safetensors").write_bytes((exported[1] / "model.safetensors").read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match=r"hf/model\.safetensors: .*truncated or not a safetensors file"):
        get_maest(checkpoint=folder)


# ---- a missing released weights file ------------------------------------------------------------


@pytest.mark.parametrize("name", ["discogs-maest-30s-pw-129e-swa.ckpt", "discogs-maest-30s-pw-129e.ckpt"])
def test_a_missing_released_weights_file_says_where_to_get_it(tmp_path, name):
    spec = REGISTRY["discogs-maest-30s-pw-129e"]
    path = tmp_path / "weights" / name
    target = tmp_path / "weights" / spec.weights_file  # download_weights' name, also for the legacy one
    expected = (
        rf"checkpoint .*{name} does not exist\. It is the released weights file of 'discogs-maest-30s-pw-129e': "
        rf"download {spec.url} and save it as {target} "
        r"\(or call models\.registry\.download_weights\('discogs-maest-30s-pw-129e', weights_directory="
    )
    with pytest.raises(FileNotFoundError, match=expected):
        get_maest("discogs-maest-30s-pw-129e", checkpoint=path)
    with pytest.raises(FileNotFoundError, match=expected):
        read_record(path)  # the commands' route (maest.checkpoint= / inference_checkpoint=)


def test_a_missing_file_of_another_name_gets_no_download_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mine\.ckpt does not exist$"):
        get_maest("maest-tiny", checkpoint=tmp_path / "mine.ckpt")


# ---- Hugging Face export directories ------------------------------------------------------------


def test_an_export_directory_loads_without_an_arch_or_overrides(exported):
    model, out = exported
    mel = torch.randn(2, 96, 100)
    for loaded in (get_maest(checkpoint=out), get_maest("maest-tiny", checkpoint=out)):
        assert (loaded.n_classes, loaded.config.input_t, loaded.config.embed_dim) == (5, 100, 64)
        torch.testing.assert_close(loaded(mel), model(mel), atol=1e-5, rtol=0)


def test_an_export_directory_records_its_model_and_label_names(exported):
    _, out = exported
    record = read_record(out)
    assert record["arch"] is None and record["labels"] == LABELS
    assert (record["config"]["n_classes"], record["config"]["input_t"], record["config"]["depth"]) == (5, 100, 2)


def test_an_export_without_label_names_records_none(tmp_path):
    out = export_hf(get_maest("maest-tiny", **TINY), tmp_path / "nolabels", feature_extractor=False)  # id2label LABEL_<i>
    assert read_record(out)["labels"] is None


def test_keys_that_contradict_an_export_directory_name_both_values(exported):
    _, out = exported
    with pytest.raises(ValueError, match=r"n_classes=5, .*; n_classes=7 contradicts it \(the checkpoint has n_classes=5\)"):
        get_maest(checkpoint=out, n_classes=7)
    with pytest.raises(ValueError, match=r"arch=maest-demo \(config: maest\.arch\) contradicts it: maest-demo has embed_dim=192 \(the checkpoint has 64\)"):
        get_maest("maest-demo", checkpoint=out)


def test_a_hub_directory_without_maest_input_t_still_needs_its_arch(tmp_path, exported):
    _, out = exported
    hub = tmp_path / "hub"
    hub.mkdir()
    config = json.loads((out / "config.json").read_text())
    del config[INPUT_T_KEY]
    (hub / "config.json").write_text(json.dumps(config))
    (hub / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=rf"hub: its config\.json has no {INPUT_T_KEY} \(not written by export_hf.*name its architecture"):
        get_maest(checkpoint=hub)
    assert read_record(hub) is None


def test_predict_names_the_classes_from_an_export_directory(exported, tmp_path):
    _, out = exported
    audio = write_wav(tmp_path / "a.wav", 3.0)
    result = ex.run(
        "predict", config_updates={"inference_checkpoint": str(out), "predict": {"audio": [str(audio)], "device": "cpu", "top_k": 5}},
        options={"--loglevel": "ERROR"},
    )
    assert sorted(item["label"] for item in result.result[0]["labels"]) == sorted(LABELS)


# ---- a folder that is no model ------------------------------------------------------------------


def test_a_folder_of_audio_is_not_a_hugging_face_directory(tmp_path):
    folder = tmp_path / "music"
    folder.mkdir()
    write_wav(folder / "a.wav")
    message = r"music is not a Hugging Face model directory: config\.json is missing"
    with pytest.raises(FileNotFoundError, match=message):
        get_maest(checkpoint=folder)  # not "name its architecture"
    with pytest.raises(FileNotFoundError, match=message):
        get_maest("maest-tiny", checkpoint=folder)
    with pytest.raises(FileNotFoundError, match=message):
        read_record(folder)


# ---- hints of a contradicting key ---------------------------------------------------------------


def test_n_classes_against_the_record_says_reinit_heads_is_for_training_only():
    with pytest.raises(ValueError) as error:
        config_from_record(None, tiny_record(), {"n_classes": 10}, "checkpoint demo.ckpt")  # inference: reinit not applied
    message = str(error.value)
    assert "n_classes=10 contradicts it (the checkpoint has n_classes=5)" in message
    assert "At inference, drop n_classes (and maest.reinit_heads: it only applies when training)" in message
    assert "To fine-tune on other labels, train with reinit_heads=True" in message
    assert "set reinit_heads" not in message


def test_an_arch_of_another_width_names_every_value_and_does_not_suggest_reinit_heads():
    with pytest.raises(ValueError) as error:
        config_from_record("discogs-maest-30s-pw-129e", tiny_record(), {}, "checkpoint demo.ckpt")
    message = str(error.value)
    assert (
        "arch=discogs-maest-30s-pw-129e (config: maest.arch) contradicts it: discogs-maest-30s-pw-129e has embed_dim=768 (the checkpoint has 64), "
        "depth=12 (the checkpoint has 2), num_heads=12 (the checkpoint has 4), input_t=1875 (the checkpoint has 100)."
    ) in message
    assert "reinit_heads" not in message
    # n_classes together with a width mismatch: reinit_heads cannot help either
    with pytest.raises(ValueError) as error:
        config_from_record(None, tiny_record(), {"n_classes": 10, "embed_dim": 128}, "checkpoint demo.ckpt")
    assert "embed_dim=128 contradicts it (the checkpoint has embed_dim=64)" in str(error.value)
    assert "reinit_heads" not in str(error.value)


def test_an_arch_without_released_weights_names_the_config_key():
    from models.registry import pretrained_path

    with pytest.raises(ValueError, match=r"'maest-tiny' has no pre-trained weights; build it with pretrained=False \(config: maest.pretrained=False\)"):
        pretrained_path("maest-tiny")
