"""The MAEST data module: every data decision of training, validation and test.

Extraction and prediction do not go through it: they cut files into the same clips themselves
(``helpers.extract``, ``helpers.data.FileClips``), one file at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from helpers.data import ClipDataset, TrainDataset, hop_frames_for
from helpers.melfiles import MelReader, load_groundtruth
from helpers.sampler import SAMPLERS, BalancedSampler, RandomEpochSampler
from models.mel import n_frames_for

logger = logging.getLogger(__name__)




class ShardSampler(torch.utils.data.Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: every item exactly once over all ranks."""

    def __init__(self, n_items: int, rank: int, world_size: int):
        self.indices = range(rank, n_items, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def resume_start(state: dict[str, int], rank: int, world_size: int, per_rank: int) -> int:
    """Where ``rank`` of ``world_size`` resumes its shard of the epoch's draw after ``state`` (TrainLoader's).

    Rank r's shard holds the draw's positions ``r, r + world_size, ...``, so after ``batches_done``
    batches of ``batch_size`` on every one of the checkpoint's ranks, exactly the first
    ``batches_done * batch_size * world_size`` positions were trained on, whatever the layout now:
    this rank skips its positions below that (the same number as before when the layout is the same).
    """
    done = state["batches_done"] * state["batch_size"] * state["world_size"]
    return min(max(0, -(-(done - rank) // world_size)), per_rank)


class TrainLoader(DataLoader):
    """The training DataLoader; resumable mid-epoch through Lightning's stateful-loader protocol.

    Lightning stores ``state_dict()`` in every checkpoint and, when it restarts inside an epoch,
    calls ``load_state_dict`` before it iterates: the sampler then skips the batches that were
    trained on before the kill. ``batches_done`` reports how many batches of the current epoch
    the training loop has processed (the loader itself cannot tell: batches are prefetched).
    """

    batches_done: Callable[[], int] | None = None

    def state_dict(self) -> dict[str, int]:
        done = self.batches_done() if self.batches_done is not None else 0
        return {"epoch": self.sampler.epoch, "batches_done": done, "batch_size": self.batch_size, "world_size": self.sampler.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        layout = (state["batch_size"], state["world_size"])
        if layout != (self.batch_size, self.sampler.world_size):
            logger.warning(
                "resuming with batch_size_train=%d on %d ranks from a checkpoint of batch_size_train=%d on %d ranks: "
                "the rest of the interrupted epoch trains each draw not trained on yet once, but in other batches",
                self.batch_size, self.sampler.world_size, *layout,
            )
        self.sampler.resume(state["epoch"], resume_start(state, self.sampler.rank, self.sampler.world_size, len(self.sampler)))


class MAESTDataModule(pl.LightningDataModule):
    """Stored mel spectrograms and ground truths (SPEC §3) -> MAEST batches.

    - train: one random crop of ``clip_length`` seconds per draw (``TrainDataset``), drawn by a
      class-balanced (``sampler="balanced"``, upstream MAEST) or uniform (``"random"``) sampler,
      ``epoch_length`` draws per epoch; with ``teacher_dir``, batches also hold hard teacher
      targets from ``<teacher_dir>/<key>.logits.npy``;
    - val: the centre clip of every file; test: every clip of every file, consecutive
      (``test_hop="full"``) or half-overlapping (``"half"``), tail included: the clips
      extraction cuts (``helpers.data``). Clips of a file are consecutive items in time order.

    Batches are ``(x (B, 1, 96, n_frames), keys, y (B, n_classes)[, y_teacher])``, ``x``
    normalised unless ``normalize=False``. Files the evaluation sets cannot read (checked before
    the first batch) are logged and left out (``ClipDataset.failures``); the ``test`` command
    lists them and fails after testing the others.

    Distributed training: build the Trainer with ``use_distributed_sampler=False``. The training
    sampler shards one shared draw by the global rank and world size it reads from
    ``self.trainer`` (right across nodes); Lightning's own distributed sampler would shard it
    again. Evaluation loaders give each rank a disjoint share (``ShardSampler``).
    """

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike,
        clip_length: float,
        groundtruth_train: str | os.PathLike | None,
        groundtruth_val: str | os.PathLike | None,
        groundtruth_test: str | os.PathLike | None,
        batch_size_train: int,
        batch_size_test: int,
        num_workers: int,
        epoch_length: int | None,
        sampler: str,
        sampler_replacement: bool,
        seed: int,
        teacher_dir: str | os.PathLike | None,
        teacher_threshold: float,
        test_hop: str,
        pin_memory: bool,
        normalize: bool = True,
    ):
        """No defaults: the ``datamodule`` config scope (``configs/ingredients/datamodule.py``) holds them.

        Args:
            base_dir: folder of the mel files, or an ``.h5`` store; ground-truth keys are relative to it.
            clip_length: seconds per clip; ``n_frames = clip_length * 16000 // 256``.
            groundtruth_train/val/test: ground-truth pickles (key -> multi-hot), or None; each is
                needed only by its stage.
            batch_size_train: training batch size per device.
            batch_size_test: batch size of validation and test.
            num_workers: DataLoader worker processes (persistent when > 0).
            epoch_length: training draws per epoch over all ranks; None: the number of training tracks.
            sampler: "balanced" (class-balanced, upstream MAEST) or "random" (uniform).
            sampler_replacement: draw with replacement (upstream MAEST drew without).
            seed: seeds the sampler (with the epoch) and each draw's crop offset (with the epoch and the draw's position).
            normalize: apply the model-input normalisation to the mels.
            teacher_dir: folder of teacher logits for teacher-student training, or None.
            teacher_threshold: sigmoid threshold of the hard teacher targets.
            test_hop: "full" (consecutive clips) or "half" (half-overlapping) for test (``hop_frames_for``).
            pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        """
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"datamodule.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if batch_size_train < 1 or batch_size_test < 1:
            raise ValueError(
                "batch sizes must be positive, got "
                f"batch_size_train={batch_size_train}, batch_size_test={batch_size_test}"
            )
        if num_workers < 0:
            raise ValueError(f"datamodule.num_workers must be >= 0, got {num_workers}")
        self.base_dir = base_dir
        self.clip_length = clip_length
        self.n_frames = n_frames_for(clip_length)
        if self.n_frames < 1:
            raise ValueError(f"datamodule.clip_length={clip_length} s is shorter than one frame")
        self.hop_frames = hop_frames_for(test_hop, self.n_frames, key="datamodule.test_hop")
        self.groundtruth = {
            "train": groundtruth_train,
            "val": groundtruth_val,
            "test": groundtruth_test,
        }
        self.batch_size_train = batch_size_train
        self.batch_size_test = batch_size_test
        self.num_workers = num_workers
        self.epoch_length = epoch_length
        self.sampler = sampler
        self.sampler_replacement = sampler_replacement
        self.seed = seed
        self.normalize = normalize
        self.teacher_dir = teacher_dir
        self.teacher_threshold = teacher_threshold
        self.pin_memory = pin_memory
        self.reader = MelReader(base_dir)
        self._datasets: dict[str, TrainDataset | ClipDataset] = {}
        self._n_classes: int | None = None
        self._digest: str | None = None  # of the training tracks and labels (_train_digest)

    def _load_groundtruth(self, split: str) -> dict[str, np.ndarray]:
        path = self.groundtruth[split]
        if path is None:
            raise ValueError(f"datamodule.groundtruth_{split} is not set: the {split} stage needs a ground-truth file")
        return load_groundtruth(path)

    @property
    def n_classes(self) -> int:
        """Classes of the ground truth (the first one set of train, val, test)."""
        if self._n_classes is None:
            split = next((s for s, path in self.groundtruth.items() if path is not None), None)
            if split is None:
                raise ValueError("no ground truth is set: give datamodule.groundtruth_train (or val, test)")
            self._n_classes = self.dataset(split).n_classes
        return self._n_classes

    def dataset(self, split: str) -> TrainDataset | ClipDataset:
        """The dataset of ``split`` ("train", "val", "test"), built once."""
        if split not in self._datasets:
            gt = self._load_groundtruth(split)
            if split == "train":
                ds = TrainDataset(
                    reader=self.reader,
                    groundtruth=gt,
                    n_frames=self.n_frames,
                    normalize=self.normalize,
                    teacher_dir=self.teacher_dir,
                    teacher_threshold=self.teacher_threshold,
                    seed=self.seed,
                )
            else:
                ds = ClipDataset(
                    reader=self.reader,
                    groundtruth=gt,
                    n_frames=self.n_frames,
                    hop_frames=self.hop_frames,
                    normalize=self.normalize,
                    center_clip=split == "val",
                )
            if self._n_classes is None:
                self._n_classes = ds.n_classes
            if ds.n_classes != self._n_classes:
                raise ValueError(
                    f"datamodule.groundtruth_{split} has {ds.n_classes} classes but the other ground truths have "
                    f"{self.n_classes}: every split must use the same label list"
                )
            self._datasets[split] = ds
            logger.info("%s set: %d tracks from %s", split, len(ds.labels), self.groundtruth[split])
        return self._datasets[split]

    def _train_digest(self) -> str:
        """SHA-1 of the training tracks and their labels, in order (computed once)."""
        if self._digest is None:
            ds = self.dataset("train")
            digest = hashlib.sha1(np.ascontiguousarray(ds._keys).tobytes())
            digest.update(str(ds.labels.dtype).encode() + np.ascontiguousarray(ds.labels).tobytes())
            self._digest = digest.hexdigest()
        return self._digest

    def state_dict(self) -> dict:
        """Kept in every checkpoint (Lightning's data-module state): what the run trains on, so that a
        resume on other data says so."""
        if self.groundtruth["train"] is None or "train" not in self._datasets:
            return {}
        return {"train_tracks": len(self.dataset("train").labels), "train_digest": self._train_digest()}

    def load_state_dict(self, state: dict) -> None:
        if not state or "train_digest" not in state or self.groundtruth["train"] is None:
            return  # a checkpoint of an older version, or no training here
        if state["train_digest"] != self._train_digest():
            logger.warning(
                "datamodule.groundtruth_train (%s, %d tracks) is not the training data this run had until the checkpoint "
                "(%d tracks, or other labels): it goes on with this one, so it is not the run it would have been on its "
                "own data (prepared again with files added?). To keep runs on different data apart, give this one its "
                "own run_name and start it afresh, or from the checkpoint's weights with maest.checkpoint=FILE",
                self.groundtruth["train"], len(self.dataset("train").labels), state["train_tracks"],
            )

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}
        for split in splits.get(stage, ["train", "val", "test"]):
            if self.groundtruth[split] is not None:
                self.dataset(split)

    def _world(self) -> tuple[int, int]:
        """(global rank, world size) from the attached Trainer; (0, 1) without one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        rank, world_size = int(trainer.global_rank), int(trainer.world_size)
        connector = getattr(trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "MAESTDataModule shards its training draw itself: build the Trainer with "
                "use_distributed_sampler=False, or every rank's share would be sharded twice"
            )
        return rank, world_size

    def _loader(self, dataset, batch_size: int, loader_class: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        # Without a generator, every new iterator draws its worker seed from torch's global RNG,
        # which training draws on (masking, mixup, dropout): a resumed run creates them anew.
        kwargs.setdefault("generator", torch.Generator().manual_seed(self.seed))
        return loader_class(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        rank, world_size = self._world()
        epoch_length = len(dataset) if self.epoch_length is None else self.epoch_length
        common = dict(
            epoch_length=epoch_length,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            replacement=self.sampler_replacement,
        )
        if self.sampler == "balanced":
            sampler = BalancedSampler(labels=dataset.labels, **common)
        else:
            sampler = RandomEpochSampler(n_items=len(dataset), **common)
        logger.info(
            "train: %s sampler, %d draws per epoch, rank %d of %d takes %d (%d batches of %d)",
            self.sampler, epoch_length, rank, world_size, len(sampler),
            math.ceil(len(sampler) / self.batch_size_train), self.batch_size_train,
        )
        # Lightning creates the first iterator (and workers take their first indices) before it
        # calls set_epoch: start at the epoch the fit loop is in, also when it resumes.
        sampler.set_epoch(self._fit_epoch())
        # Crops are seeded by the sampler's draws (TrainDataset): worker seeds decide nothing.
        loader = self._loader(dataset, self.batch_size_train, TrainLoader, sampler=sampler)
        loader.batches_done = self._train_batches_done
        return loader

    def _fit_epoch(self) -> int:
        """The epoch the attached Trainer's fit loop trains next (0 without one)."""
        fit_loop = getattr(self.trainer, "fit_loop", None)
        return int(fit_loop.epoch_progress.current.processed) if fit_loop is not None else 0

    def _train_batches_done(self) -> int:
        fit_loop = getattr(self.trainer, "fit_loop", None)
        return int(fit_loop.epoch_loop.batch_progress.current.processed) if fit_loop is not None else 0

    def _eval_loader(self, split: str) -> DataLoader:
        """Evaluation clips; under DDP each rank takes a disjoint share (no padding duplicates),
        and the module gathers the predictions of all ranks before computing metrics once."""
        dataset = self.dataset(split)
        rank, world_size = self._world()
        sampler = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
        return self._loader(dataset, self.batch_size_test, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.groundtruth["val"] is None:
            return []  # no validation set: Lightning skips validation
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
