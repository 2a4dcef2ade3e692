"""One way to cut a file into clips: test, validation, extraction and prediction give the same clips.

``helpers.data.ClipDataset`` (test clips, the validation centre clip), ``helpers.data.FileClips``
(extraction) and ``models.inference.split_into_clips`` (prediction from audio) all follow
``models.inference.clip_starts`` and its padding; ``hop_frames_for`` reads ``datamodule.test_hop``
and ``predict.hop`` alike.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ex_maest
from helpers.data import ClipDataset, FileClips, hop_frames_for
from helpers.datamodule import MAESTDataModule
from helpers.extract import extract
from helpers.melfiles import MelReader, save_groundtruth, write_mel
from models import get_maest
from models.inference import split_into_clips
from models.mel import N_MELS, n_frames_for, normalize
from tests.builders import maest_datamodule

CLIP_LENGTH = 2
N_FRAMES = n_frames_for(CLIP_LENGTH)  # 125
# shorter than a clip, exactly one, one and a bit (tail), several with a tail, several exactly
LENGTHS = {"short.mmap": 40, "one.mmap": 125, "tail.mmap": 131, "d/long.npy": 407, "d/four.mmap": 500}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    mels = {}
    for key, frames in LENGTHS.items():
        mel = rng.uniform(0.0, 4.0, size=(frames, N_MELS)).astype(np.float16)
        write_mel(tmp / "mels" / key, mel)
        mels[key] = mel.astype(np.float32)
    gt = {key: np.eye(3, dtype=bool)[i % 3] for i, key in enumerate(LENGTHS)}
    return tmp / "mels", save_groundtruth(tmp / "gt.pk", gt), gt, mels


def _test_clips(ds: ClipDataset) -> dict[str, torch.Tensor]:
    """ClipDataset items grouped by file: key -> (n_clips, 1, n_mels, n_frames), in item order."""
    by_key: dict[str, list] = {}
    for x, key, _ in (ds[i] for i in range(len(ds))):
        by_key.setdefault(key, []).append(x)
    return {k: torch.stack(v) for k, v in by_key.items()}


@pytest.mark.parametrize("hop", ["full", "half"])
def test_test_and_extraction_cut_the_same_clips(data, hop):
    base, _, gt, mels = data
    hop_frames = hop_frames_for(hop, N_FRAMES)
    test = _test_clips(ClipDataset(reader=MelReader(base), groundtruth=gt, n_frames=N_FRAMES, hop_frames=hop_frames))
    extraction = FileClips(MelReader(base), list(LENGTHS), N_FRAMES, hop_frames)
    assert list(test) == list(LENGTHS)  # every file, in ground-truth order
    for i, key in enumerate(LENGTHS):
        ext_key, clips, error = extraction[i]
        assert (ext_key, error) == (key, None)
        torch.testing.assert_close(test[key], clips, rtol=0, atol=0)
        # prediction from audio cuts the mel the same way (normalised afterwards, as track_probabilities)
        audio_path = normalize(split_into_clips(torch.from_numpy(mels[key].T), N_FRAMES, hop_frames)).unsqueeze(1)
        torch.testing.assert_close(audio_path, clips, rtol=0, atol=0)


def test_counts_and_tail_alignment(data):
    base, _, gt, mels = data
    # full hop: ceil(frames / 125); half hop (62): starts 0, 62, ... then one aligned to the end
    expected = {
        "full": {"short.mmap": 1, "one.mmap": 1, "tail.mmap": 2, "d/long.npy": 4, "d/four.mmap": 4},
        "half": {"short.mmap": 1, "one.mmap": 1, "tail.mmap": 2, "d/long.npy": 6, "d/four.mmap": 8},
    }
    for hop, counts in expected.items():
        clips = FileClips(MelReader(base), list(LENGTHS), N_FRAMES, hop_frames_for(hop, N_FRAMES))
        for i, key in enumerate(LENGTHS):
            _, x, _ = clips[i]
            assert x.shape == (counts[key], 1, N_MELS, N_FRAMES), (hop, key)
            if LENGTHS[key] >= N_FRAMES:  # the last clip ends with the file's last frame, the first starts with its first
                torch.testing.assert_close(x[-1, 0], normalize(torch.from_numpy(mels[key][-N_FRAMES:].T)))
                torch.testing.assert_close(x[0, 0], normalize(torch.from_numpy(mels[key][:N_FRAMES].T)))


def test_validation_centre_clip_is_one_of_the_same_rule(data):
    base, _, gt, mels = data
    centre = _test_clips(ClipDataset(reader=MelReader(base), groundtruth=gt, n_frames=N_FRAMES, center_clip=True))
    test = _test_clips(ClipDataset(reader=MelReader(base), groundtruth=gt, n_frames=N_FRAMES))
    for key, frames in LENGTHS.items():
        assert centre[key].shape == (1, 1, N_MELS, N_FRAMES)
        if frames <= N_FRAMES:  # a file of at most one clip: validation scores the very clip test scores
            torch.testing.assert_close(centre[key], test[key], rtol=0, atol=0)
        else:
            start = (frames - N_FRAMES) // 2
            torch.testing.assert_close(centre[key][0, 0], normalize(torch.from_numpy(mels[key][start : start + N_FRAMES].T)))


def test_extract_logits_are_the_logits_of_the_test_clips(data, tmp_path):
    """End to end: the test loader's clips through the model give exactly what extraction writes."""
    base, gt_path, _, _ = data
    torch.manual_seed(0)
    model = get_maest("maest-tiny", n_classes=3, input_t=N_FRAMES)
    extract(model, base_dir=base, groundtruth=gt_path, out_dir=tmp_path / "out", kind="logits",
            n_frames=N_FRAMES, hop_frames=hop_frames_for("half", N_FRAMES), progress=False)
    dm = maest_datamodule(base_dir=base, clip_length=CLIP_LENGTH, groundtruth_test=gt_path, test_hop="half", batch_size_test=5)
    logits: dict[str, list] = {}
    with torch.no_grad():
        for x, keys, _ in dm.test_dataloader():
            for key, row in zip(keys, model(x)):
                logits.setdefault(key, []).append(row)
    for key in LENGTHS:
        written = np.load(tmp_path / "out" / f"{key}.logits.npy")
        np.testing.assert_allclose(written, torch.stack(logits[key]).numpy(), rtol=0, atol=1e-5)


def test_one_hop_setting_read_in_one_place(tmp_path):
    assert [hop_frames_for(h, 125) for h in ("full", "half")] == [125, 62]
    assert hop_frames_for("half", 1) == 1  # never a zero hop
    with pytest.raises(ValueError, match=r"predict.hop must be 'full' \(consecutive clips\) or 'half' \(half-overlapping clips\), got 'third'"):
        hop_frames_for("third", 125)
    # the data module and the Sacred config check refuse a wrong datamodule.test_hop with the same words
    message = r"datamodule.test_hop must be 'full' \(consecutive clips\) or 'half' \(half-overlapping clips\), got 'quarter'"
    with pytest.raises(ValueError, match=message):
        maest_datamodule(base_dir=tmp_path, clip_length=CLIP_LENGTH, test_hop="quarter")
    config = {ing.path: dict(ing.configurations[0]()) for ing in ex_maest.ex.ingredients}
    config.update(dict(ex_maest.ex.configurations[0]()))
    config["datamodule"]["test_hop"] = "quarter"
    with pytest.raises(ValueError, match=message):
        ex_maest.check_config(config)
    assert maest_datamodule(base_dir=tmp_path, clip_length=CLIP_LENGTH, test_hop="half").hop_frames == 62


def test_the_data_module_has_no_prediction_stage():
    """Extraction and prediction cut their clips without the data module (one path, not two)."""
    from helpers.module import MAESTModule

    assert "groundtruth_predict" not in MAESTDataModule.__init__.__code__.co_varnames
    assert "predict_dataloader" not in vars(MAESTDataModule) and "predict_step" not in vars(MAESTModule)


@pytest.mark.parametrize("hop", [0, -5, 126, 62.5, True])
def test_split_into_clips_refuses_a_hop_that_is_not_1_to_one_clip(hop):
    # None is the one spelling of "consecutive clips" (ClipDataset's too); 0 is no hop, not a full one.
    for frames in (500, 40):  # a long and a short mel alike
        with pytest.raises(ValueError, match=rf"hop_frames.*{hop!r}|hop_frames={hop} longer than n_frames=125"):
            split_into_clips(torch.zeros(N_MELS, frames), N_FRAMES, hop_frames=hop)
    assert split_into_clips(torch.zeros(N_MELS, 500), N_FRAMES, hop_frames=None).shape == (4, N_MELS, N_FRAMES)
