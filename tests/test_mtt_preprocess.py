"""datasets/mtt/preprocess.py, offline: resumable download (local server), split-zip unpack, mel extraction."""

import http.server
import io
import logging
import pickle
import threading
import zipfile

import numpy as np
import pytest
import soundfile as sf
from sacred.config.config_scope import ConfigScope

from configs.maest import target_mtt
from configs.tl import target_mtt_tl
from datasets.mtt.preprocess import (
    URLS,
    ConcatenatedFile,
    MTTError,
    download_file,
    extract,
    load_shipped_groundtruth,
    main,
    unpack,
)
from helpers.failures import read_failure_list
from helpers.melfiles import MelReader, load_groundtruth
from tests.builders import main_not_interrupted

TAGS = ["guitar", "piano", "techno"]
CLIPS = {  # key -> (split, tags, has audio)
    "0/artist-album-01-song-0-29.mmap": ("train", [1, 0, 0], True),
    "0/artist-album-01-song-29-58.mmap": ("train", [1, 1, 0], True),
    "5/other-record-03-tune-0-29.mmap": ("validation", [0, 0, 1], True),
    "f/last-one-07-x-87-116.mmap": ("test", [0, 1, 0], True),
    "c/not_downloaded-0-29.mmap": ("test", [1, 0, 1], False),
}


def write_groundtruth(folder, clips=CLIPS, tags=TAGS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tags.txt").write_text("\n".join(tags) + "\n")
    for split in ("train", "validation", "test"):
        gt = {k: np.array(v, dtype=bool) for k, (s, v, _) in clips.items() if s == split}
        with open(folder / f"groundtruth-{split}.pk", "wb") as f:
            pickle.dump(gt, f)
    return folder


@pytest.fixture
def mtt(tmp_path):
    """A tiny MTT: shipped-style ground truth, and audio files named like the keys."""
    gt_dir = write_groundtruth(tmp_path / "gt")
    audio_dir = tmp_path / "audio"
    t = np.arange(16000 * 2) / 16000
    for i, (key, (_, _, has_audio)) in enumerate(CLIPS.items()):
        if has_audio:
            for suffix in (".mp3", ".flac"):
                path = (audio_dir / key).with_suffix(suffix)
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * (i + 1) * t)).astype(np.float32), 16000)
    return gt_dir, audio_dir


@pytest.mark.parametrize("suffix", [".mp3", ".flac"])
def test_extract_writes_mels_lists_failures_and_copies_ground_truth(mtt, tmp_path, suffix):
    gt_dir, audio_dir = mtt
    out = tmp_path / "mels"

    paths = extract(audio_dir, out, jobs=1, groundtruth_dir=gt_dir, audio_suffix=suffix)

    reader = MelReader(out)
    for key, (_, _, has_audio) in CLIPS.items():
        assert (out / key).is_file() == has_audio
        if has_audio:
            assert abs(reader.n_frames(key) - (1 + 32000 // 256)) <= 3  # mp3 decoders may pad a little
    assert (out / "failed.txt").read_text().startswith(f"c/not_downloaded-0-29{suffix}\taudio file")
    assert set(load_groundtruth(paths["test"])) == {"f/last-one-07-x-87-116.mmap"}  # the missing clip is left out
    assert load_groundtruth(paths["train"])["0/artist-album-01-song-29-58.mmap"].tolist() == [True, True, False]
    assert len(load_groundtruth(paths["all"])) == 4
    assert (out / "tags.txt").read_text().split() == TAGS

    mtime = (out / "0/artist-album-01-song-0-29.mmap").stat().st_mtime_ns
    extract(audio_dir, out, jobs=1, groundtruth_dir=gt_dir, audio_suffix=suffix)  # rerun: nothing recomputed
    assert (out / "0/artist-album-01-song-0-29.mmap").stat().st_mtime_ns == mtime


def test_extract_cli(mtt, tmp_path):
    gt_dir, audio_dir = mtt
    args = ["extract", "--out-dir", str(tmp_path / "cli"), "--jobs", "2", "--groundtruth-dir", str(gt_dir)]

    assert main([*args, "--audio-dir", str(audio_dir)]) == 1  # c/not_downloaded-0-29 has no audio (SPEC §8)

    assert (tmp_path / "cli" / "5/other-record-03-tune-0-29.mmap").is_file()
    assert load_groundtruth(tmp_path / "cli" / "groundtruth-validation.pk").keys() == {"5/other-record-03-tune-0-29.mmap"}
    assert main([*args, "--audio-dir", str(tmp_path / "nowhere")]) == 1


def test_ground_truth_checks(tmp_path):
    overlapping = dict(CLIPS, **{"x/dup-0-29.mmap": ("train", [0, 0, 1], True)})
    gt_dir = write_groundtruth(tmp_path / "overlap", overlapping)
    with open(gt_dir / "groundtruth-test.pk", "rb") as f:
        test = pickle.load(f)
    test["x/dup-0-29.mmap"] = np.zeros(3, dtype=bool)
    with open(gt_dir / "groundtruth-test.pk", "wb") as f:
        pickle.dump(test, f)
    with pytest.raises(MTTError, match=r"1 clip\(s\) are in both the train and the test split"):
        load_shipped_groundtruth(gt_dir)

    wrong_tags = write_groundtruth(tmp_path / "tags", tags=TAGS + ["rock"])
    with pytest.raises(MTTError, match="has 3-tag vectors but tags.txt lists 4 tags"):
        load_shipped_groundtruth(wrong_tags)


def test_shipped_ground_truth_is_the_mtt_split():
    gts = load_shipped_groundtruth()
    assert {split: len(gt) for split, gt in gts.items()} == {"train": 18706, "validation": 1825, "test": 5329}
    key = next(iter(gts["train"]))
    assert key.endswith(".mmap") and len(key.split("/")) == 2 and gts["train"][key].shape == (50,)


def split_zip(tmp_path, members: dict[str, bytes], n_parts=3):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    blob = buffer.getvalue()
    cuts = np.linspace(0, len(blob), n_parts + 1).astype(int)
    names = [f"mp3.zip.{i + 1:03d}" for i in range(n_parts)]
    for name, a, b in zip(names, cuts[:-1], cuts[1:]):
        (tmp_path / name).write_bytes(blob[a:b])
    return names, blob


def test_unpack_reads_the_parts_as_one_zip_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    members = {"0/a-0-29.mp3": rng.bytes(30000), "1/b-0-29.mp3": rng.bytes(20000), "f/c-29-58.mp3": b"x" * 5000}
    names, _ = split_zip(tmp_path, members)
    audio_dir = tmp_path / "audio"

    assert unpack(tmp_path, audio_dir, part_names=names) == 3
    for name, data in members.items():
        assert (audio_dir / name).read_bytes() == data

    (audio_dir / "1/b-0-29.mp3").write_bytes(b"truncated")
    assert unpack(tmp_path, audio_dir, part_names=names) == 1  # only the damaged file again
    assert (audio_dir / "1/b-0-29.mp3").read_bytes() == members["1/b-0-29.mp3"]


def test_unpack_errors(tmp_path):
    (tmp_path / "mp3.zip.001").write_bytes(b"")
    with pytest.raises(MTTError, match=r"mp3\.zip\.002.*missing: run the download command first"):
        unpack(tmp_path, tmp_path / "audio")
    names, _ = split_zip(tmp_path, {"../evil.mp3": b"boo"})
    with pytest.raises(MTTError, match="points outside"):
        unpack(tmp_path, tmp_path / "audio", part_names=names)
    (tmp_path / "mp3.zip.002").write_bytes(b"not a zip at all")
    with pytest.raises(MTTError, match="not a valid zip"):
        unpack(tmp_path, tmp_path / "audio", part_names=["mp3.zip.002"])


def test_concatenated_file_reads_and_seeks_across_parts(tmp_path):
    data = bytes(range(256)) * 10
    for i, (a, b) in enumerate([(0, 1000), (1000, 1001), (1001, 2560)]):
        (tmp_path / f"p{i}").write_bytes(data[a:b])
    with ConcatenatedFile([tmp_path / f"p{i}" for i in range(3)]) as f:
        assert f.read() == data
        f.seek(995)
        assert f.read(10) == data[995:1005]
        f.seek(-5, io.SEEK_END)
        assert f.read(100) == data[-5:] and f.read(1) == b""
        assert f.seek(-10, io.SEEK_CUR) == 2550


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` with optional HTTP Range support; records the Range headers it saw."""

    payload = b""
    ranges_supported = True
    seen_ranges: list = []

    def do_GET(self):
        requested = self.headers.get("Range")
        self.seen_ranges.append(requested)
        start = int(requested.split("=")[1].rstrip("-")) if requested and self.ranges_supported else 0
        if start >= len(self.payload) and requested:
            self.send_response(416)
            self.end_headers()
            return
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.payload = np.random.default_rng(1).bytes(3 * 2**20 + 123)
    RangeHandler.seen_ranges = []
    RangeHandler.ranges_supported = True
    yield f"http://127.0.0.1:{httpd.server_address[1]}/mp3.zip.001"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_a_partial_file(server, tmp_path):
    dest = tmp_path / "mp3.zip.001"
    (tmp_path / "mp3.zip.001.partial").write_bytes(RangeHandler.payload[:1000])

    assert download_file(server, dest) == dest

    assert dest.read_bytes() == RangeHandler.payload
    assert RangeHandler.seen_ranges == ["bytes=1000-"]
    assert not (tmp_path / "mp3.zip.001.partial").exists()
    download_file(server, dest)  # already there: no request
    assert len(RangeHandler.seen_ranges) == 1


def test_download_restarts_when_the_server_ignores_ranges_and_finishes_a_complete_partial(server, tmp_path):
    RangeHandler.ranges_supported = False
    (tmp_path / "a.partial").write_bytes(b"garbage that is not the start of the file")
    download_file(server, tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == RangeHandler.payload

    RangeHandler.ranges_supported = True
    (tmp_path / "b.partial").write_bytes(RangeHandler.payload)  # complete but never renamed
    download_file(server, tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == RangeHandler.payload


def test_download_error_is_actionable(tmp_path):
    with pytest.raises(MTTError, match="cannot reach http://127.0.0.1:9/x.*run download again"):
        download_file("http://127.0.0.1:9/x", tmp_path / "x", timeout=2)


def test_urls_are_the_three_mirg_parts():
    assert URLS == tuple(f"https://mirg.city.ac.uk/datasets/magnatagatune/mp3.zip.00{i}" for i in (1, 2, 3))


# ---------------------------------------------------------------- failure list, damaged parts, named configs, Ctrl-C


def test_failures_of_another_suffix_leave_the_list_and_are_reported_once(mtt, tmp_path, capsys, caplog):
    gt_dir, audio_dir = mtt
    out = tmp_path / "mels"
    args = ["extract", "--audio-dir", str(audio_dir), "--out-dir", str(out), "--jobs", "1", "--groundtruth-dir", str(gt_dir)]
    assert main(args) == 1
    capsys.readouterr()

    with caplog.at_level(logging.INFO):
        assert main([*args, "--audio-suffix", ".flac"]) == 1  # c/not_downloaded has no audio of either kind

    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert failed == [f"FAILED c/not_downloaded-0-29.flac: {read_failure_list(out / 'failed.txt')['c/not_downloaded-0-29.flac']}"]
    assert list(read_failure_list(out / "failed.txt")) == ["c/not_downloaded-0-29.flac"]  # the .mp3 entry is of no input now
    assert not [r for r in caplog.records if "not_downloaded" in r.getMessage()]  # one report: the FAILED line


def test_a_part_with_flipped_bytes_is_named_and_leaves_no_temporary_file(tmp_path, caplog):
    rng = np.random.default_rng(0)
    members = {"0/a-0-29.mp3": rng.bytes(45000), "1/b-0-29.mp3": rng.bytes(10000), "f/c-29-58.mp3": rng.bytes(45000)}
    names, blob = split_zip(tmp_path, members)  # three parts of ~33 kB: b's bytes (45-55 kB) lie in the second only
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        offset = z.getinfo("1/b-0-29.mp3").header_offset + 5000
    part_size = (tmp_path / names[0]).stat().st_size
    assert part_size <= offset < 2 * part_size
    second = bytearray((tmp_path / names[1]).read_bytes())
    second[offset - part_size] ^= 0xFF
    (tmp_path / names[1]).write_bytes(bytes(second))
    audio_dir = tmp_path / "audio"

    with pytest.raises(MTTError) as error:
        unpack(tmp_path, audio_dir, part_names=names)
    message = str(error.value)
    assert message.startswith("1/b-0-29.mp3 in the zip is damaged (BadZipFile: Bad CRC-32")
    assert f"its bytes are in {tmp_path / names[1]}: delete it, run download again, then unpack" in message
    assert names[0] not in message and names[2] not in message
    assert sorted(p.relative_to(audio_dir).as_posix() for p in audio_dir.rglob("*") if p.is_file()) == ["0/a-0-29.mp3"]

    with caplog.at_level(logging.ERROR):  # the command: one error line, exit status 1
        assert main(["unpack", "--download-dir", str(tmp_path), "--audio-dir", str(audio_dir)]) == 1
    assert f"its bytes are in {tmp_path / names[1]}: delete it" in caplog.text and "Traceback" not in caplog.text


def test_target_mtt_and_target_mtt_tl_read_the_copies_extract_writes(mtt, tmp_path, monkeypatch, caplog):
    gt_dir, audio_dir = mtt
    monkeypatch.chdir(tmp_path)
    assert ConfigScope(target_mtt)()["datamodule"]["groundtruth_predict"] == "datasets/mtt/groundtruth-all.pk"  # none yet
    with caplog.at_level(logging.INFO, logger="datasets.mtt.preprocess"):
        main(["extract", "--audio-dir", str(audio_dir), "--jobs", "1", "--groundtruth-dir", str(gt_dir)])  # -> data/mtt/mels
    assert "next: python ex_maest.py extract_embeddings with maest_30s_from_passt_infer target_mtt; then python ex_tl.py with target_mtt_tl\n" in caplog.text + "\n"

    datamodule = ConfigScope(target_mtt)()["datamodule"]
    for key, split in [("train", "train"), ("val", "validation"), ("test", "test"), ("predict", "all")]:
        assert datamodule[f"groundtruth_{key}"] == f"data/mtt/mels/groundtruth-{split}.pk"
    assert set(load_groundtruth(datamodule["groundtruth_predict"])) == {k for k, (_, _, has_audio) in CLIPS.items() if has_audio}
    probe = ConfigScope(target_mtt_tl)()
    assert [probe[f"groundtruth_{key}"] for key in ("train", "val", "test")] == [
        datamodule["groundtruth_train"], datamodule["groundtruth_val"], datamodule["groundtruth_test"]
    ]
    # Mels prepared elsewhere: datamodule.base_dir alone moves the ground truth along, and the hint says what to set.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasets.mtt.preprocess"):
        main(["extract", "--audio-dir", str(audio_dir), "--out-dir", "other", "--jobs", "1", "--groundtruth-dir", str(gt_dir)])
    d = (tmp_path / "other").as_posix()
    assert (
        f"with maest_30s_from_passt_infer target_mtt datamodule.base_dir={d}; then python ex_tl.py with target_mtt_tl "
        f"groundtruth_train={d}/groundtruth-train.pk groundtruth_val={d}/groundtruth-validation.pk groundtruth_test={d}/groundtruth-test.pk"
    ) in caplog.text
    assert ConfigScope(target_mtt)(fixed={"datamodule": {"base_dir": d}})["datamodule"]["groundtruth_val"] == f"{d}/groundtruth-validation.pk"


def test_target_mtt_has_one_label_per_tag():
    labels = ConfigScope(target_mtt)()["datamodule"]["labels"]
    assert len(labels) == 50 and "female vocal" in labels  # tags with a space are one tag


def test_ctrl_c_in_extract_stops_with_one_line(mtt, tmp_path, capsys, monkeypatch):
    import datasets.prepare_folder

    gt_dir, audio_dir = mtt
    real = datasets.prepare_folder._extract_one
    calls = []

    def interrupted_on_the_second(audio_path, mel_path):
        calls.append(audio_path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(audio_path, mel_path)

    monkeypatch.setattr(datasets.prepare_folder, "_extract_one", interrupted_on_the_second)
    args = ["extract", "--audio-dir", str(audio_dir), "--out-dir", str(tmp_path / "mels"), "--jobs", "1", "--groundtruth-dir", str(gt_dir)]
    assert main_not_interrupted(main, args) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted (1 of 5 mel file(s) complete, 1 of them written in this run); run the same command again to resume: "
        "finished files are kept, not made again"
    ]


def test_a_split_where_every_clip_fails_names_each_clip(mtt, tmp_path, capsys, caplog):
    gt_dir, audio_dir = mtt
    for path in audio_dir.rglob("*.mp3"):
        path.write_bytes(b"not audio" * 10)
    args = ["extract", "--audio-dir", str(audio_dir), "--out-dir", str(tmp_path / "mels"), "--jobs", "1", "--groundtruth-dir", str(gt_dir)]
    assert main(args) == 1
    assert "split has a mel in" in caplog.text
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == len(CLIPS)  # the error, and why each clip failed
