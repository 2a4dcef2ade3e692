"""The ``datamodule`` ingredient: the data (ground truth, mel files, clips, sampling) and its factories."""

from __future__ import annotations

import functools
import inspect
import typing

import torch
from sacred import Ingredient

from configs.ingredients.maest import model_clip_length, resolve_net
from helpers.data import default_num_workers
from models.maest import MAESTConfig
from models.mel import HOP_LENGTH, SAMPLE_RATE, n_frames_for

datamodule_ing = Ingredient("datamodule")


@datamodule_ing.config
def datamodule_config():
    base_dir = "data/discogs/mels"  # folder of mel files (or an .h5 store); ground-truth keys are relative to it
    groundtruth_train = "data/discogs/groundtruth-train.pk"  # pickle: mel path -> multi-hot vector
    groundtruth_val = "data/discogs/groundtruth-validation.pk"
    groundtruth_test = "data/discogs/groundtruth-test.pk"
    groundtruth_predict = None  # ground truth listing the files to extract (its labels are not used)
    clip_length = None  # seconds per clip (10 s = 625 frames); None: the model's, maest.input_t * 256 / 16000 (10 s for input_t 625)
    batch_size_train = 12  # per device
    batch_size_test = 20  # validation and test (extraction and predict batch by predict.batch_size)
    num_workers = default_num_workers()  # DataLoader worker processes: 4, or the CPUs if fewer
    epoch_length = 200_000  # training draws per epoch (all ranks together)
    sampler = "balanced"  # "balanced" (class-balanced weights 1000 / (count + 100)) or "random"
    sampler_replacement = False  # draw with replacement (released models: without, as upstream's code; needs epoch_length <= training tracks)
    seed = 0  # added to the run's seed, seeds the sampler draws and the crop offsets (seed=N changes the data order too)
    teacher_dir = None  # teacher logits (<dir>/<key>.logits.npy) for teacher-student training
    teacher_threshold = 0.45  # sigmoid threshold of the hard teacher targets
    test_hop = "full"  # test clips: "full" consecutive, "half" half-overlapping (as predict.hop for extraction)
    pin_memory = torch.cuda.is_available()  # page-locked batches for faster host-to-GPU copies
    # Training stores the label names in its checkpoints, so that predict and export name the classes.
    labels = None  # label names in ground-truth vector order (prepare_folder's dataset.json sets them); None: unnamed


if typing.TYPE_CHECKING:
    from helpers.datamodule import MAESTDataModule


@functools.cache
def _datamodule_keys() -> tuple[str, ...]:
    """MAESTDataModule's parameters: the datamodule keys it takes (groundtruth_predict and labels serve
    other commands; normalize has no key). Lightning is imported here, when a data module is built, not
    when the program starts (it takes seconds: print_config, predict and export do not need it)."""
    from helpers.datamodule import MAESTDataModule

    return tuple(name for name in inspect.signature(MAESTDataModule.__init__).parameters if name != "self")


@datamodule_ing.capture
def build_datamodule(_config, _run, clip_length: float) -> MAESTDataModule:
    """The data module of the ``datamodule`` config, cutting ``clip_length``-second clips (the resolved
    ``datamodule.clip_length``: ``check_training_clip`` or ``inference_clip_length``). The data's seed is
    ``datamodule.seed`` plus the run's ``seed``: another run seed draws other tracks and crops too."""
    from helpers.datamodule import MAESTDataModule

    options = {key: _config[key] for key in _datamodule_keys() if key in _config and key != "clip_length"}
    options["seed"] = _config["seed"] + _run.config["seed"]
    return MAESTDataModule(**options, clip_length=clip_length)


@datamodule_ing.capture
def check_training_clip(clip_length) -> float:
    """Before any data is read: training clips fit the time embeddings and keep patches after patchout.

    Returns the clip length in seconds (``datamodule.clip_length``, else the model's: ``input_t`` frames).
    """
    cfg = resolve_net(training=True).config
    input_t = cfg.input_t
    if clip_length is None:
        clip_length = model_clip_length(cfg)
    n_frames = n_frames_for(clip_length)
    if n_frames > cfg.max_frames:
        raise ValueError(
            f"datamodule.clip_length={clip_length} s gives {n_frames}-frame training clips, longer than the time embeddings "
            f"of maest.input_t={input_t} allow ({cfg.max_frames} frames at most): set maest.input_t={n_frames} "
            f"(clip_length * {SAMPLE_RATE} // {HOP_LENGTH}) or datamodule.clip_length={input_t * HOP_LENGTH / SAMPLE_RATE:g} or less"
        )
    if n_frames < cfg.patch_size:
        raise ValueError(f"datamodule.clip_length={clip_length} s gives {n_frames} frames, fewer than one {cfg.patch_size}-frame patch: use a longer clip")
    try:
        cfg.check_patchout(n_frames)
    except ValueError as e:
        raise ValueError(f"datamodule.clip_length={clip_length} s with maest.input_t={input_t}: {e}") from None
    return clip_length


@datamodule_ing.capture
def inference_clip_length(config: MAESTConfig, clip_length) -> float:
    """Clip length of test, extraction and prediction: ``datamodule.clip_length``, else the model's (``input_t`` frames)."""
    return model_clip_length(config) if clip_length is None else clip_length


@datamodule_ing.capture
def training_labels(n_classes: int, labels) -> list[str] | None:
    """``datamodule.labels`` checked against the classes of the ground truth (they go into the checkpoints)."""
    if labels is None:
        return None
    labels = [str(name) for name in labels]
    if len(labels) != n_classes:
        raise ValueError(f"datamodule.labels lists {len(labels)} label names but the model has {n_classes} classes: give one name per ground-truth class")
    return labels
