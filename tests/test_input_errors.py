"""Inputs of the wrong kind get a clear error (or a safe cast), never a torch message or silence:
mel dtypes, patchout that would remove every patch, config values of the wrong type, truncated WAVs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

import ex_maest
from ex_maest import ex
from helpers.audio import AudioLoadError, load_audio
from helpers.extract import predict_files
from models import MAESTConfig, get_maest
from models.inference import track_probabilities

N_FRAMES = 125  # 2 s clips
N_CLASSES = 5
LABELS = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)


# ----------------------------------------------------------------------------------- mel dtypes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_real_floating_mels_are_cast_to_the_model_dtype(model, dtype):
    x = torch.randn(2, 96, N_FRAMES)
    x_cast = x.to(dtype)
    expected = x_cast.float()  # what the model sees: the input's values in float32
    tol = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x_cast), model(expected), **tol)
        torch.testing.assert_close(model.embeddings(x_cast, block=1), model.embeddings(expected, block=1), **tol)
        maps = model.attention_maps(x_cast, block=0)
        torch.testing.assert_close(maps, model.attention_maps(expected, block=0), **tol)
    assert maps.dtype == torch.float32


def test_casting_keeps_autocast_and_bf16_models_working(model):
    x = torch.randn(2, 96, N_FRAMES, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)  # float64 in, autocast still runs the matmuls in bf16
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), reference, atol=0.05, rtol=0.05)
        bf16 = get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)
        bf16.load_state_dict(model.state_dict())
        bf16 = bf16.to(torch.bfloat16)
        for inp in (x, x.float()):  # float32 and float64 input to a bf16 model
            out = bf16(inp)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("method", ["forward", "embeddings", "attention_maps"])
def test_complex_integer_and_bool_mels_are_refused(model, method):
    call = {"forward": model, "embeddings": lambda x: model.embeddings(x, block=0), "attention_maps": lambda x: model.attention_maps(x, block=0)}[method]
    x = torch.randn(1, 96, N_FRAMES)
    with pytest.raises(TypeError, match=r"complex input \(torch.complex64\): a mel spectrogram is real"):
        call(torch.complex(x, x))
    for dtype in (torch.int16, torch.int64, torch.uint8, torch.bool):
        with pytest.raises(TypeError, match=rf"input of dtype {dtype}: it expects a floating-point, normalised mel"):
            call(x.to(dtype))


# ----------------------------------------------------------------------------------- patchout
def tiny_train(**patchout):
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=625, **patchout).train()


def test_time_patchout_of_every_column_of_a_short_training_input_is_an_error():
    net = tiny_train(s_patchout_t=30)  # fine for 625 frames (61 columns)
    short = torch.randn(2, 96, 312)  # a 5 s crop: 30 time columns
    with pytest.raises(
        ValueError,
        match=r"structured time patchout s_patchout_t=30 removes all 30 time columns of this 312-frame input \(5.0 s clip\): "
        r"use a longer datamodule.clip_length or a smaller maest.s_patchout_t \(at most 29\)",
    ):
        net(short)
    # One column fewer: patches are left; 2 + 9 * (31 - 30) tokens.
    assert net.tokens(torch.randn(2, 1, 96, 322)).shape == (2, 2 + 9 * 1, 64)
    # Evaluation drops nothing: the short input is fine there.
    assert net.eval()(short).shape == (2, N_CLASSES)


def test_unstructured_and_frequency_patchout_are_checked_against_the_input():
    net = tiny_train(s_patchout_t=2, u_patchout=200)  # 625 frames: 9 * 59 patches left, fine
    with pytest.raises(ValueError, match=r"unstructured patchout u_patchout=200 removes all 180 patches left of this 232-frame input .*maest.u_patchout \(at most 179\)"):
        net(torch.randn(1, 96, 232))  # 9 * (22 - 2) = 180 patches
    assert net.tokens(torch.randn(1, 1, 96, 312)).shape == (1, 2 + 9 * 28 - 200, 64)
    with pytest.raises(ValueError, match=r"structured frequency patchout s_patchout_f=9 removes all 9 frequency rows"):
        MAESTConfig(s_patchout_f=9).check_patchout(625)


# ----------------------------------------------------------------------------------- config values
def default_config(**sections) -> dict:
    config = {ing.path: dict(ing.configurations[0]()) for ing in ex.ingredients}
    config.update(dict(ex.configurations[0]()))
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


@pytest.mark.parametrize(
    "sections",
    [
        {"trainer": {"devices": "auto", "precision": 32, "max_epochs": -1}},
        {"trainer": {"devices": 4, "precision": "bf16-mixed", "max_epochs": None, "limit_train_batches": 0.5, "logger": False}},
        {"trainer": {"devices": [0, 1], "precision": "16-mixed", "num_nodes": 2, "log_every_n_steps": 1}},
        {"datamodule": {"clip_length": 7.5}, "predict": {"transformer_block": 3}},
        {"datamodule": {"clip_length": 30}, "predict": {"transformer_block": 11, "device": 0}},
        {"module": {"lr": 1, "mixup_alpha": 0}, "maest": {"n_classes": 519}},
        {"module": {"step_in_backward": False}},
        {"trainer": {"devices": "0,1", "strategy": "ddp_find_unused_parameters_true", "accelerator": "cpu"}, "maest": {"arch": "maest-tiny"}},
        {"trainer": {"devices": -1, "accelerator": "gpu", "strategy": "auto"}, "datamodule": {"sampler": "random"}},
    ],
)
def test_valid_values_of_other_types_than_the_defaults_are_accepted(sections):
    ex_maest.check_config(default_config(**sections))


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"trainer": {"max_epochs": "abc"}}, r"trainer.max_epochs must be an integer or None, at least -1 \(-1: no limit\), got 'abc'"),
        ({"trainer": {"log_every_n_steps": 2.5}}, r"trainer.log_every_n_steps must be an integer or None, got 2.5"),
        ({"trainer": {"precision": "fp8"}}, r"trainer.precision must be 64 or 32 .* or 'bf16-mixed' .*got 'fp8'"),
        ({"trainer": {"enable_progress_bar": "no"}}, r"trainer.enable_progress_bar must be True or False or None, got 'no'"),
        ({"datamodule": {"clip_length": "ten"}}, r"datamodule.clip_length must be a number or None, > 0 \(seconds; None: the model's\), got 'ten'"),
        ({"datamodule": {"clip_length": 0}}, r"datamodule.clip_length must be a number or None, > 0 \(seconds; None: the model's\), got 0"),
        ({"datamodule": {"batch_size_train": 0}}, r"datamodule.batch_size_train must be an integer, at least 1, got 0"),
        ({"datamodule": {"num_workers": -1}}, r"datamodule.num_workers must be an integer, at least 0, got -1"),
        ({"predict": {"top_k": -1}}, r"predict.top_k must be an integer, at least 1, got -1 \(e.g. predict.top_k=5\)"),
        ({"predict": {"batch_size": 0}}, r"predict.batch_size must be an integer, at least 1, got 0"),
        ({"predict": {"hop": "third"}}, r"predict.hop must be 'full' \(consecutive clips\) or 'half' \(half-overlapping clips\), got 'third'"),
        ({"predict": {"transformer_block": "seven"}}, r"predict.transformer_block must be a block \(an integer, 0-based; None: depth // 2\), a list of blocks .* or 'all', got 'seven'"),
        ({"predict": {"transformer_block": [3, "six"]}}, r"predict.transformer_block must be a block .* or 'all', got \[3, 'six'\]"),
        ({"predict": {"precision": "fp8"}}, r"predict.precision must be one of 'fp32', 'bf16', 'fp16' \('fp16' on CUDA only\), got 'fp8'"),
        ({"predict": {"devices": 0}}, r"predict.devices must be an integer, at least 1, got 0"),
        ({"maest": {"pretrained": "yes"}}, r"maest.pretrained must be True or False, got 'yes'"),
        ({"module": {"step_in_backward": "yes"}}, r"module.step_in_backward must be True or False or 'auto', got 'yes'"),
        ({"maest": {"input_t": 62.5}}, r"maest.input_t must be an integer or None, at least 16 \(one patch\), got 62.5"),
        ({"trainer": {"devices": 0}}, r"trainer.devices must be 'auto', a number of devices >= 1 \(-1: all\), or a list of device indices such as \[0, 1\], got 0"),
        ({"trainer": {"devices": -3}}, r"trainer.devices must be .*, got -3"),
        ({"trainer": {"devices": "two"}}, r"trainer.devices must be .*, got 'two'"),
        ({"trainer": {"strategy": "dpp"}}, r"trainer.strategy must be a Lightning strategy, got 'dpp' \(did you mean 'ddp'"),
        ({"trainer": {"accelerator": "tpu"}}, r"trainer.accelerator must be an accelerator this installation has, got 'tpu'.*one of: 'auto', 'gpu', 'cpu'"),
        ({"maest": {"arch": "maest-nope"}}, r"maest.arch must be None \(the checkpoint's\) or a registered architecture, got 'maest-nope' \(did you mean 'maest-tiny'"),
        ({"datamodule": {"sampler": "weird"}}, r"datamodule.sampler must be a training sampler, got 'weird'; one of: 'balanced', 'random'"),
        ({"seed": "x"}, r"seed must be an integer, got 'x'"),
    ],
)
def test_wrong_config_values_name_the_key_and_what_is_expected(sections, message):
    with pytest.raises(ValueError, match=message):
        ex_maest.check_config(default_config(**sections))


def test_every_wrong_key_is_listed_at_once():
    with pytest.raises(ValueError, match="invalid configuration") as error:
        ex_maest.check_config(default_config(trainer={"max_epochs": "abc"}, datamodule={"clip_length": "ten"}))
    assert "trainer.max_epochs must be" in str(error.value) and "datamodule.clip_length must be" in str(error.value)


def run(command, named_configs=(), updates=None):
    return ex.run(command, named_configs=list(named_configs), config_updates=updates or {}, options={"--loglevel": "ERROR"})


@pytest.mark.parametrize("command", ["main", "test", "predict", "extract_embeddings"])
def test_commands_refuse_wrong_types_before_any_work(tmp_path, command):
    updates = {"synthetic_data": {"out_dir": str(tmp_path / "data")}, "trainer": {"max_epochs": "abc"}, "predict": {"top_k": -1}}
    with pytest.raises(ValueError, match=r"(?s)predict.top_k must be an integer, at least 1, got -1.*trainer.max_epochs must be"):
        run(command, ["demo"], updates)
    assert not (tmp_path / "data").exists()  # the demo data was not even generated


def test_print_config_still_shows_a_wrong_config():
    assert run("print_config", updates={"predict": {"top_k": -1}}).status == "COMPLETED"


def demo_updates(tmp_path, **changes):
    updates = {"synthetic_data": {"out_dir": str(tmp_path / "data")}, "trainer": {"default_root_dir": str(tmp_path / "train")}}
    for section, values in changes.items():
        updates[section] = {**updates.get(section, {}), **values}
    return updates


@pytest.mark.parametrize("named", [["demo"], ["demo", "mini_train"]])
def test_training_refuses_a_clip_that_patchout_empties_before_reading_data(tmp_path, named):
    # demo: input_t=312 with s_patchout_t=6; a 0.6 s clip (37 frames) has 3 time columns.
    updates = demo_updates(tmp_path, datamodule={"clip_length": 0.6})
    with pytest.raises(
        ValueError,
        match=r"datamodule.clip_length=0.6 s with maest.input_t=312: structured time patchout s_patchout_t=6 removes all 3 time columns "
        r"of this 37-frame input .*use a longer datamodule.clip_length or a smaller maest.s_patchout_t \(at most 2\)",
    ):
        run("main", named, updates)
    assert not (tmp_path / "data").exists() and not (tmp_path / "train").exists()


def test_training_refuses_a_clip_longer_than_the_time_embeddings(tmp_path):
    updates = demo_updates(tmp_path, datamodule={"clip_length": 10})
    with pytest.raises(
        ValueError,
        match=r"datamodule.clip_length=10 s gives 625-frame training clips, longer than the time embeddings of maest.input_t=312 "
        r"allow \(316 frames at most\): set maest.input_t=625 .* or datamodule.clip_length=4.992 or less",
    ):
        run("main", ["demo"], updates)
    assert not (tmp_path / "data").exists()


def test_training_refuses_unstructured_patchout_of_every_patch(tmp_path):
    updates = demo_updates(tmp_path, maest={"s_patchout_t": 0, "s_patchout_f": 0, "u_patchout": 200}, datamodule={"clip_length": 1})
    with pytest.raises(ValueError, match=r"u_patchout=200 removes all 45 patches left of this 62-frame input"):
        run("main", ["demo"], updates)


# ----------------------------------------------------------------------------------- prediction arguments
def test_predict_files_refuses_bad_top_k_and_batch_size_before_reading(model, tmp_path):
    missing = tmp_path / "not-read.wav"  # never opened: the arguments are checked first
    for kwargs, message in (({"top_k": -1}, r"top_k \(predict.top_k, labels per file\) must be an integer >= 1, got -1"),
                            ({"top_k": 2.0}, r"top_k .* must be an integer >= 1, got 2.0"),
                            ({"batch_size": 0}, r"batch_size \(predict.batch_size, clips per forward pass\) must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            predict_files(model, [missing], LABELS, n_frames=N_FRAMES, progress=False, **kwargs)


def test_track_probabilities_refuses_integer_audio_and_a_zero_batch(model):
    pcm = (np.random.default_rng(0).normal(0, 0.1, 32000) * 32767).astype(np.int16)
    with pytest.raises(TypeError, match=r"track 0 is torch.int16: divide integer PCM by its full scale"):
        track_probabilities(model, [torch.from_numpy(pcm)], N_FRAMES)
    with pytest.raises(TypeError, match=r"track 0 is torch.complex64"):
        track_probabilities(model, [torch.zeros(32000, dtype=torch.complex64)], N_FRAMES)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        track_probabilities(model, [torch.zeros(32000)], N_FRAMES, batch_size=0)
    probs64 = track_probabilities(model, [torch.from_numpy(pcm / 32768.0)], N_FRAMES)[0]  # float64 audio is fine
    probs32 = track_probabilities(model, [torch.from_numpy((pcm / 32768.0).astype(np.float32))], N_FRAMES)[0]
    torch.testing.assert_close(probs64, probs32)


# ----------------------------------------------------------------------------------- truncated audio
def write_truncated_wav(path, header_seconds=6.0, data_seconds=2.0, sample_rate=16000):
    """A 16-bit PCM WAV whose header promises ``header_seconds`` but which holds ``data_seconds``."""
    full = path.with_name("full-" + path.name)
    sf.write(full, np.random.default_rng(0).normal(0, 0.1, int(header_seconds * sample_rate)).astype(np.float32), sample_rate, subtype="PCM_16")
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: 44 + int(data_seconds * sample_rate) * 2])
    return path


def test_a_truncated_wav_is_an_error_naming_the_file(tmp_path):
    path = write_truncated_wav(tmp_path / "cut.wav")
    assert sf.info(path).frames == 32000  # soundfile alone reads 2 s without a word
    with pytest.raises(AudioLoadError, match=rf"audio file {path} is truncated: its header says 6.00 s, the file holds 2.00 s; download it again or export it again from its source"):
        load_audio(path)


def test_complete_wavs_of_other_layouts_still_load(tmp_path):
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (8000, 2)).astype(np.float32)
    # 24-bit stereo with a LIST chunk (odd-sized, padded) before the data chunk
    sf.write(tmp_path / "plain.wav", x, 16000, subtype="PCM_24")
    data = (tmp_path / "plain.wav").read_bytes()
    fmt_end = 12 + 8 + int.from_bytes(data[16:20], "little")
    info = b"LIST" + (5).to_bytes(4, "little") + b"INFOx" + b"\0"
    (tmp_path / "list.wav").write_bytes(data[:4] + (len(data) - 8 + len(info)).to_bytes(4, "little") + data[8:fmt_end] + info + data[fmt_end:])
    # a streamed WAV: sizes left at 0xFFFFFFFF ("unknown")
    streamed = bytearray(data)
    streamed[4:8] = b"\xff\xff\xff\xff"
    data_at = streamed.index(b"data")
    streamed[data_at + 4 : data_at + 8] = b"\xff\xff\xff\xff"
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    expected = load_audio(tmp_path / "plain.wav")
    assert expected.shape == (8000,)
    for name in ("list.wav", "streamed.wav"):
        np.testing.assert_array_equal(load_audio(tmp_path / name), expected)


def test_predict_lists_a_truncated_wav_as_failed_and_exits_non_zero(model, tmp_path, capsys):
    folder = tmp_path / "music"
    folder.mkdir()
    sf.write(folder / "good.wav", np.random.default_rng(2).normal(0, 0.1, 48000).astype(np.float32), 16000)
    write_truncated_wav(folder / "cut.wav")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    out = tmp_path / "p.json"
    updates = {
        "maest": {"arch": "maest-tiny", "checkpoint": str(checkpoint), "n_classes": N_CLASSES, "input_t": N_FRAMES},
        "datamodule": {"clip_length": 2},
        "predict": {"device": "cpu", "audio": [str(folder)], "labels_file": str(labels), "output": str(out)},
    }
    with pytest.raises(SystemExit) as exit_info:
        run("predict", updates=updates)
    assert exit_info.value.code == 1
    assert [r["file"] for r in json.loads(out.read_text())] == [str(folder / "good.wav")]
    assert f"FAILED {folder / 'cut.wav'}: audio file {folder / 'cut.wav'} is truncated: its header says 6.00 s" in capsys.readouterr().err


def test_output_paths_that_cannot_be_written_name_the_key_before_any_work(tmp_path, monkeypatch):
    import helpers.files
    from helpers.files import output_dir, output_file

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"predict.out_dir={a_file} is a file, and the command writes a folder there"):
        output_dir(a_file, "predict.out_dir")
    with pytest.raises(NotADirectoryError, match=rf"export.out_dir={a_file / 'sub' / 'x'}: {a_file} is a file, so the folder cannot be created there"):
        output_dir(a_file / "sub" / "x", "export.out_dir")
    with pytest.raises(IsADirectoryError, match=rf"norm_stats_out={tmp_path} is a folder, and the command writes a file there"):
        output_file(tmp_path, "norm_stats_out")
    assert output_file(tmp_path / "new" / "stats.json", "norm_stats_out") == tmp_path / "new" / "stats.json"
    assert not (tmp_path / "new").exists()  # checked, not created: a command refused later leaves nothing behind
    monkeypatch.setattr(helpers.files.os, "access", lambda path, mode: False)  # a read-only folder (root ignores modes)
    with pytest.raises(PermissionError, match=rf"predict.out_dir={tmp_path}: no permission to write into this folder"):
        output_dir(tmp_path, "predict.out_dir")
    with pytest.raises(PermissionError, match=rf"predict.out_dir={tmp_path / 'a' / 'b'}: no permission to write in {tmp_path}, where the folder would be created"):
        output_dir(tmp_path / "a" / "b", "predict.out_dir")


@pytest.mark.parametrize("command, section, key", [
    ("extract_embeddings", "predict", "out_dir"), ("export_onnx", "export", "out_dir"), ("main", "trainer", "default_root_dir"),
])
def test_commands_refuse_an_output_folder_that_is_a_file(tmp_path, command, section, key):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    updates = demo_updates(tmp_path, **{section: {key: str(a_file)}}, maest={"allow_random_weights": True})
    with pytest.raises(NotADirectoryError, match=rf"{section}.{key}={a_file} is a file"):
        run(command, ["demo"], {**updates, "inference_checkpoint": None})


def test_sacred_notices_about_trainer_arguments_are_dropped_others_kept(caplog):
    with caplog.at_level(logging.WARNING):
        ex.run("print_config", named_configs=["demo", "mini_train"], config_updates={"trainer": {"devices": 1}, "maest": {"fused_attention": 0}},
               options={"--loglevel": "WARNING"})
    assert "limit_train_batches" not in caplog.text  # any Lightning Trainer argument is a trainer key (SPEC §4)
    assert 'Changed type of config entry "devices"' not in caplog.text  # "auto" or a count: both Lightning's
    assert 'Changed type of config entry "fused_attention" from bool to int' in caplog.text  # another key's notice stays


def test_a_mel_without_its_batch_axis_and_raw_audio_each_get_their_fix(model):
    n_mels = model.config.input_f
    with pytest.raises(ValueError, match=rf"got \({n_mels}, 100\); add a batch axis first \(mel\[None\]\)"):
        model(torch.zeros(n_mels, 100))
    with pytest.raises(ValueError, match=r"got \(2, 16000\); raw audio goes through models.mel.MelSpectrogram first"):
        model(torch.zeros(2, 16000))
    assert model(torch.zeros(n_mels, 100)[None]).shape[0] == 1  # the fix works
