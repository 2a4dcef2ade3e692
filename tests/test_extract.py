"""helpers/extract.py and the extract_embeddings / extract_logits commands (SPEC §7)."""

from __future__ import annotations

import copy
import copy
import json
import os

import numpy as np
import pytest
import torch

from helpers.extract import ExtractionReport, extract, output_path, weights_digest
from helpers.melfiles import save_groundtruth, write_mel
from models import get_maest
from models.mel import N_MELS, normalize

N_FRAMES = 125  # 2 s clips: n_frames_for(2)
N_CLASSES = 5
EMBED_DIM = 64
# frames per file: 1.5 clips, exactly 2 clips, shorter than a clip, 2.4 clips (nested key, .npy)
LENGTHS = {"a/one-and-a-half.mmap": 187, "a/two.mmap": 250, "short.mmap": 40, "b/c/long.npy": 300}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)


@pytest.fixture
def data(tmp_path):
    """Mel files of LENGTHS under tmp_path/mels and a ground truth listing them; returns (base_dir, gt path, mels)."""
    rng = np.random.default_rng(0)
    base = tmp_path / "mels"
    mels = {}
    for key, frames in LENGTHS.items():
        mel = rng.uniform(0.0, 4.0, size=(frames, N_MELS)).astype(np.float16)  # compressed mel range
        write_mel(base / key, mel)
        mels[key] = mel.astype(np.float32)  # what the reader gives back
    gt = save_groundtruth(tmp_path / "gt.pk", {k: np.zeros(N_CLASSES, dtype=bool) for k in LENGTHS})
    return base, gt, mels


def run_extract(model, data, out_dir, **kwargs):
    base, gt, _ = data
    return extract(model, base_dir=base, groundtruth=gt, out_dir=out_dir, n_frames=N_FRAMES, progress=False, **kwargs)


def as_input(clip: np.ndarray) -> torch.Tensor:
    """A stored (frames, n_mels) clip -> the model input (1, n_mels, frames), normalised."""
    return torch.from_numpy(np.ascontiguousarray(normalize(clip).T))[None]


def files_under(folder):
    """Every file under ``folder`` but its lock file (``.lock`` of ``helpers.files.folder_lock``, kept on purpose)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ".lock")


# ----------------------------------------------------------------------------------- outputs
def test_embeddings_are_the_model_embeddings_of_every_clip_tail_included(model, data, tmp_path):
    out = tmp_path / "out"
    report = run_extract(model, data, out, kind="embeddings", block=1, batch_size=1)
    mels = data[2]

    assert isinstance(report, ExtractionReport)
    assert sorted(report.written) == sorted(LENGTHS) and not report.skipped and not report.failed
    expected_starts = {"a/one-and-a-half.mmap": [0, 62], "a/two.mmap": [0, 125], "b/c/long.npy": [0, 125, 175]}
    for key, starts in expected_starts.items():
        emb = np.load(out / f"{key}.embeddings.npy")
        assert emb.shape == (len(starts), 3, EMBED_DIM) and emb.dtype == np.float32
        clips = torch.cat([as_input(mels[key][s : s + N_FRAMES]) for s in starts])
        with torch.no_grad():
            expected = model.embeddings(clips, block=1).numpy()
        np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
    # The tail clip of 1.5 clips is end-aligned: it holds the last frame.
    assert expected_starts["a/one-and-a-half.mmap"][-1] + N_FRAMES == LENGTHS["a/one-and-a-half.mmap"]


def test_a_file_shorter_than_a_clip_is_centre_padded_with_silence(model, data, tmp_path):
    out = tmp_path / "out"
    run_extract(model, data, out, kind="embeddings", block=1)
    padded = np.zeros((N_FRAMES, N_MELS), dtype=np.float32)
    padded[42:82] = data[2]["short.mmap"]  # 85 frames of padding: 42 before, 43 after
    with torch.no_grad():
        expected = model.embeddings(as_input(padded), block=1).numpy()

    emb = np.load(out / "short.mmap.embeddings.npy")
    assert emb.shape == (1, 3, EMBED_DIM)
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)


def test_another_block_gives_other_embeddings(model, data, tmp_path):
    run_extract(model, data, tmp_path / "b0", kind="embeddings", block=0)
    run_extract(model, data, tmp_path / "b1", kind="embeddings", block=1)
    key = "b/c/long.npy.embeddings.npy"
    b0, b1 = np.load(tmp_path / "b0" / key), np.load(tmp_path / "b1" / key)

    assert b0.shape == b1.shape == (3, 3, EMBED_DIM)
    assert not np.allclose(b0, b1, atol=1e-3)


def test_logits_are_the_model_outputs(model, data, tmp_path):
    out = tmp_path / "out"
    report = run_extract(model, data, out, kind="logits", batch_size=2)
    mels = data[2]["b/c/long.npy"]

    assert len(report.written) == len(LENGTHS)
    logits = np.load(output_path(out, "b/c/long.npy", "logits"))
    assert output_path(out, "b/c/long.npy", "logits") == out / "b/c/long.npy.logits.npy"
    clips = torch.cat([as_input(mels[s : s + N_FRAMES]) for s in (0, 125, 175)])
    with torch.no_grad():
        expected = model(clips).numpy()
    assert logits.shape == (3, N_CLASSES) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert not list(out.rglob("*.embeddings.npy"))


def test_half_overlapping_hop_gives_the_expected_clips(model, data, tmp_path):
    out = tmp_path / "out"
    run_extract(model, data, out, kind="logits", hop_frames=N_FRAMES // 2)
    counts = {key: np.load(out / f"{key}.logits.npy").shape[0] for key in LENGTHS}

    # 187: 0, 62 | 250: 0, 62, 124, 125 | 40: padded | 300: 0, 62, 124, 175
    assert counts == {"a/one-and-a-half.mmap": 2, "a/two.mmap": 4, "short.mmap": 1, "b/c/long.npy": 4}
    mel = data[2]["a/two.mmap"]
    with torch.no_grad():
        last = model(as_input(mel[125:250])).numpy()
    np.testing.assert_allclose(np.load(out / "a/two.mmap.logits.npy")[-1:], last, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- resuming, failures
def test_a_rerun_skips_finished_files(model, data, tmp_path):
    out = tmp_path / "out"
    run_extract(model, data, out, kind="embeddings", block=1)
    path = out / "a/two.mmap.embeddings.npy"
    os.utime(path, (1_000_000, 1_000_000))  # mark it: a rewrite would change the time

    report = run_extract(model, data, out, kind="embeddings", block=1)

    assert report.written == [] and sorted(report.skipped) == sorted(LENGTHS) and report.failed == {}
    assert path.stat().st_mtime == 1_000_000
    assert "0 written, 4 already present, 0 failed" in report.summary()


def test_bad_files_are_reported_and_the_others_extracted(model, data, tmp_path):
    base, gt, _ = data
    truncated = base / "a/two.mmap"
    truncated.write_bytes(truncated.read_bytes()[:-7])  # not a whole number of frames
    nan_mel = np.full((150, N_MELS), np.nan, dtype="<f2")
    nan_mel.tofile(base / "nan.mmap")  # write_mel refuses NaN: write the raw bytes
    keys = [*LENGTHS, "nan.mmap", "missing.mmap"]
    save_groundtruth(gt, {k: np.zeros(N_CLASSES, dtype=bool) for k in keys})
    out = tmp_path / "out"

    report = run_extract(model, data, out, kind="embeddings", block=1)

    assert sorted(report.failed) == ["a/two.mmap", "missing.mmap", "nan.mmap"]
    assert "not a whole number of 96-band float16 frames" in report.failed["a/two.mmap"]
    assert "NaN or inf" in report.failed["nan.mmap"] and "does not exist" in report.failed["missing.mmap"]
    assert sorted(report.written) == ["a/one-and-a-half.mmap", "b/c/long.npy", "short.mmap"]
    assert not (out / "a/two.mmap.embeddings.npy").exists() and not (out / "nan.mmap.embeddings.npy").exists()
    listed = dict(line.split("\t", 1) for line in (out / "failed-embeddings.txt").read_text().splitlines())
    assert sorted(listed) == sorted(report.failed)
    assert report.as_dict()["failed"] == report.failed and report.as_dict()["written"] == 3
    # The summary counts; the FAILED lines are the command's, printed once on stderr (format_failures).
    assert report.summary() == f"embeddings: 3 written, 0 already present, 3 failed (in {out / 'failed-embeddings.txt'}) -> {out}"

    # Once a file is repaired, a rerun extracts only it and drops its entry from the failure list;
    # the entries of keys this run did not try (not in its ground truth) stay (SPEC §8).
    write_mel(truncated, data[2]["a/two.mmap"])
    save_groundtruth(gt, {k: np.zeros(N_CLASSES, dtype=bool) for k in LENGTHS})
    again = run_extract(model, data, out, kind="embeddings", block=1)
    assert again.written == ["a/two.mmap"] and len(again.skipped) == 3 and not again.failed
    listed = dict(line.split("\t", 1) for line in (out / "failed-embeddings.txt").read_text().splitlines())
    assert sorted(listed) == ["missing.mmap", "nan.mmap"]


def test_atomic_writes_leave_no_temporary_files(model, data, tmp_path):
    out = tmp_path / "out"
    run_extract(model, data, out, kind="embeddings", block=1)
    run_extract(model, data, out, kind="logits")

    expected = ["config.json"] + sorted(f"{k}.{kind}.npy" for k in LENGTHS for kind in ("embeddings", "logits"))
    assert files_under(out) == sorted(expected)


# ----------------------------------------------------------------------------------- run record
def test_config_json_records_the_setting(model, data, tmp_path):
    out = tmp_path / "out"
    info = {"arch": "maest-tiny", "checkpoint": tmp_path / "model.pt", "clip_length": 2, "hop": "half"}
    run_extract(model, data, out, kind="embeddings", block=-1, hop_frames=62, run_info=info)

    config = json.loads((out / "config.json").read_text())
    assert config == {
        "arch": "maest-tiny",
        "checkpoint": str(tmp_path / "model.pt"),
        "clip_length": 2,
        "hop": "half",
        "block": 1,  # -1 is stored as the 0-based block it means
        "n_frames": N_FRAMES,
        "hop_frames": 62,
        "embed_dim": EMBED_DIM,
        "n_classes": N_CLASSES,
        "precision": "fp32",
    }
    # The same setting again (a Path compares equal to its stored text) resumes without complaint.
    report = run_extract(model, data, out, kind="embeddings", block=1, hop_frames=62, run_info=info)
    assert len(report.skipped) == len(LENGTHS)
    # Logits into the same folder: the block does not apply to them.
    run_extract(model, data, out, kind="logits", hop_frames=62, run_info=info)
    assert json.loads((out / "config.json").read_text())["block"] == 1


def test_another_setting_in_the_same_folder_is_refused(model, data, tmp_path):
    out = tmp_path / "out"
    run_extract(model, data, out, kind="embeddings", block=1, run_info={"checkpoint": "a.ckpt"})
    before = files_under(out)

    with pytest.raises(ValueError, match=r"holds outputs of another setting \(block: 1 there, 0 now\).*predict.out_dir"):
        run_extract(model, data, out, kind="embeddings", block=0, run_info={"checkpoint": "a.ckpt"})
    with pytest.raises(ValueError, match=r"another setting \(checkpoint: 'a.ckpt' there, 'b.ckpt' now\)"):
        run_extract(model, data, out, kind="logits", run_info={"checkpoint": "b.ckpt"})
    with pytest.raises(ValueError, match="hop_frames: 125 there, 62 now"):
        run_extract(model, data, out, kind="embeddings", block=1, hop_frames=62, run_info={"checkpoint": "a.ckpt"})
    assert files_under(out) == before


def test_the_same_weights_by_another_path_are_one_setting_other_weights_are_not(model, data, tmp_path):
    out = tmp_path / "out"
    same = {"checkpoint": "outputs/x/train/checkpoints/last.ckpt", "weights": weights_digest(model)}
    run_extract(model, data, out, kind="embeddings", block=1, run_info=same)
    # The same file by its absolute path (or from another working directory): the same setting.
    run_extract(model, data, out, kind="embeddings", block=1, run_info={**same, "checkpoint": "/abs/outputs/x/train/checkpoints/last.ckpt"})
    assert json.loads((out / "config.json").read_text())["checkpoint"] == same["checkpoint"]  # as first recorded
    retrained = copy.deepcopy(model)  # retrained in place: the same path, other weights
    with torch.no_grad():
        retrained.head[1].bias.add_(1e-3)
    with pytest.raises(ValueError, match=r"another setting \(weights: 'sha256:[0-9a-f]{16}' there, 'sha256:[0-9a-f]{16}' now\)"):
        run_extract(retrained, data, out, kind="embeddings", block=1, run_info={**same, "weights": weights_digest(retrained)})


def test_clip_settings_the_model_cannot_take_are_refused_up_front(model, data, tmp_path):
    with pytest.raises(ValueError, match=r"clips of 200 frames do not fit this model: it takes 16 to 126 frames"):
        extract(model, base_dir=data[0], groundtruth=data[1], out_dir=tmp_path / "o", n_frames=200, progress=False)
    with pytest.raises(ValueError, match=r"hop_frames must be between 1 and the clip's 125 frames"):
        run_extract(model, data, tmp_path / "o", hop_frames=130)
    with pytest.raises(ValueError, match=r"kind must be one of \['embeddings', 'logits', 'timestamps'\]"):
        run_extract(model, data, tmp_path / "o", kind="tokens")
    with pytest.raises(ValueError, match=r"block must be an integer in \[0, 1\]"):
        run_extract(model, data, tmp_path / "o", block=2)
    assert not (tmp_path / "o").exists()


def test_bf16_runs_and_is_close_to_fp32(model, data, tmp_path):
    run_extract(model, data, tmp_path / "fp32", kind="embeddings", block=1)
    bf16_model = copy.deepcopy(model)  # prepared in place: its weights become bf16
    report = run_extract(bf16_model, data, tmp_path / "bf16", kind="embeddings", block=1, precision="bf16")

    assert len(report.written) == len(LENGTHS)
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    for key in LENGTHS:
        a = np.load(tmp_path / "fp32" / f"{key}.embeddings.npy")
        b = np.load(tmp_path / "bf16" / f"{key}.embeddings.npy")
        assert b.dtype == np.float32 and b.shape == a.shape
        scale = np.abs(a).max()
        assert np.abs(a - b).max() < 0.05 * scale
        assert not np.array_equal(a, b)  # bf16 really ran


def test_worker_processes_give_the_same_outputs_and_start_once(model, data, tmp_path, monkeypatch):
    from tests.builders import count_loader_iterations

    iterations = count_loader_iterations(monkeypatch)
    run_extract(model, data, tmp_path / "w0", kind="logits")
    run_extract(model, data, tmp_path / "w1", kind="logits", num_workers=1)
    assert iterations == [0, 1]  # tqdm.auto iterated the loader once more when built: workers started and read twice
    for key in LENGTHS:
        np.testing.assert_array_equal(np.load(tmp_path / "w0" / f"{key}.logits.npy"), np.load(tmp_path / "w1" / f"{key}.logits.npy"))


# ----------------------------------------------------------------------------------- Sacred commands
@pytest.fixture
def checkpoint(model, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def sacred_updates(data, checkpoint, out_dir, **predict):
    base, gt, _ = data
    return {
        "maest": {"arch": "maest-tiny", "checkpoint": str(checkpoint), "n_classes": N_CLASSES, "input_t": N_FRAMES},
        "datamodule": {"base_dir": str(base), "groundtruth_predict": str(gt), "clip_length": 2},
        "predict": {"out_dir": str(out_dir), "transformer_block": 1, "num_workers": 0, "device": "cpu", "precision": "fp32", **predict},
    }


def test_extract_embeddings_command(model, data, checkpoint, tmp_path):
    from ex_maest import ex

    out = tmp_path / "emb"
    run = ex.run("extract_embeddings", config_updates=sacred_updates(data, checkpoint, out), options={"--loglevel": "ERROR"})

    assert run.status == "COMPLETED"
    assert run.result == {"out_dir": str(out), "kind": "embeddings", "written": 4, "skipped": 0, "failed": {}}
    assert files_under(out) == sorted(["config.json", *(f"{k}.embeddings.npy" for k in LENGTHS)])
    mel = data[2]["a/one-and-a-half.mmap"]
    with torch.no_grad():
        expected = model.embeddings(torch.cat([as_input(mel[:125]), as_input(mel[62:])]), block=1).numpy()
    np.testing.assert_allclose(np.load(out / "a/one-and-a-half.mmap.embeddings.npy"), expected, rtol=1e-4, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("arch", "checkpoint", "block", "clip_length", "hop", "n_frames", "hop_frames")} == {
        "arch": "maest-tiny", "checkpoint": str(checkpoint), "block": 1, "clip_length": 2, "hop": "full",
        "n_frames": N_FRAMES, "hop_frames": N_FRAMES,
    }


def test_extract_logits_command_with_half_hop(model, data, checkpoint, tmp_path):
    from ex_maest import ex

    out = tmp_path / "logits"
    run = ex.run("extract_logits", config_updates=sacred_updates(data, checkpoint, out, hop="half"), options={"--loglevel": "ERROR"})

    assert run.status == "COMPLETED"
    assert np.load(out / "a/two.mmap.logits.npy").shape == (4, N_CLASSES)
    assert json.loads((out / "config.json").read_text())["hop_frames"] == 62


def test_extract_command_exits_non_zero_after_extracting_the_others(data, checkpoint, tmp_path, capsys):
    from ex_maest import ex

    base, gt, _ = data
    (base / "a/two.mmap").write_bytes(b"\x00" * 100)  # truncated
    out = tmp_path / "emb"
    with pytest.raises(SystemExit) as exit_info:
        ex.run("extract_embeddings", config_updates=sacred_updates(data, checkpoint, out), options={"--loglevel": "ERROR"})

    assert exit_info.value.code == 1
    assert files_under(out) == sorted(
        ["config.json", "failed-embeddings.txt", *(f"{k}.embeddings.npy" for k in LENGTHS if k != "a/two.mmap")]
    )
    # Each failure is printed once: on stderr, not again in the summary on stdout.
    captured = capsys.readouterr()
    assert captured.out.count("FAILED") == 0 and captured.err.count("FAILED a/two.mmap: ") == 1
    assert "3 written, 0 already present, 1 failed" in captured.out


def test_extract_command_config_errors(data, checkpoint, tmp_path):
    from ex_maest import ex

    updates = sacred_updates(data, checkpoint, tmp_path / "o")
    updates["datamodule"]["groundtruth_predict"] = None
    with pytest.raises(ValueError, match="set datamodule.groundtruth_predict"):
        ex.run("extract_embeddings", config_updates=updates, options={"--loglevel": "ERROR"})
    with pytest.raises(ValueError, match=r"predict.hop must be 'full' .* or 'half'"):
        ex.run("extract_logits", config_updates=sacred_updates(data, checkpoint, tmp_path / "o", hop="quarter"), options={"--loglevel": "ERROR"})


def test_target_mtt_extracts_the_shipped_magnatagatune_keys_where_target_mtt_tl_reads(model, checkpoint, tmp_path):
    """The upstream MTT pickles drive extraction over SPEC §3 mel files; ex_tl's target_mtt_tl finds the outputs."""
    import pickle

    from ex_maest import ex
    from ex_tl import ex as ex_tl
    from helpers.probe import check_embeddings_exist

    with open("datasets/mtt/groundtruth-test.pk", "rb") as f:
        test_gt = pickle.load(f)
    keys = sorted(test_gt)[:3]
    rng = np.random.default_rng(1)
    for key in keys:  # 29.1 s MagnaTagATune clips -> about 1820 frames
        write_mel(tmp_path / "mels" / key, rng.uniform(0, 4, size=(1820, N_MELS)).astype(np.float16))
    subset = save_groundtruth(tmp_path / "gt.pk", {k: test_gt[k] for k in keys})

    named = ex.named_configs["target_mtt"]()
    assert named["datamodule"]["groundtruth_predict"] == "datasets/mtt/groundtruth-all.pk"
    out_dir = named["predict"]["out_dir"]
    assert out_dir == ex_tl.named_configs["target_mtt_tl"]()["embeddings_dir"]  # the chain: one writes, one reads

    out = tmp_path / out_dir
    run = ex.run(
        "extract_embeddings",
        named_configs=["target_mtt"],
        config_updates={
            "maest": {"arch": "maest-tiny", "checkpoint": str(checkpoint), "n_classes": N_CLASSES, "input_t": N_FRAMES},
            "datamodule": {"base_dir": str(tmp_path / "mels"), "groundtruth_predict": str(subset), "clip_length": 2},
            "predict": {"out_dir": str(out), "transformer_block": 1, "num_workers": 0, "device": "cpu", "precision": "fp32"},
        },
        options={"--loglevel": "ERROR"},
    )
    assert run.result["written"] == 3
    assert np.load(output_path(out, keys[0], "embeddings")).shape == (len(range(0, 1820 - 125 + 1, 125)) + 1, 3, EMBED_DIM)
    check_embeddings_exist(out, keys)  # raises if ex_tl would not find a file


def test_a_file_that_fails_a_shared_forward_pass_fails_alone():
    from helpers.extract import run_isolating_failures

    done, calls, failed = [], [], {}

    def forward(group):
        calls.append([name for name, _ in group])
        if any(data is None for _, data in group):
            raise ValueError("MAEST input contains NaN or inf values")
        done.extend(name for name, _ in group)

    group = [("a", 1), ("bad", None), ("c", 3)]
    run_isolating_failures(group, forward, failed)
    assert done == ["a", "c"]
    assert failed == {"bad": "MAEST input contains NaN or inf values"}
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]  # the batch once, then each file alone
    with pytest.raises(TypeError):  # anything but a data error is a bug: raised, not recorded
        run_isolating_failures([("x", 1)], lambda group: 1 + "a", failed)
