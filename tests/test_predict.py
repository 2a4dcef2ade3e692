"""Labelling audio files: helpers.extract.predict_files / write_predictions and the `predict` command."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers.audio import load_audio
from helpers.extract import predict_files, write_predictions
from models import get_maest
from models.inference import track_probabilities

N_FRAMES = 125  # 2 s clips
N_CLASSES = 5
LABELS = ["rock", "jazz", "techno", "folk", "dub"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)


def stereo(seconds: float, seed: int, sample_rate: int = 44100) -> np.ndarray:
    """Noise plus a tone per channel: (samples, 2) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = np.sin(2 * np.pi * (300 + 200 * seed) * t)
    return np.stack([0.3 * tone, 0.2 * tone], axis=1).astype(np.float32) + rng.normal(0, 0.05, (t.size, 2)).astype(np.float32)


@pytest.fixture
def audio_dir(tmp_path):
    """44.1 kHz stereo files: a 3 s wav and a 7 s flac (in a sub-folder)."""
    folder = tmp_path / "music"
    (folder / "sub").mkdir(parents=True)
    sf.write(folder / "short.wav", stereo(3, seed=0), 44100)
    sf.write(folder / "sub" / "long.flac", stereo(7, seed=1), 44100)
    return folder


def expected_probabilities(model, path) -> torch.Tensor:
    return track_probabilities(model, [torch.from_numpy(load_audio(path))], N_FRAMES)[0]


def check_result(model, result, path, top_k):
    probs = expected_probabilities(model, path)
    assert result["file"] == str(path)
    assert len(result["labels"]) == top_k
    got = [item["probability"] for item in result["labels"]]
    assert got == sorted(got, reverse=True)
    order = torch.argsort(probs, descending=True)[:top_k].tolist()
    assert [item["label"] for item in result["labels"]] == [LABELS[i] for i in order]
    np.testing.assert_allclose(got, probs[order].numpy(), atol=1e-6)


def test_predict_files_labels_wav_and_flac_of_different_lengths(model, audio_dir):
    paths = [audio_dir / "sub" / "long.flac", audio_dir / "short.wav"]
    results, failures = predict_files(model, paths, LABELS, n_frames=N_FRAMES, top_k=3, progress=False)

    assert failures == {}
    assert [r["file"] for r in results] == sorted(map(str, paths))
    by_file = {r["file"]: r for r in results}
    assert by_file[str(audio_dir / "short.wav")]["seconds"] == 3.0
    assert by_file[str(audio_dir / "sub" / "long.flac")]["seconds"] == 7.0
    for path in paths:
        check_result(model, by_file[str(path)], path, top_k=3)
    # the two tracks are not averaged together
    assert by_file[str(paths[0])]["labels"] != by_file[str(paths[1])]["labels"]


def test_a_file_shorter_than_one_patch_is_labelled_with_a_warning(model, tmp_path, caplog):
    sf.write(tmp_path / "blip.wav", stereo(0.1, seed=2), 44100)  # 0.1 s: 7 frames, fewer than a 16-frame patch
    sf.write(tmp_path / "ok.wav", stereo(0.3, seed=3), 44100)  # 0.3 s: 19 frames
    with caplog.at_level(logging.WARNING, logger="helpers.extract"):
        results, failures = predict_files(model, tmp_path, LABELS, n_frames=N_FRAMES, progress=False)

    assert failures == {} and [r["file"] for r in results] == [str(tmp_path / "blip.wav"), str(tmp_path / "ok.wav")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{tmp_path / 'blip.wav'} is 0.100 s long, shorter than one 16-frame patch (0.24 s): it is zero-padded to a clip, "
        "so the model sees mostly silence and its labels say little"
    ]


def test_a_folder_expands_to_its_audio_files(model, audio_dir):
    (audio_dir / "notes.txt").write_text("not audio, not listed")
    results, failures = predict_files(model, audio_dir, LABELS, n_frames=N_FRAMES, top_k=10, progress=False)

    assert failures == {}
    assert [r["file"] for r in results] == [str(audio_dir / "short.wav"), str(audio_dir / "sub" / "long.flac")]
    assert all(len(r["labels"]) == N_CLASSES for r in results)  # top_k beyond n_classes: every label
    check_result(model, results[1], audio_dir / "sub" / "long.flac", top_k=N_CLASSES)


def test_an_unreadable_file_is_reported_and_the_others_predicted(model, audio_dir):
    broken = audio_dir / "broken.wav"
    broken.write_bytes(b"RIFF" + bytes(range(200)))
    results, failures = predict_files(model, [audio_dir], LABELS, n_frames=N_FRAMES, progress=False)

    assert list(failures) == [str(broken)]
    assert "cannot decode audio file" in failures[str(broken)]
    assert [r["file"] for r in results] == [str(audio_dir / "short.wav"), str(audio_dir / "sub" / "long.flac")]


@pytest.mark.parametrize("hop", [0, -5, N_FRAMES + 1])
def test_a_hop_outside_one_to_a_clip_is_refused_before_any_file_is_read(model, audio_dir, hop):
    with pytest.raises(ValueError, match=rf"hop_frames must be between 1 and the clip's {N_FRAMES} frames .*got {hop}"):
        predict_files(model, [audio_dir], LABELS, n_frames=N_FRAMES, hop_frames=hop, progress=False)


def test_a_missing_path_is_listed_and_every_other_file_labelled(model, audio_dir, tmp_path):
    missing = tmp_path / "nope" / "does_not_exist.wav"
    paths = [audio_dir / "short.wav", missing, tmp_path / "gone_folder", audio_dir / "sub" / "long.flac"]

    results, failures = predict_files(model, paths, LABELS, n_frames=N_FRAMES, progress=False)

    assert [r["file"] for r in results] == [str(audio_dir / "short.wav"), str(audio_dir / "sub" / "long.flac")]
    assert failures == {
        str(missing): f"{missing} does not exist: check the path",
        str(tmp_path / "gone_folder"): f"{tmp_path / 'gone_folder'} does not exist: check the path",
    }


def test_predict_files_argument_errors(model, audio_dir, tmp_path):
    with pytest.raises(ValueError, match="2 label names for a model with 5 outputs"):
        predict_files(model, [audio_dir], ["a", "b"], n_frames=N_FRAMES, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        predict_files(model, [tmp_path / "empty"], LABELS, n_frames=N_FRAMES, progress=False)
    # Nothing exists at all: an error at once (one missing path among others is a listed failure).
    with pytest.raises(FileNotFoundError, match=r"no audio files .* found in .*; .*nope\.mp3 does not exist: check the path"):
        predict_files(model, [tmp_path / "nope.mp3"], LABELS, n_frames=N_FRAMES, progress=False)
    with pytest.raises(ValueError, match="clips of 625 frames do not fit this model"):
        predict_files(model, [audio_dir], LABELS, n_frames=625, progress=False)


# ----------------------------------------------------------------------------------- writing
RESULTS = [
    {"file": "a.wav", "seconds": 3.0, "labels": [{"label": "rock", "probability": 0.9}, {"label": "jazz", "probability": 0.25}]},
    {"file": "b c.flac", "seconds": 7.0, "labels": [{"label": "dub", "probability": 0.5}, {"label": "folk", "probability": 0.125}]},
]


def test_write_predictions_json(tmp_path):
    out = tmp_path / "deep" / "p.json"
    assert write_predictions(RESULTS, out) is None
    assert json.loads(out.read_text()) == RESULTS
    assert json.loads(write_predictions(RESULTS, None)) == RESULTS  # None: the JSON text


def test_write_predictions_tsv(tmp_path):
    out = tmp_path / "p.tsv"
    write_predictions(RESULTS, out)

    rows = list(csv.reader(out.read_text().splitlines(), delimiter="\t"))
    assert rows == [
        ["file", "rank", "label", "probability"],
        ["a.wav", "1", "rock", "0.900000"],
        ["a.wav", "2", "jazz", "0.250000"],
        ["b c.flac", "1", "dub", "0.500000"],
        ["b c.flac", "2", "folk", "0.125000"],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tsv"]  # no temporary file left


def test_write_predictions_rejects_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"predict.output must end in .json or .tsv, got .*p\.csv"):
        write_predictions(RESULTS, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


# ----------------------------------------------------------------------------------- the command
@pytest.fixture
def checkpoint(model, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def labels_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n\n")  # a trailing blank line is not a label
    return path


def command_updates(checkpoint, **predict):
    return {
        "maest": {"arch": "maest-tiny", "checkpoint": str(checkpoint), "n_classes": N_CLASSES, "input_t": N_FRAMES},
        "datamodule": {"clip_length": 2},
        "predict": {"device": "cpu", "precision": "fp32", "num_workers": 0, **predict},
    }


def test_predict_command_writes_the_tsv(model, audio_dir, checkpoint, labels_file, tmp_path):
    from ex_maest import ex

    out = tmp_path / "x.tsv"
    paths = [str(audio_dir / "short.wav"), str(audio_dir / "sub")]
    updates = command_updates(checkpoint, audio=paths, labels_file=str(labels_file), output=str(out), top_k=2)
    run = ex.run("predict", config_updates=updates, options={"--loglevel": "ERROR"})

    assert run.status == "COMPLETED"
    rows = list(csv.reader(out.read_text().splitlines(), delimiter="\t"))
    assert rows[0] == ["file", "rank", "label", "probability"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        (str(audio_dir / "short.wav"), "1"), (str(audio_dir / "short.wav"), "2"),
        (str(audio_dir / "sub" / "long.flac"), "1"), (str(audio_dir / "sub" / "long.flac"), "2"),
    ]
    probs = expected_probabilities(model, audio_dir / "sub" / "long.flac")  # the checkpoint's weights were used
    top = torch.argsort(probs, descending=True)[:2].tolist()
    assert [r[2] for r in rows[3:]] == [LABELS[i] for i in top]
    np.testing.assert_allclose([float(r[3]) for r in rows[3:]], probs[top].numpy(), atol=2e-6)
    assert run.result[0]["file"] == str(audio_dir / "short.wav")


def test_predict_command_exits_non_zero_on_an_unreadable_file(audio_dir, checkpoint, labels_file, tmp_path, capsys):
    from ex_maest import ex

    (audio_dir / "broken.flac").write_bytes(b"fLaC" + bytes(100))
    out = tmp_path / "x.json"
    updates = command_updates(checkpoint, audio=[str(audio_dir)], labels_file=str(labels_file), output=str(out))
    with pytest.raises(SystemExit) as exit_info:
        ex.run("predict", config_updates=updates, options={"--loglevel": "ERROR"})

    assert exit_info.value.code == 1
    assert [r["file"] for r in json.loads(out.read_text())] == [str(audio_dir / "short.wav"), str(audio_dir / "sub" / "long.flac")]
    assert f"FAILED {audio_dir / 'broken.flac'}" in capsys.readouterr().err


def test_predict_command_lists_a_missing_path_and_labels_the_others(audio_dir, checkpoint, labels_file, tmp_path, capsys):
    # The stranger's command: predict.audio=["a.wav", "nope/does_not_exist.wav", "b.wav"].
    from ex_maest import ex

    missing = tmp_path / "nope" / "does_not_exist.wav"
    out = tmp_path / "x.json"
    audio = [str(audio_dir / "short.wav"), str(missing), str(audio_dir / "sub" / "long.flac")]
    updates = command_updates(checkpoint, audio=audio, labels_file=str(labels_file), output=str(out))
    with pytest.raises(SystemExit) as exit_info:
        ex.run("predict", config_updates=updates, options={"--loglevel": "ERROR"})

    assert exit_info.value.code == 1
    assert [r["file"] for r in json.loads(out.read_text())] == [audio[0], audio[2]]
    assert (tmp_path / "failed-predict.txt").read_text() == f"{missing}\t{missing} does not exist: check the path\n"
    err = capsys.readouterr().err
    assert f"FAILED {missing}: {missing} does not exist" in err and "1 audio file(s) skipped" in err


def test_predict_command_configuration_errors(audio_dir, checkpoint, labels_file, tmp_path):
    from ex_maest import ex

    def run(**predict):
        return ex.run("predict", config_updates=command_updates(checkpoint, **predict), options={"--loglevel": "ERROR"})

    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="3 label names for a model with 5 outputs: set predict.labels_file"):
        run(audio=[str(audio_dir)], labels_file=str(three))
    with pytest.raises(FileNotFoundError, match=r"predict.labels_file=.*missing.txt' does not exist"):
        run(audio=[str(audio_dir)], labels_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="set predict.audio"):
        run(audio=[], labels_file=str(labels_file))
    with pytest.raises(ValueError, match="predict.hop must be 'full'"):
        run(audio=[str(audio_dir)], labels_file=str(labels_file), hop="third")


# ----------------------------------------------------------------------------------- batching, workers, precision
def test_clips_of_several_files_share_a_forward_pass_and_workers_decode(model, audio_dir, monkeypatch):
    from tests.builders import count_loader_iterations

    iterations = count_loader_iterations(monkeypatch)
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        results, failures = predict_files(model, audio_dir, LABELS, n_frames=N_FRAMES, top_k=5, num_workers=1, progress=False)
    finally:
        handle.remove()

    assert failures == {}
    assert calls == [2 + 4]  # 3 s: 2 clips, 7 s: 4 clips, one batch (per file it took two)
    assert iterations == [1]  # the worker started once (tqdm.auto iterated the loader once more when built)
    for result, path in zip(results, [audio_dir / "short.wav", audio_dir / "sub" / "long.flac"]):
        check_result(model, result, path, top_k=5)  # equal to the per-file path (atol 1e-6)


def test_a_bad_file_among_batched_ones_is_listed_and_the_others_predicted(model, audio_dir):
    broken = audio_dir / "a-broken.wav"  # first in order: the batch after it still runs
    broken.write_bytes(b"RIFF" + bytes(range(200)))
    sf.write(audio_dir / "z-tiny.wav", np.zeros(8, dtype=np.float32), 16000)  # 8 samples: one centre-padded clip
    results, failures = predict_files(model, audio_dir, LABELS, n_frames=N_FRAMES, batch_size=3, num_workers=1, progress=False)

    assert list(failures) == [str(broken)] and "cannot decode audio file" in failures[str(broken)]
    assert [r["file"] for r in results] == [str(audio_dir / p) for p in ("short.wav", "sub/long.flac", "z-tiny.wav")]
    for result in results:
        check_result(model, result, result["file"], top_k=5)


def test_bf16_prediction_is_close_to_fp32(model, audio_dir):
    import copy

    bf16 = copy.deepcopy(model)  # prepared in place
    results, _ = predict_files(bf16, audio_dir, LABELS, n_frames=N_FRAMES, top_k=5, precision="bf16", progress=False)

    assert next(bf16.parameters()).dtype == torch.bfloat16
    for result in results:
        expected = expected_probabilities(model, result["file"])
        got = {item["label"]: item["probability"] for item in result["labels"]}
        np.testing.assert_allclose([got[label] for label in LABELS], expected.numpy(), atol=2e-2)
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        predict_files(model, audio_dir, LABELS, n_frames=N_FRAMES, precision="fp16", progress=False)


def test_predict_interrupted_mid_run_writes_nothing(audio_dir, checkpoint, labels_file, tmp_path, monkeypatch):
    """README: predict writes its output once every file is labelled, so a Ctrl-C keeps nothing (no partial file)."""
    import helpers.extract
    from ex_maest import ex

    calls, original = [], helpers.extract.track_probabilities

    def interrupted_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(helpers.extract, "track_probabilities", interrupted_at_the_second_batch)
    out = tmp_path / "x.tsv"
    updates = command_updates(checkpoint, audio=[str(audio_dir)], labels_file=str(labels_file), output=str(out), batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        ex.run("predict", config_updates=updates, options={"--loglevel": "ERROR"})
    assert len(calls) == 2  # the first batch was labelled
    assert not out.exists() and not list(tmp_path.glob("failed-predict*"))


def test_predict_says_it_runs_in_one_process(audio_dir, checkpoint, labels_file, tmp_path, caplog):
    from ex_maest import ex

    out = tmp_path / "x.json"
    updates = command_updates(checkpoint, audio=[str(audio_dir)], labels_file=str(labels_file), output=str(out), devices=2)
    with caplog.at_level(logging.WARNING, logger="ex_maest"):
        assert ex.run("predict", config_updates=updates, options={"--loglevel": "ERROR"}).status == "COMPLETED"
    assert "predict runs in one process on predict.device: predict.devices=2" in caplog.text and out.is_file()
