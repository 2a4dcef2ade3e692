"""datasets/gtzan/preprocess.py, offline: archive unpack (tar.gz and zip), mel extraction, split checks, checked download."""

import hashlib
import io
import logging
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from sacred.config.config_scope import ConfigScope

from configs.maest import target_gtzan
from datasets.gtzan.preprocess import (
    DEFAULT_AUDIO_DIR,
    DEFAULT_OUT_DIR,
    SHA256,
    URL,
    GTZANError,
    download,
    extract,
    load_split,
    main,
    read_genres,
    unpack,
)
from helpers.audio import audio_to_mel, load_audio
from helpers.melfiles import MelReader, load_groundtruth
from tests.builders import main_not_interrupted

GENRES = ["blues", "jazz", "rock"]
SPLIT = {  # split -> tracks; jazz.00054 is unreadable, as in Kaggle's copy of GTZAN
    "train": ["blues/blues.00000.wav", "jazz/jazz.00000.wav", "jazz/jazz.00054.wav", "rock/rock.00000.wav"],
    "validation": ["blues/blues.00001.wav", "rock/rock.00001.wav"],
    "test": ["jazz/jazz.00001.wav", "rock/rock.00002.wav"],
}
SPLIT_FILES = {"train": "train_filtered.txt", "validation": "valid_filtered.txt", "test": "test_filtered.txt"}
SR = 22050  # GTZAN's rate; the mels are computed at 16 kHz
N_FRAMES = 1 + 8000 // 256  # 0.5 s at 16 kHz, centred frames


def write_split(folder, split=SPLIT, genres=GENRES):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "genres.txt").write_text("\n".join(genres) + "\n")
    for name, filename in SPLIT_FILES.items():
        (folder / filename).write_text("\n".join(split[name]) + "\n")
    return folder


def wav_bytes(i: int) -> bytes:
    t = np.arange(SR // 2) / SR
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 110 * (i + 1) * t)).astype(np.float32), SR, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def excerpts() -> dict[str, bytes]:
    """``<genre>/<file>`` -> content of every track of SPLIT (jazz.00054: not a WAV at all)."""
    tracks = sorted(t for tracks in SPLIT.values() for t in tracks)
    return {t: b"\x00" * 4096 if t == "jazz/jazz.00054.wav" else wav_bytes(i) for i, t in enumerate(tracks)}


def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def archive(tmp_path):
    """A tiny genres.tar.gz laid out as Marsyas' (genres/<genre>/...), with a macOS ._ file and a .mf list."""
    members = {f"genres/{name}": data for name, data in excerpts().items()}
    members["genres/blues/._blues.00000.wav"] = b"\x00\x05\x16\x07" + b"\x00" * 207  # AppleDouble resource fork
    members["genres/input.mf"] = b"genres/blues/blues.00000.wav\tblues\n"
    return write_tar(tmp_path / "genres.tar.gz", members)


def test_all_unpacks_extracts_lists_the_unreadable_track_and_writes_one_hot_ground_truth(archive, tmp_path, capsys):
    split_dir = write_split(tmp_path / "split")
    audio, out = tmp_path / "audio", tmp_path / "mels"
    args = ["--archive", str(archive), "--audio-dir", str(audio), "--out-dir", str(out), "--split-dir", str(split_dir)]
    args += ["--jobs", "1"]

    assert main(["all", *args]) == 1  # jazz.00054 cannot be read (SPEC §8)

    assert sorted(p.relative_to(audio).as_posix() for p in audio.rglob("*") if p.is_file()) == sorted(excerpts())
    assert "FAILED jazz/jazz.00054.wav" in capsys.readouterr().err
    assert (out / "failed.txt").read_text().startswith("jazz/jazz.00054.wav\t")
    mel = MelReader(out).open("rock/rock.00002.mmap")
    assert mel.shape == (N_FRAMES, 96)  # resampled to 16 kHz by the project's one front-end:
    np.testing.assert_allclose(mel, audio_to_mel(load_audio(audio / "rock/rock.00002.wav")), atol=1e-2)  # float16 storage
    assert not (out / "jazz/jazz.00054.mmap").exists()
    train = load_groundtruth(out / "groundtruth-train.pk")
    assert sorted(train) == ["blues/blues.00000.mmap", "jazz/jazz.00000.mmap", "rock/rock.00000.mmap"]  # jazz.00054 left out
    assert train["jazz/jazz.00000.mmap"].dtype == np.float32
    assert train["jazz/jazz.00000.mmap"].tolist() == [0.0, 1.0, 0.0]
    assert load_groundtruth(out / "groundtruth-validation.pk")["rock/rock.00001.mmap"].tolist() == [0.0, 0.0, 1.0]
    assert sorted(load_groundtruth(out / "groundtruth-test.pk")) == ["jazz/jazz.00001.mmap", "rock/rock.00002.mmap"]
    assert len(load_groundtruth(out / "groundtruth-all.pk")) == 7
    assert (out / "genres.txt").read_text().split() == GENRES

    mtime = (out / "blues/blues.00000.mmap").stat().st_mtime_ns
    assert unpack(archive, audio, GENRES) == 0  # rerun: nothing unpacked or computed again
    extract(audio, out, jobs=1, split_dir=split_dir)
    assert (out / "blues/blues.00000.mmap").stat().st_mtime_ns == mtime

    (audio / "jazz/jazz.00054.wav").write_bytes(wav_bytes(9))  # a good copy: the failure list empties
    assert main(["extract", *args]) == 0
    assert not (out / "failed.txt").exists()
    assert len(load_groundtruth(out / "groundtruth-train.pk")) == 4


def test_unpack_reads_a_kaggle_style_zip_and_rejects_what_is_not_gtzan(tmp_path):
    zip_path = tmp_path / "kaggle.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("Data/genres_original/blues/blues.00000.wav", wav_bytes(0))
        z.writestr("Data/genres_original/pop/pop.00000.wav", wav_bytes(1))  # a genre not in this genres.txt: ignored
        z.writestr("Data/images_original/blues/blues00000.png", b"png")
        z.writestr("Data/features_30_sec.csv", b"filename,label\n")
    assert unpack(zip_path, tmp_path / "audio", GENRES) == 1
    assert (tmp_path / "audio/blues/blues.00000.wav").read_bytes() == wav_bytes(0)

    with pytest.raises(GTZANError, match="holds no GTZAN excerpt"):
        unpack(write_tar(tmp_path / "other.tar.gz", {"x/readme.txt": b"hi"}), tmp_path / "audio", GENRES)
    rng = np.random.default_rng(0)  # incompressible members: the cut falls inside the second one
    members = {"genres/blues/blues.00000.wav": rng.bytes(30000), "genres/rock/rock.00000.wav": rng.bytes(30000)}
    whole = write_tar(tmp_path / "whole.tar.gz", members)
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(whole.read_bytes()[:45000])
    with pytest.raises(GTZANError, match="damaged or not a tar/zip archive.*download again"):
        unpack(damaged, tmp_path / "audio2", GENRES)
    assert [p.name for p in (tmp_path / "audio2").rglob("*") if p.is_file()] == ["blues.00000.wav"]  # no half-written rock
    with pytest.raises(GTZANError, match="does not exist: run the download command first"):
        unpack(tmp_path / "missing.tar.gz", tmp_path / "audio", GENRES)


def test_split_checks(tmp_path):
    overlap = dict(SPLIT, test=[*SPLIT["test"], "blues/blues.00001.wav"])
    with pytest.raises(GTZANError, match=r"1 track\(s\) are in both the validation and the test split"):
        load_split(write_split(tmp_path / "overlap", overlap))
    unknown = dict(SPLIT, validation=["pop/pop.00003.wav"])
    with pytest.raises(GTZANError, match=r"valid_filtered.txt line 1: 'pop/pop.00003.wav' is not <genre>/<genre>.000NN.wav"):
        load_split(write_split(tmp_path / "unknown", unknown))
    mismatched = dict(SPLIT, train=["jazz/blues.00003.wav"])
    with pytest.raises(GTZANError, match="train_filtered.txt line 1"):
        load_split(write_split(tmp_path / "mismatched", mismatched))
    with pytest.raises(GTZANError, match="audio folder .* does not exist: run the unpack command first"):
        extract(tmp_path / "nowhere", tmp_path / "out", split_dir=write_split(tmp_path / "ok"))


def test_shipped_split_is_the_fault_filtered_one():
    splits = load_split()
    assert {name: len(tracks) for name, tracks in splits.items()} == {"train": 443, "validation": 197, "test": 290}
    genres = read_genres()
    assert genres == ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"]
    for tracks in splits.values():
        assert {t.split("/")[0] for t in tracks} == set(genres)
    assert "jazz/jazz.00054.wav" in splits["train"]


def test_download_checks_the_sha256(tmp_path):
    payload = write_tar(tmp_path / "served.tar.gz", {"genres/blues/blues.00000.wav": wav_bytes(0)}).read_bytes()
    url = (tmp_path / "served.tar.gz").as_uri()

    path = download(tmp_path / "dl", url=url, sha256=hashlib.sha256(payload).hexdigest())
    assert path == tmp_path / "dl/served.tar.gz" and path.read_bytes() == payload

    with pytest.raises(GTZANError, match=f"has SHA-256 {hashlib.sha256(payload).hexdigest()}, expected 0+: .*run download again"):
        download(tmp_path / "dl", url=url, sha256="0" * 64)
    assert main(["download", "--download-dir", str(tmp_path / "dl"), "--url", url, "--sha256", "0" * 64]) == 1


def test_url_and_target_gtzan_point_at_the_prepared_data():
    assert URL == "https://huggingface.co/datasets/marsyas/gtzan/resolve/main/data/genres.tar.gz" and len(SHA256) == 64
    config = ConfigScope(target_gtzan)()
    datamodule = config["datamodule"]
    assert datamodule["base_dir"] == DEFAULT_OUT_DIR.as_posix() and DEFAULT_AUDIO_DIR.as_posix() == "data/gtzan/audio"
    for key, split in [("train", "train"), ("val", "validation"), ("test", "test"), ("predict", "all")]:
        assert datamodule[f"groundtruth_{key}"] == f"{DEFAULT_OUT_DIR.as_posix()}/groundtruth-{split}.pk"
    assert datamodule["labels"] == read_genres()
    assert config["predict"]["out_dir"] == "outputs/gtzan/embeddings"


# ---------------------------------------------------------------- suffixes, failure list, damaged or missing archives


def au_bytes(i: int) -> bytes:
    t = np.arange(SR // 2) / SR
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 110 * (i + 1) * t)).astype(np.float32), SR, format="AU", subtype="PCM_16")
    return buffer.getvalue()


def test_an_au_archive_is_named_and_extract_takes_its_suffix(tmp_path, caplog, capsys):
    split_dir = write_split(tmp_path / "split")
    tracks = sorted(excerpts())
    archive = write_tar(tmp_path / "genres.tar.gz", {f"genres/{Path(t).with_suffix('.au')}": au_bytes(i) for i, t in enumerate(tracks)})
    audio, out = tmp_path / "audio", tmp_path / "mels"
    with caplog.at_level(logging.INFO, logger="datasets.gtzan.preprocess"):
        assert unpack(archive, audio, GENRES) == len(tracks)
    assert "8 .au excerpts" in caplog.text and "extract takes them as they are (--audio-suffix .au)" in caplog.text

    caplog.clear()
    args = ["--audio-dir", str(audio), "--out-dir", str(out), "--split-dir", str(split_dir), "--jobs", "1"]
    assert main(["extract", *args, "--audio-suffix", ".wav"]) == 1  # named, and not there: refused before any work, with the fix
    assert "holds no track of the split as .wav but 8 as .au (e.g. blues/blues.00000.au): pass --audio-suffix .au" in caplog.text
    assert not (out / "failed.txt").exists()

    with caplog.at_level(logging.INFO, logger="datasets.gtzan.preprocess"):
        assert main(["extract", *args]) == 0  # not named: the suffix the folder holds
    assert "holds the excerpts as .au files: extracting those" in caplog.text
    assert len(load_groundtruth(out / "groundtruth-all.pk")) == 8 and not (out / "failed.txt").exists()
    assert main(["extract", *args, "--audio-suffix", "au"]) == 0  # with or without the dot: the same files, already there
    with pytest.raises(SystemExit):  # argparse: usage and the reason on stderr
        main(["extract", *args, "--audio-suffix", "a/u"])
    assert "'a/u' is not a file suffix: give one such as .wav or .au" in capsys.readouterr().err


def test_failures_of_another_suffix_leave_the_list_and_the_exit_status(archive, tmp_path, capsys, caplog):
    split_dir = write_split(tmp_path / "split")
    audio, out = tmp_path / "audio", tmp_path / "mels"
    unpack(archive, audio, GENRES)
    args = ["--audio-dir", str(audio), "--out-dir", str(out), "--split-dir", str(split_dir), "--jobs", "1"]
    with caplog.at_level(logging.INFO):
        assert main(["extract", *args]) == 1
    assert [line for line in capsys.readouterr().err.splitlines() if "jazz.00054" in line][0].startswith("FAILED jazz/jazz.00054.wav")
    assert not [r for r in caplog.records if "jazz.00054" in r.getMessage()]  # reported once: the FAILED line

    for i, track in enumerate(sorted(excerpts())):  # the same tracks as .au files, jazz.00054 sound this time
        (audio / track).unlink()
        (audio / track).with_suffix(".au").write_bytes(au_bytes(i))
    assert main(["extract", *args, "--audio-suffix", ".au"]) == 0  # everything of this run's inputs was extracted

    assert "FAILED" not in capsys.readouterr().err
    assert not (out / "failed.txt").exists()  # the .wav entry is of no input now
    assert len(load_groundtruth(out / "groundtruth-train.pk")) == 4


def test_a_damaged_copy_given_with_archive_is_named_as_the_users_and_leaves_no_temporary_file(tmp_path, caplog):
    zip_path = tmp_path / "my-gtzan.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("genres/blues/blues.00000.wav", rng.bytes(20000))
        z.writestr("genres/rock/rock.00000.wav", rng.bytes(20000))
    with zipfile.ZipFile(zip_path) as z:
        offset = z.getinfo("genres/rock/rock.00000.wav").header_offset + 2000
    data = bytearray(zip_path.read_bytes())
    data[offset : offset + 8] = bytes(b ^ 0xFF for b in data[offset : offset + 8])  # flipped bits: Bad CRC-32
    zip_path.write_bytes(bytes(data))
    audio = tmp_path / "audio"

    with caplog.at_level(logging.ERROR):
        assert main(["unpack", "--archive", str(zip_path), "--audio-dir", str(audio)]) == 1
    message = caplog.text
    assert f"{zip_path} is damaged or not a tar/zip archive (BadZipFile: Bad CRC-32" in message
    assert "It is the copy given with --archive: check it" in message and "delete it" not in message
    assert sorted(p.name for p in audio.rglob("*")) == ["blues", "blues.00000.wav", "rock"]  # nothing half-written
    # The archive download wrote is still the one to delete and download again.
    with pytest.raises(GTZANError, match="Bad CRC-32.*delete it and run download again"):
        unpack(zip_path, tmp_path / "audio2", GENRES)


def test_a_missing_archive_names_the_option_and_the_path(tmp_path, caplog):
    missing = tmp_path / "nonexistent.zip"
    with caplog.at_level(logging.ERROR):
        assert main(["unpack", "--archive", str(missing), "--audio-dir", str(tmp_path / "audio")]) == 1
    assert f"--archive {missing}: no such file; give the path of your copy of GTZAN" in caplog.text
    assert "Errno" not in caplog.text


def test_extract_prints_the_settings_of_another_out_dir_and_target_gtzan_follows_base_dir(archive, tmp_path, caplog):
    split_dir = write_split(tmp_path / "split")
    audio, out = tmp_path / "audio", tmp_path / "my mels"
    unpack(archive, audio, GENRES)
    with caplog.at_level(logging.INFO, logger="datasets.gtzan.preprocess"):
        main(["extract", "--audio-dir", str(audio), "--out-dir", str(out), "--split-dir", str(split_dir), "--jobs", "1"])
    d = out.resolve().as_posix()
    assert (
        "next: python ex_maest.py extract_embeddings with maest_30s_from_passt_infer target_gtzan "
        f"'datamodule.base_dir={d}'; then python ex_tl.py with target_gtzan_tl 'groundtruth_train={d}/groundtruth-train.pk' "
        f"'groundtruth_val={d}/groundtruth-validation.pk' 'groundtruth_test={d}/groundtruth-test.pk'"
    ) in caplog.text
    # datamodule.base_dir is all the extraction (and fine-tuning) needs: the ground truths follow it
    datamodule = ConfigScope(target_gtzan)(fixed={"datamodule": {"base_dir": d}})["datamodule"]
    for key, split in [("train", "train"), ("val", "validation"), ("test", "test"), ("predict", "all")]:
        assert datamodule[f"groundtruth_{key}"] == f"{d}/groundtruth-{split}.pk" and Path(datamodule[f"groundtruth_{key}"]).is_file()


def test_ctrl_c_in_extract_stops_with_one_line(archive, tmp_path, capsys, monkeypatch):
    import datasets.prepare_folder

    def interrupted(audio_path, mel_path):
        raise KeyboardInterrupt

    split_dir = write_split(tmp_path / "split")
    audio = tmp_path / "audio"
    unpack(archive, audio, GENRES)
    monkeypatch.setattr(datasets.prepare_folder, "_extract_one", interrupted)
    args = ["--audio-dir", str(audio), "--out-dir", str(tmp_path / "mels"), "--split-dir", str(split_dir), "--jobs", "1"]
    assert main_not_interrupted(main, ["extract", *args]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted (0 of 8 mel file(s) complete, 0 of them written in this run); run the same command again to resume: "
        "finished files are kept, not made again"
    ]


def test_a_split_where_every_track_fails_names_each_track(archive, tmp_path, capsys, caplog):
    split_dir = write_split(tmp_path / "split")
    audio, out = tmp_path / "audio", tmp_path / "mels"
    unpack(archive, audio, GENRES)
    for path in audio.rglob("*.wav"):
        path.write_bytes(b"not audio" * 10)
    assert main(["extract", "--audio-dir", str(audio), "--out-dir", str(out), "--split-dir", str(split_dir), "--jobs", "1"]) == 1
    assert "split has a mel in" in caplog.text
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == len(excerpts())  # the error, and why each track failed
