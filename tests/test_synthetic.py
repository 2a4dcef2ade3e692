"""helpers/synthetic.py: the demo dataset is learnable, laid out in our formats, deterministic, made once."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from helpers.audio import audio_to_mel
from helpers.melfiles import MelReader, load_groundtruth
from helpers.synthetic import LABELS, make_synthetic_dataset, synthesize_track, track_labels
from models.mel import n_frames_for

SPLIT_KEYS = ("groundtruth_train", "groundtruth_val", "groundtruth_test")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_tracks=120, clip_length=10.0, seed=0)


def band_statistics(reader: MelReader, gt: dict) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([np.concatenate([reader.read(k).mean(0), reader.read(k).std(0)]) for k in gt])
    y = np.stack([gt[k] for k in gt]).astype(int)
    return x, y


def test_labels_are_learnable_from_mel_band_statistics(dataset):
    reader = MelReader(dataset["base_dir"])
    train = {**load_groundtruth(dataset["groundtruth_train"]), **load_groundtruth(dataset["groundtruth_val"])}
    x_train, y_train = band_statistics(reader, train)
    x_test, y_test = band_statistics(reader, load_groundtruth(dataset["groundtruth_test"]))

    model = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000)))
    scores = model.fit(x_train, y_train).predict_proba(x_test)

    assert roc_auc_score(y_test, scores, average="macro") >= 0.9


def test_layout_splits_and_labels(dataset):
    assert dataset["n_classes"] == len(LABELS) == 10
    with open(dataset["labels_path"]) as f:
        assert f.read().splitlines() == list(LABELS)
    splits = [load_groundtruth(dataset[k]) for k in SPLIT_KEYS]
    gt_all = load_groundtruth(dataset["groundtruth_all"])
    assert [len(s) for s in splits] == pytest.approx([84, 18, 18], abs=len(LABELS))  # 70/15/15 of 120
    assert set().union(*splits) == set(gt_all) and sum(map(len, splits)) == len(gt_all) == 120
    assert sorted(gt_all)[:2] == ["mels/track_0000.mmap", "mels/track_0001.mmap"]
    for split in splits:
        y = np.stack(list(split.values()))
        assert y.dtype == bool and y.shape[1] == 10
        assert y.any(axis=0).all(), "every label is present in every split"
        assert set(y.sum(axis=1)) <= {1, 2, 3}

    reader = MelReader(dataset["base_dir"])
    frames = np.array([reader.n_frames(k) for k in gt_all])
    clip = n_frames_for(10.0)
    assert frames.min() >= int(0.8 * clip) and frames.max() <= int(1.4 * clip) + 2
    assert (frames < clip).sum() > 10 and (frames > clip).sum() > 10  # padding and cropping both happen


def test_stored_mels_equal_the_front_end_on_the_synthesized_audio(dataset):
    reader = MelReader(dataset["base_dir"])
    for index in (0, 17, 119):  # batched with padding in the generator; alone here
        expected = audio_to_mel(synthesize_track(seed=0, index=index, clip_length=10.0))
        stored = reader.read(f"mels/track_{index:04d}.mmap")
        assert stored.shape == expected.shape
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)  # float16 storage


def test_label_sounds_sit_in_their_mel_bands():
    """ "high tone" (2.8-3.4 kHz, mel bands ~63-69) stands out there exactly in the tracks that have it."""
    high_tone = LABELS.index("high tone")
    for index in range(20):
        mel = audio_to_mel(synthesize_track(seed=0, index=index, clip_length=3.0))
        peak = mel[:, 62:71].mean(axis=0).max()  # (frames, 96) -> strongest band of the region
        assert (peak > 2.5) == track_labels(seed=0, index=index)[high_tone], index


def files_of(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_any_jobs_and_other_seed_differs(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_tracks=30, clip_length=2.0, seed=3)
    make_synthetic_dataset(tmp_path / "b", n_tracks=30, clip_length=2.0, seed=3, n_jobs=2)
    make_synthetic_dataset(tmp_path / "c", n_tracks=30, clip_length=2.0, seed=4)

    files_a, files_b, files_c = files_of(tmp_path / "a"), files_of(tmp_path / "b"), files_of(tmp_path / "c")
    assert len(files_a) == 30 + 4 + 2  # mels, ground truth pickles, labels.txt, DONE.json
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert files_a[next(iter(k for k in files_a if k.suffix == ".mmap"))] != files_c[
        next(iter(k for k in files_c if k.suffix == ".mmap"))
    ]
    assert json.loads((tmp_path / "a" / "DONE.json").read_text())["n_tracks"] == 30
    assert a["base_dir"] == str(tmp_path / "a")


def test_done_marker_skips_regeneration_and_partial_or_changed_dirs_regenerate(tmp_path):
    out = tmp_path / "syn"
    make_synthetic_dataset(out, n_tracks=30, clip_length=2.0)
    mel = out / "mels" / "track_0007.mmap"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    make_synthetic_dataset(out, n_tracks=30, clip_length=2.0)  # same parameters: nothing touched
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

    original = mel.read_bytes()
    mel.unlink()
    (out / "DONE.json").unlink()  # a run that stopped half-way
    make_synthetic_dataset(out, n_tracks=30, clip_length=2.0)
    assert mel.read_bytes() == original and (out / "DONE.json").is_file()

    make_synthetic_dataset(out, n_tracks=40, clip_length=2.0)  # other parameters: regenerated
    assert json.loads((out / "DONE.json").read_text())["n_tracks"] == 40
    assert len(load_groundtruth(out / "groundtruth-all.pk")) == 40
    assert len(list((out / "mels").glob("track_*.mmap"))) == 40

    make_synthetic_dataset(out, n_tracks=30, clip_length=2.0)  # back to fewer tracks: stale files go
    assert len(list((out / "mels").glob("track_*.mmap"))) == 30


def test_rejects_too_few_tracks(tmp_path):
    with pytest.raises(ValueError, match=r"n_tracks=12 is too small.*n_tracks >= 30"):
        make_synthetic_dataset(tmp_path, n_tracks=12)
