import logging
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from helpers.datamodule import MAESTDataModule
from helpers.melfiles import save_groundtruth, write_mel, write_mels_hdf5
from helpers.sampler import BalancedSampler, RandomEpochSampler
from tests.builders import maest_datamodule

CLIP_LENGTH = 1  # second -> 62 frames
N_FRAMES = 62
LENGTHS = [30, 62, 150, 100, 200]  # test clips (hop 62): 1, 1, 3, 2, 4
N_CLASSES = 4


def _mel(n_frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 4, (n_frames, 96)).astype(np.float32)


def _write(tmp_path, kind: str):
    """Mel files of LENGTHS in `kind` (.mmap, .npy or an .h5 store) and one ground truth for every split."""
    mels = {f"d{i % 2}/track{i}.{'npy' if kind == 'npy' else 'mmap'}": _mel(n, i) for i, n in enumerate(LENGTHS)}
    if kind == "h5":
        base_dir = tmp_path / "mels.h5"
        write_mels_hdf5(base_dir, mels)
    else:
        base_dir = tmp_path / "mels"
        for key, mel in mels.items():
            write_mel(base_dir / key, mel)
    gt = {key: np.eye(N_CLASSES, dtype=bool)[i % N_CLASSES] for i, key in enumerate(mels)}
    gt_path = save_groundtruth(tmp_path / "gt.pk", gt)
    return base_dir, gt_path, gt


def _datamodule(base_dir, gt_path, **kwargs) -> MAESTDataModule:
    args = dict(
        base_dir=base_dir,
        clip_length=CLIP_LENGTH,
        groundtruth_train=gt_path,
        groundtruth_val=gt_path,
        groundtruth_test=gt_path,
        batch_size_train=3,
        batch_size_test=4,
        num_workers=0,
        epoch_length=7,
    )
    return maest_datamodule(**{**args, **kwargs})


@pytest.mark.parametrize("kind", ["mmap", "npy", "h5"])
def test_dataloaders_give_model_shaped_batches(tmp_path, kind):
    base_dir, gt_path, gt = _write(tmp_path, kind)
    dm = _datamodule(base_dir, gt_path)
    assert dm.n_frames == N_FRAMES and dm.n_classes == N_CLASSES
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert [len(b[1]) for b in train] == [3, 3, 1]  # epoch_length 7
    x, keys, y = train[0]
    assert x.shape == (3, 1, 96, N_FRAMES) and x.dtype == torch.float32
    assert y.shape == (3, N_CLASSES) and all(k in gt for k in keys)
    for key, target in zip(keys, y):
        assert target.tolist() == gt[key].astype(float).tolist()
    val = list(dm.val_dataloader())
    assert sum(len(b[1]) for b in val) == len(LENGTHS)  # one centre clip per file
    test = list(dm.test_dataloader())
    assert sum(len(b[1]) for b in test) == 1 + 1 + 3 + 2 + 4
    assert all(b[0].shape[1:] == (1, 96, N_FRAMES) for b in test)
    test_keys = [k for b in test for k in b[1]]
    assert test_keys == [k for k, n in zip(gt, [1, 1, 3, 2, 4]) for _ in range(n)]  # clips in file order


def test_half_overlap_and_worker_processes(tmp_path):
    base_dir, gt_path, _ = _write(tmp_path, "h5")  # h5 handles must not cross into workers
    dm = _datamodule(base_dir, gt_path, test_hop="half", num_workers=1)
    loader = dm.test_dataloader()
    assert loader.persistent_workers
    # hop 31: 30 -> 1, 62 -> 1, 150 -> 0 31 62 88, 100 -> 0 31 38, 200 -> 0 31 62 93 124 138
    assert sum(len(b[1]) for b in loader) == 1 + 1 + 4 + 3 + 6
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 1, 96, N_FRAMES)


def test_truncated_test_file_is_skipped_with_a_warning(tmp_path, caplog):
    base_dir, _, gt = _write(tmp_path, "mmap")
    (base_dir / "broken.mmap").write_bytes(b"\x01" * (96 * 2 * 10 + 5))
    gt_test = save_groundtruth(tmp_path / "gt_test.pk", {**gt, "broken.mmap": np.eye(N_CLASSES, dtype=bool)[0]})
    dm = _datamodule(base_dir, tmp_path / "gt.pk", groundtruth_test=gt_test)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in dm.test_dataloader() for k in b[1]]
    assert "broken.mmap" in caplog.text and "truncated" in caplog.text
    assert set(keys) == set(gt) and len(keys) == 11
    assert dm.dataset("test").skipped == ["broken.mmap"]


def test_training_sampler_uses_the_global_rank_of_the_trainer(tmp_path):
    base_dir, gt_path, _ = _write(tmp_path, "mmap")
    shares = []
    for rank in range(3):
        dm = _datamodule(base_dir, gt_path, epoch_length=8, seed=4)
        dm.trainer = SimpleNamespace(
            global_rank=rank, world_size=3, _accelerator_connector=SimpleNamespace(use_distributed_sampler=False)
        )
        sampler = dm.train_dataloader().sampler
        assert isinstance(sampler, BalancedSampler) and (sampler.rank, sampler.world_size) == (rank, 3)
        assert len(sampler) == math.ceil(8 / 3)
        shares.append(list(sampler))
    whole = list(_datamodule(base_dir, gt_path, epoch_length=8, seed=4).train_dataloader().sampler)
    assert [shares[i % 3][i // 3] for i in range(8)] == whole
    dm.trainer = SimpleNamespace(
        global_rank=0, world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


def test_random_sampler_and_default_epoch_length(tmp_path):
    base_dir, gt_path, _ = _write(tmp_path, "mmap")
    sampler = _datamodule(base_dir, gt_path, sampler="random", epoch_length=None).train_dataloader().sampler
    assert isinstance(sampler, RandomEpochSampler) and len(sampler) == len(LENGTHS)


def test_teacher_targets_come_as_a_fourth_element(tmp_path):
    base_dir, gt_path, gt = _write(tmp_path, "mmap")
    teacher = tmp_path / "teacher"
    for key in gt:
        (teacher / key).parent.mkdir(parents=True, exist_ok=True)
        np.save(teacher / f"{key}.logits.npy", np.array([[-5.0, -5.0, 5.0, -5.0]] * 2, dtype=np.float32))
    dm = _datamodule(base_dir, gt_path, teacher_dir=teacher, teacher_threshold=0.45)
    x, keys, y, y_teacher = next(iter(dm.train_dataloader()))
    assert y_teacher.shape == (3, N_CLASSES) and (y_teacher == torch.tensor([0.0, 0.0, 1.0, 0.0])).all()


def test_configuration_errors_name_the_key(tmp_path):
    base_dir, gt_path, _ = _write(tmp_path, "mmap")
    with pytest.raises(ValueError, match="datamodule.groundtruth_test is not set"):
        _datamodule(base_dir, gt_path, groundtruth_test=None).test_dataloader()
    with pytest.raises(ValueError, match="datamodule.sampler"):
        _datamodule(base_dir, gt_path, sampler="weighted")
    with pytest.raises(ValueError, match="datamodule.test_hop"):
        _datamodule(base_dir, gt_path, test_hop="quarter")
    other = save_groundtruth(tmp_path / "gt5.pk", {"d0/track0.mmap": np.zeros(5, dtype=bool)})
    dm = _datamodule(base_dir, gt_path, groundtruth_val=other)
    with pytest.raises(ValueError, match="groundtruth_val has 5 classes but the other ground truths have 4"):
        dm.setup("fit")
    assert _datamodule(base_dir, gt_path, groundtruth_val=None).val_dataloader() == []


class _KeyRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(96, 1)
        self.keys: list[list[str]] = [[]]

    def training_step(self, batch, batch_idx):
        x, keys, y = batch
        self.keys[-1].extend(keys)
        return self.layer(x.mean(-1)).mean()

    def on_train_epoch_end(self):
        self.keys.append([])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_draws_a_new_epoch_each_time(tmp_path):
    base_dir, gt_path, _ = _write(tmp_path, "mmap")
    dm = _datamodule(base_dir, gt_path, epoch_length=12, sampler="random", sampler_replacement=False)
    module = _KeyRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    first, second = module.keys[0], module.keys[1]
    assert len(first) == len(second) == 12
    assert first != second  # Lightning called set_epoch on the sampler
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(1)
    assert [dm.dataset("train").key(i) for i in sampler] == second


def test_the_default_worker_count_is_four_or_the_usable_cpus(monkeypatch):
    import helpers.data
    from configs.ingredients.datamodule import datamodule_ing

    for cpus, expected in ((2, 2), (16, 4), (1, 1)):
        monkeypatch.setattr(helpers.data, "usable_cpus", lambda: cpus)
        assert helpers.data.default_num_workers() == expected
    monkeypatch.setattr(helpers.data, "usable_cpus", lambda: 3)
    config = datamodule_ing.configurations[0]()
    assert config["num_workers"] == 3
