"""datasets/prepare_folder.py: audio folder -> mel files, ground truth, labels; resumable, failures listed."""

import json
import logging
import os
import unicodedata

import numpy as np
import pytest
import soundfile as sf

from datasets.prepare_folder import labels_from_folders, main, mel_keys, prepare_folder, split_keys
from helpers.failures import read_failure_list
from helpers.melfiles import MelFileError, MelReader, load_groundtruth
from tests.builders import main_not_interrupted

FREQS = {"bass": 200.0, "treble": 3000.0}
LENGTH_S = 0.5


def tone(freq_hz: float, sample_rate: int, channels: int) -> np.ndarray:
    t = np.arange(int(LENGTH_S * sample_rate)) / sample_rate
    return np.repeat((0.3 * np.sin(2 * np.pi * freq_hz * t))[:, None], channels, axis=1).astype(np.float32)


@pytest.fixture
def audio_dir(tmp_path):
    """6 files per label folder in mixed formats, rates and channel counts, plus one corrupt file."""
    root = tmp_path / "audio"
    formats = [("wav", 44100, 2), ("flac", 22050, 1), ("wav", 16000, 1)]
    for label, freq in FREQS.items():
        for i in range(6):
            fmt, sr, ch = formats[i % 3]
            path = root / label / ("live" if i >= 3 else "") / f"{label}_{i}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, tone(freq, sr, ch), sr)
    (root / "treble" / "broken.wav").write_bytes(b"RIFF" + bytes(100))
    return root


def expected_frames() -> int:
    return 1 + int(LENGTH_S * 16000) // 256


def test_subfolder_labels(audio_dir, tmp_path):
    out = tmp_path / "out"

    result = prepare_folder(audio_dir, out, seed=1)

    assert result.labels == ["bass", "treble"]
    assert (out / "labels.txt").read_text().splitlines() == ["bass", "treble"]
    gt = load_groundtruth(out / "groundtruth-all.pk")
    assert len(gt) == 12 and "mels/bass/live/bass_4.mmap" in gt and "mels/treble/treble_0.mmap" in gt
    reader = MelReader(out)
    for key, vector in gt.items():
        label = "bass" if key.startswith("mels/bass/") else "treble"
        assert vector.dtype == bool and vector.tolist() == [label == "bass", label == "treble"]
        mel = reader.read(key)
        assert mel.shape == (expected_frames(), 96)
        peak_band = int(np.argmax(mel.mean(axis=0)))
        assert (peak_band < 10) if label == "bass" else (60 < peak_band < 70), (key, peak_band)

    splits = {name: load_groundtruth(out / f"groundtruth-{name}.pk") for name in ("train", "validation", "test")}
    assert [len(s) for s in splits.values()] == [10, 1, 1]  # round(12 x 0.8 / 0.1 / 0.1) in total
    assert set().union(*splits.values()) == set(gt)
    assert result.groundtruth["validation"] == out / "groundtruth-validation.pk"

    # the corrupt file is skipped and listed; every other file was written
    assert result.n_written == 12 and list(result.failed) == [audio_dir / "treble" / "broken.wav"]
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith("treble/broken.wav\tcannot decode audio file")
    assert not (out / "mels" / "treble" / "broken.mmap").exists()


def test_rerun_skips_complete_files_and_redoes_missing_or_truncated(audio_dir, tmp_path):
    out = tmp_path / "out"
    prepare_folder(audio_dir, out)
    kept = out / "mels" / "bass" / "bass_0.mmap"
    removed = out / "mels" / "bass" / "bass_1.mmap"
    truncated = out / "mels" / "treble" / "treble_2.mmap"
    mtime = kept.stat().st_mtime_ns
    content = removed.read_bytes()
    removed.unlink()
    truncated.write_bytes(truncated.read_bytes()[:-7])

    result = prepare_folder(audio_dir, out)

    assert (result.n_written, result.n_skipped) == (2, 10)
    assert kept.stat().st_mtime_ns == mtime
    assert removed.read_bytes() == content
    assert MelReader(out).read("mels/treble/treble_2.mmap").shape == (expected_frames(), 96)


def test_parallel_jobs_write_the_same_files(audio_dir, tmp_path):
    prepare_folder(audio_dir, tmp_path / "one", jobs=1)
    result = prepare_folder(audio_dir, tmp_path / "two", jobs=2)

    assert result.n_written == 12 and len(result.failed) == 1
    for path in (tmp_path / "one").rglob("*.mmap"):
        assert path.read_bytes() == (tmp_path / "two" / path.relative_to(tmp_path / "one")).read_bytes()


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_labels_csv_multi_label(audio_dir, tmp_path, suffix, sep):
    table = tmp_path / f"labels{suffix}"
    table.write_text(
        f"path{sep}labels\n"
        f"bass/bass_0.wav{sep}low;calm\n"
        f"treble/treble_0.wav{sep}high | bright\n"
        f"bass/live/bass_4.flac{sep}low|live|calm\n"
        f"treble/treble_1.flac{sep}\n"
        f"treble/gone.wav{sep}high\n"
    )
    out = tmp_path / "out"

    result = prepare_folder(audio_dir, out, labels_csv=table, split=(0.5, 0.25, 0.25))

    assert result.labels == ["bright", "calm", "high", "live", "low"]
    gt = load_groundtruth(out / "groundtruth-all.pk")
    assert {k: v.astype(int).tolist() for k, v in gt.items()} == {
        "mels/bass/bass_0.mmap": [0, 1, 0, 0, 1],
        "mels/treble/treble_0.mmap": [1, 0, 1, 0, 0],
        "mels/bass/live/bass_4.mmap": [0, 1, 0, 1, 1],
        "mels/treble/treble_1.mmap": [0, 0, 0, 0, 0],
    }
    assert list(result.failed) == [audio_dir / "treble" / "gone.wav"]
    assert "treble/gone.wav\tlisted in" in (out / "failed.txt").read_text()
    assert len(list((out / "mels").rglob("*.mmap"))) == 4  # files not in the table are ignored


def test_labels_csv_with_the_delimiter_inside_labels_is_an_error(audio_dir, tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("bass/bass_0.wav,low,calm\n")
    with pytest.raises(ValueError, match=r"labels\.csv:1: expected 2 columns.*separate labels with ';' or '\|'"):
        prepare_folder(audio_dir, tmp_path / "out", labels_csv=table)


def test_cli_npy_format(audio_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # treble/broken.wav cannot be read: the others are prepared, and the command fails (SPEC §8)
    assert main([str(audio_dir), str(out), "--format", "npy", "--jobs", "1", "--split", "0.5", "0.25", "0.25"]) == 1
    assert "FAILED treble/broken.wav: cannot decode audio file" in capsys.readouterr().err
    gt = load_groundtruth(out / "groundtruth-all.pk")
    assert all(k.endswith(".npy") for k in gt) and len(gt) == 12
    assert np.load(out / "mels" / "bass" / "bass_0.npy").shape == (expected_frames(), 96)
    assert len(load_groundtruth(out / "groundtruth-test.pk")) == 3
    assert main([str(tmp_path / "nowhere"), str(out)]) == 1


def test_bad_arguments(audio_dir, tmp_path):
    with pytest.raises(ValueError, match="summing to 1"):
        prepare_folder(audio_dir, tmp_path / "out", split=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="mel_format must be one of"):
        prepare_folder(audio_dir, tmp_path / "out", mel_format="wav")
    empty = tmp_path / "empty"
    (empty / "label").mkdir(parents=True)
    with pytest.raises(ValueError, match="no labelled audio files"):
        prepare_folder(empty, tmp_path / "out")


def test_an_output_path_that_cannot_be_a_folder_is_refused_before_any_file_is_read(audio_dir, tmp_path, caplog, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with caplog.at_level(logging.ERROR):
        assert main([str(audio_dir), str(tmp_path / "afile")]) == 1
    assert f"OUT_DIR={tmp_path / 'afile'} is a file, and the command writes a folder there: give a folder path" in caplog.text
    monkeypatch.setattr("datasets.prepare_folder.extract_mel_files", lambda *a, **k: pytest.fail("decoding started"))
    with pytest.raises(NotADirectoryError, match=r"afile is a file, so the folder cannot be created there"):
        prepare_folder(audio_dir, tmp_path / "afile" / "prepared")


def test_label_names_are_stripped_and_one_with_a_line_break_is_refused_before_any_work(tmp_path, monkeypatch):
    for label in (" spaced ", "ok"):
        (tmp_path / "audio" / label).mkdir(parents=True)
        sf.write(tmp_path / "audio" / label / "a.wav", tone(300.0, 16000, 1), 16000)
    result = prepare_folder(tmp_path / "audio", tmp_path / "out")
    assert result.labels == ["ok", "spaced"]  # as the CSV's labels, and as labels.txt reads back
    assert (tmp_path / "out" / "labels.txt").read_text() == "ok\nspaced\n"
    (tmp_path / "audio" / "new\nline").mkdir()
    sf.write(tmp_path / "audio" / "new\nline" / "b.wav", tone(300.0, 16000, 1), 16000)
    monkeypatch.setattr("datasets.prepare_folder.extract_mel_files", lambda *a, **k: pytest.fail("decoding started"))
    with pytest.raises(ValueError, match=r"1 label name\(s\) hold a line break, tab or other control character: 'new\\nline' \(e\.g\. of '.*b\.wav'\); "
                                         r"labels\.txt holds one name per line: rename the label folders"):
        prepare_folder(tmp_path / "audio", tmp_path / "out")


def test_silent_files_are_named_in_a_warning_and_prepared(tmp_path, caplog):
    for label in ("pad", "drums"):
        (tmp_path / "audio" / label).mkdir(parents=True)
        sf.write(tmp_path / "audio" / label / "tone.wav", tone(300.0, 16000, 1), 16000)
    sf.write(tmp_path / "audio" / "pad" / "silent.wav", np.zeros((8000, 2), np.float32), 16000)
    sf.write(tmp_path / "audio" / "drums" / "hiss.flac", np.full((8000, 1), 5e-5, np.float32), 16000)  # -86 dBFS
    with caplog.at_level(logging.WARNING, logger="datasets.prepare_folder"):
        result = prepare_folder(tmp_path / "audio", tmp_path / "out")
    assert result.n_written == 4 and not result.failed
    assert "2 file(s) are silent (every sample below -80 dBFS): the model learns their labels from silence; check they are " \
           "not empty exports:\n  drums/hiss.flac\n  pad/silent.wav" in caplog.text


def test_mel_keys_keep_the_audio_suffix_only_where_names_clash(tmp_path):
    files = [tmp_path / "a" / "x.wav", tmp_path / "a" / "x.mp3", tmp_path / "a" / "y.flac"]
    assert mel_keys(tmp_path, files, "mmap") == {
        files[0]: "mels/a/x.wav.mmap",
        files[1]: "mels/a/x.mp3.mmap",
        files[2]: "mels/a/y.mmap",
    }


def test_split_is_seeded_exact_and_stratified():
    labels = {f"k{i:03d}": ("a",) if i < 60 else ("b",) for i in range(100)}

    split = split_keys(labels, (0.8, 0.1, 0.1), seed=0)

    assert [len(split[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    assert split == split_keys(labels, (0.8, 0.1, 0.1), seed=0)
    assert split != split_keys(labels, (0.8, 0.1, 0.1), seed=1)
    for keys in split.values():
        share_a = sum(labels[k] == ("a",) for k in keys) / len(keys)
        assert share_a == pytest.approx(0.6, abs=0.11)  # label a is 60 % of every split


def test_a_mel_file_with_nan_is_computed_again_on_a_rerun(audio_dir, tmp_path):
    out = tmp_path / "out"
    prepare_folder(audio_dir, out)
    damaged = out / "mels" / "bass" / "bass_0.mmap"
    good = damaged.read_bytes()
    mel = np.fromfile(damaged, dtype="<f2").reshape(-1, 96)
    mel[3, 5] = np.nan
    mel.tofile(damaged)  # write_mel refuses NaN: damage the bytes in place, same size
    # What training says about it names a fix that works: delete it and prepare again.
    with pytest.raises(MelFileError, match=r"bass_0\.mmap contains NaN or inf values: delete it and run the command that "
                       r"prepared the data again \(python -m datasets\.prepare_folder AUDIO_DIR OUT_DIR"):
        MelReader(out).read("mels/bass/bass_0.mmap")

    result = prepare_folder(audio_dir, out)  # even without deleting it, the rerun recomputes it

    assert (result.n_written, result.n_skipped) == (1, 11)
    assert damaged.read_bytes() == good


def test_a_symlinked_label_folder_is_a_label(tmp_path):
    # AUDIO_DIR/rock -> ../my_audio/rock: os.walk without followlinks listed none of its files.
    for name in ["my_audio/rock/r0.wav", "my_audio/rock/live/r1.wav", "labelled/jazz/j0.wav", "labelled/jazz/j1.wav"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / name, tone(300.0, 16000, 1), 16000)
    labelled = tmp_path / "labelled"
    (labelled / "rock").symlink_to("../my_audio/rock", target_is_directory=True)
    (labelled / "jazz" / "loop").symlink_to("..", target_is_directory=True)  # a cycle: not followed forever

    result = prepare_folder(labelled, tmp_path / "out", split=(0.5, 0.5, 0.0))

    assert result.labels == ["jazz", "rock"] and not result.failed
    assert sorted(load_groundtruth(tmp_path / "out" / "groundtruth-all.pk")) == [
        "mels/jazz/j0.mmap", "mels/jazz/j1.mmap", "mels/rock/live/r1.mmap", "mels/rock/r0.mmap",
    ]


def test_a_missing_audio_folder_is_an_immediate_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"audio folder .*nowhere does not exist"):
        prepare_folder(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_labels_csv_lists_every_bad_row_in_one_error(audio_dir, tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text(
        "path,labels\n"
        "bass/bass_0.wav,low\n"
        "bass/bass_0.wav,low\n"  # line 3: listed twice
        "../x.wav,low\n"  # line 4
        f"{audio_dir / 'bass' / 'bass_1.flac'},low\n"  # line 5: absolute
        "bass/bass_2.wav,low,calm\n"  # line 6: three columns
        "treble//treble_0.wav,high\n"
        "./treble/treble_0.wav,high\n"  # line 8: the same file as line 7
    )
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        prepare_folder(audio_dir, out, labels_csv=table)

    message = str(error.value)
    assert f"{table}:3: bass/bass_0.wav is listed twice (first on line 2)" in message
    assert f"{table}:4: '../x.wav': has a '..' part" in message and "is has" not in message
    assert f"{table}:5: '{audio_dir / 'bass' / 'bass_1.flac'}': absolute" in message
    assert f"{table}:6: expected 2 columns (path, labels) but got 3" in message
    assert f"{table}:8: treble/treble_0.wav is listed twice (first on line 7)" in message
    assert "2 row(s) of" in message and "name files outside the audio folder" in message
    assert message.endswith("(nothing was read or written)")
    assert not out.exists()


def test_labels_csv_in_decomposed_unicode_names_the_composed_files(tmp_path):
    # The CSV comes from macOS (NFD); the files on disk are NFC, and one folder is NFD.
    nfc, nfd = unicodedata.normalize("NFC", "électro"), unicodedata.normalize("NFD", "électro")
    assert nfc != nfd
    audio = tmp_path / "audio"
    for name in [f"{nfc}/e1.wav", f"{nfc}/e2.wav", f"{nfd}_live/e3.wav"]:
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(audio / name, tone(300.0, 16000, 1), 16000)
    table = tmp_path / "labels.csv"
    table.write_text(f"{nfd}/e1.wav,{nfd}\n{nfc}/e2.wav,{nfc};live\n{nfc}_live/e3.wav,live\n", encoding="utf-8")

    result = prepare_folder(audio, tmp_path / "out", labels_csv=table, split=(0.5, 0.5, 0.0))

    assert not result.failed and result.labels == ["live", nfc]
    gt = load_groundtruth(tmp_path / "out" / "groundtruth-all.pk")
    assert {k: v.tolist() for k, v in gt.items()} == {  # keys as the files are spelled on disk
        f"mels/{nfc}/e1.mmap": [False, True], f"mels/{nfc}/e2.mmap": [True, True], f"mels/{nfd}_live/e3.mmap": [True, False],
    }
    # A CSV naming one file in both forms lists it twice.
    table.write_text(f"{nfd}/e1.wav,a\n{nfc}/e1.wav,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf":2: {nfc}/e1.wav is listed twice \(first on line 1\)"):
        prepare_folder(audio, tmp_path / "out2", labels_csv=table)


def test_subfolder_labels_are_one_label_whatever_the_unicode_form(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "électro"), unicodedata.normalize("NFD", "électro")
    files = [tmp_path / nfd / "a.wav", tmp_path / nfc / "b.wav"]
    assert labels_from_folders(tmp_path, files) == {files[0]: [nfc], files[1]: [nfc]}
    # Two files whose names differ only in form would share one mel file: refused, naming both.
    with pytest.raises(ValueError, match=r"1 pair\(s\) of files .* differ only in Unicode normalisation"):
        mel_keys(tmp_path, [tmp_path / nfc / "x.wav", tmp_path / nfd / "x.wav"], "mmap")


# ---------------------------------------------------------------- reruns: failure list, split, Ctrl-C


def _split_of(out):
    return {key: name for name in ("train", "validation", "test") for key in load_groundtruth(out / f"groundtruth-{name}.pk")}


def test_a_removed_broken_file_leaves_the_failure_list_and_is_reported_once(audio_dir, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main([str(audio_dir), str(out), "--jobs", "1"]) == 1
    # One report per unreadable file: the FAILED line on stderr; the log has it at DEBUG at most.
    assert [line for line in capsys.readouterr().err.splitlines() if "broken.wav" in line] == [
        next(line for line in (out / "failed.txt").read_text().splitlines()).replace("\t", ": ").join(["FAILED ", ""])
    ]
    assert not [r.getMessage() for r in caplog.records if "broken.wav" in r.getMessage()]
    assert list(read_failure_list(out / "failed.txt")) == ["treble/broken.wav"]

    (audio_dir / "treble" / "broken.wav").unlink()  # what the message says to do: fix or remove it
    assert main([str(audio_dir), str(out), "--jobs", "1"]) == 0
    assert not (out / "failed.txt").exists()  # it is no longer an input: its entry goes


def test_a_rerun_with_added_files_keeps_the_split_of_the_earlier_ones(audio_dir, tmp_path, caplog):
    out = tmp_path / "out"
    prepare_folder(audio_dir, out, seed=1)
    before = _split_of(out)
    for label, freq in FREQS.items():  # 3 new files per label
        for i in range(6, 9):
            sf.write(audio_dir / label / f"{label}_{i}.wav", tone(freq, 16000, 1), 16000)

    with caplog.at_level(logging.INFO, logger="datasets.prepare_folder"):
        prepare_folder(audio_dir, out, seed=1)

    after = _split_of(out)
    assert {key: after[key] for key in before} == before  # no file trained on is now validated or tested on
    assert len(after) == 18
    assert [sum(name == split for name in after.values()) for split in ("train", "validation", "test")] == [14, 2, 2]
    assert "split: 12 file(s) kept their split from the earlier run" in caplog.text and "6 newly assigned" in caplog.text
    record = json.loads((out / "split.json").read_text())
    assert (record["split"], record["seed"]) == ([0.8, 0.1, 0.1], 1)
    assert record["keys"]["bass/bass_6.wav"] == "mels/bass/bass_6" and len(record["keys"]) == 18


def test_a_rerun_with_other_split_options_splits_afresh_and_says_so(audio_dir, tmp_path, caplog):
    out = tmp_path / "out"
    prepare_folder(audio_dir, out, seed=1)
    with caplog.at_level(logging.WARNING, logger="datasets.prepare_folder"):
        prepare_folder(audio_dir, out, seed=1, split=(0.5, 0.25, 0.25))
    assert [len(load_groundtruth(out / f"groundtruth-{name}.pk")) for name in ("train", "validation", "test")] == [6, 3, 3]
    message = caplog.text
    assert "was split with --split 0.8 0.1 0.1 --seed 1; this run asks for --split 0.5 0.25 0.25 --seed 1" in message
    assert "every file is split afresh" in message and "changed split" in message
    assert "rerun with --split 0.8 0.1 0.1 --seed 1 to keep the earlier one" in message


def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes(audio_dir, tmp_path, capsys, monkeypatch):
    import datasets.prepare_folder as module

    real, calls = module._extract_one, []

    def interrupted_on_the_third(audio_path, mel_path):
        calls.append(audio_path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(audio_path, mel_path)

    monkeypatch.setattr(module, "_extract_one", interrupted_on_the_third)
    out = tmp_path / "out"
    assert main_not_interrupted(main, [str(audio_dir), str(out), "--jobs", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted (2 of 13 mel file(s) complete, 2 of them written in this run); run the same command "
                   "again to resume: finished files are kept, not made again"]
    assert not (out / "groundtruth-all.pk").exists()

    monkeypatch.setattr(module, "_extract_one", real)
    result = prepare_folder(audio_dir, out)
    assert (result.n_written, result.n_skipped) == (10, 2)


def test_ctrl_c_with_a_pool_of_workers_shuts_it_down(audio_dir, tmp_path, capsys, monkeypatch):
    import datasets.prepare_folder as module

    as_completed, pools = module.cf.as_completed, []

    def interrupted_after_one(futures):
        for future in as_completed(futures):
            yield future
            raise KeyboardInterrupt

    def thread_pool(n_jobs, mp_context, initializer, initargs):  # the pool logic without spawning processes (seconds of torch imports)
        pools.append(module.cf.ThreadPoolExecutor(n_jobs))
        return pools[-1]

    monkeypatch.setattr(module.cf, "as_completed", interrupted_after_one)
    monkeypatch.setattr(module.cf, "ProcessPoolExecutor", thread_pool)
    out = tmp_path / "out"
    assert main_not_interrupted(main, [str(audio_dir), str(out), "--jobs", "2"]) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("interrupted (") and "of 13 mel file(s) complete" in line
    assert pools[0]._shutdown

    monkeypatch.undo()
    result = prepare_folder(audio_dir, out)  # the same command resumes: what the pool finished is kept
    assert result.n_written + result.n_skipped == 12 and result.n_skipped >= 1


def test_a_folder_where_every_file_fails_names_each_file(tmp_path, capsys, caplog):
    audio = tmp_path / "audio"
    for name in ("a/one.wav", "b/two.flac"):
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        (audio / name).write_bytes(b"not audio" * 10)
    assert main([str(audio), str(tmp_path / "out"), "--jobs", "1"]) == 1
    err = capsys.readouterr().err
    assert "none of the audio files in" in caplog.text
    failed = sorted(line.split(":")[0] for line in err.splitlines() if line.startswith("FAILED"))
    assert failed == ["FAILED a/one.wav", "FAILED b/two.flac"]  # the error, and why each file failed


def test_a_twin_added_next_to_a_prepared_file_renames_nothing(audio_dir, tmp_path):
    out = tmp_path / "out"
    prepare_folder(audio_dir, out, seed=1)
    before = _split_of(out)
    mel = (out / "mels" / "bass" / "bass_0.mmap").read_bytes()
    sf.write(audio_dir / "bass" / "bass_0.flac", tone(FREQS["treble"], 16000, 1), 16000)  # a.flac next to a.wav

    prepare_folder(audio_dir, out, seed=1)

    after = _split_of(out)
    assert {key: after[key] for key in before} == before  # the earlier file keeps its key, mel and split
    assert (out / "mels" / "bass" / "bass_0.mmap").read_bytes() == mel
    assert set(after) - set(before) == {"mels/bass/bass_0.flac.mmap"}  # the newcomer keeps its suffix

    (audio_dir / "bass" / "bass_0.flac").unlink()
    prepare_folder(audio_dir, out, seed=1)
    assert _split_of(out) == before


def test_a_replaced_audio_file_gets_its_mel_made_again(audio_dir, tmp_path):
    out = tmp_path / "out"
    prepare_folder(audio_dir, out)
    mel_path = out / "mels" / "bass" / "bass_0.mmap"
    sf.write(audio_dir / "bass" / "bass_0.wav", tone(FREQS["treble"], 44100, 2), 44100)  # another recording
    later = mel_path.stat().st_mtime_ns + 10**9
    os.utime(audio_dir / "bass" / "bass_0.wav", ns=(later, later))

    result = prepare_folder(audio_dir, out)

    assert (result.n_written, result.n_skipped) == (1, 11)
    assert 60 < int(np.argmax(MelReader(out).read("mels/bass/bass_0.mmap").mean(axis=0))) < 70  # the treble tone now


def test_a_csv_header_of_any_title_is_skipped_and_said(audio_dir, tmp_path, caplog):
    table = tmp_path / "labels.csv"
    table.write_text("file,label\nbass/bass_0.wav,low\ntreble/treble_0.wav,high\n")
    with caplog.at_level(logging.INFO, logger="datasets.prepare_folder"):
        result = prepare_folder(audio_dir, tmp_path / "out", labels_csv=table)
    assert result.labels == ["high", "low"] and not result.failed
    assert "labels.csv:1 taken as a header (file,label): it names no audio file" in caplog.text


def test_a_csv_naming_no_existing_file_says_so(audio_dir, tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("bass\\bass_0.wav,low\nnowhere.wav,high\n")
    with pytest.raises(ValueError, match=r"none of the 2 file\(s\) that .*labels.csv lists exists in .*audio \(e.g. bass\\bass_0.wav, "
                                         r"nowhere.wav\): the CSV's paths are relative to AUDIO_DIR, with '/' between folders"):
        prepare_folder(audio_dir, tmp_path / "out", labels_csv=table)

    table.write_text("bass\\bass_0.wav,low\nbass/bass_1.flac,low\n")
    result = prepare_folder(audio_dir, tmp_path / "out", labels_csv=table)
    assert result.failed[audio_dir / "bass\\bass_0.wav"].endswith("but not found; separate folders with '/', not '\\'")


def test_labels_that_look_like_mistakes_are_warned_about(audio_dir, tmp_path, caplog):
    table = tmp_path / "labels.csv"
    table.write_text("bass/bass_0.wav,Low;mix\nbass/bass_1.flac,low;mix\ntreble/treble_0.wav,mix\ntreble/treble_1.flac,\n")
    with caplog.at_level(logging.WARNING, logger="datasets.prepare_folder"):
        prepare_folder(audio_dir, tmp_path / "out", labels_csv=table)
    assert "labels 'Low' and 'low' differ only in case: they are 2 labels" in caplog.text
    assert "label 'mix' is on every file" not in caplog.text  # treble_1 has none
    assert "1 file(s) have no label (e.g. " in caplog.text and "treble_1.flac): they are negatives of every label" in caplog.text

    caplog.clear()
    table.write_text("bass/bass_0.wav,mix\nbass/bass_1.flac,mix\n")
    with caplog.at_level(logging.WARNING, logger="datasets.prepare_folder"):
        prepare_folder(audio_dir, tmp_path / "all", labels_csv=table)
    assert "label 'mix' is on every file: with no file without it, it cannot be scored" in caplog.text


def _state(pid: int) -> str | None:
    """A process's state letter (Z: dead, not yet reaped), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from Linux's /proc")
def test_workers_stop_when_the_preparing_process_is_killed(tmp_path):
    """kill -9 of prepare_folder: its workers stop too, instead of preparing on alone and waiting forever on a pipe."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    audio = tmp_path / "audio"
    rng = np.random.default_rng(0)
    for i in range(40):
        path = audio / ("a" if i % 2 else "b") / f"t{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, rng.normal(0, 0.1, 16000 * 20).astype(np.float32), 16000)
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "datasets.prepare_folder", str(audio), str(out), "--jobs", "2"], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while not list(out.rglob("*.mmap")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        workers = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                   for pid in (task / "children").read_text().split()]
        assert len(workers) >= 2, "two workers preparing (and multiprocessing's resource tracker)"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_state(pid) not in (None, "Z") for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_state(pid) in (None, "Z") for pid in workers), [_state(pid) for pid in workers]
    finally:
        for pid in [proc.pid, *workers]:  # nothing of this test outlives it, whatever failed
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_a_label_whose_every_file_failed_is_named(audio_dir, tmp_path, caplog):
    (audio_dir / "hum").mkdir()
    (audio_dir / "hum" / "cut.wav").write_bytes(b"RIFF" + bytes(60))
    (audio_dir / "hum" / "notes.wav").write_bytes(b"just text")
    with caplog.at_level(logging.WARNING, logger="datasets.prepare_folder"):
        result = prepare_folder(audio_dir, tmp_path / "out", jobs=1)
    assert "hum" in result.labels and len(result.failed) == 3  # the class stays (n_classes), with no file
    assert ("1 label(s) have no prepared file at all (every one of their files failed): hum. They stay classes of the "
            "ground truth, with no track to train on or score") in caplog.text
