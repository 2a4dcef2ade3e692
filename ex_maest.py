"""MAEST experiment: pre-training, test, extraction, prediction and export (Sacred + Lightning).

    python ex_maest.py with demo                                   # train the demo model
    python ex_maest.py with maest_discogs_30sec_pretrain           # paper settings
    python ex_maest.py with maest_discogs_30sec_inference finetune target_mtt   # fine-tune on new labels
    python ex_maest.py test with ... maest.checkpoint=x.ckpt           # a checkpoint trained here needs no other maest key
    python ex_maest.py extract_embeddings with maest_30s_from_passt_infer target_mtt
    python ex_maest.py predict with maest_30s_from_passt_infer predict.audio='["song.mp3"]'
    python ex_maest.py print_config with maest_discogs_5sec_pretrain

This file is the only place where the config meets the code: ``models/`` and ``helpers/`` take
explicit arguments, built here by a few captured factories.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path

import torch
from sacred import Experiment, Ingredient
from sacred.observers import FileStorageObserver

from configs.checks import check_config_values, default_config
from configs.maest import register_named_configs
from configs.runs import check_run_name, run_dir, run_name_for, trained_run_name, uses_synthetic_data
from helpers.data import hop_frames_for
from helpers.datamodule import MAESTDataModule
from helpers.extract import extract, predict_files, write_predictions
from helpers.failures import format_failures, update_failure_list
from helpers.files import write_text_atomic
from helpers.module import MAESTModule
from models import get_maest
from models.mel import HOP_LENGTH, SAMPLE_RATE, n_frames_for
from models.checkpoints import read_model_record
from models.maest import MAESTConfig
from models.registry import REGISTRY, config_from_record, pretrained_path

_logger = logging.getLogger("ex_maest")

maest_ing = Ingredient("maest")
datamodule_ing = Ingredient("datamodule")
module_ing = Ingredient("module")
trainer_ing = Ingredient("trainer")
predict_ing = Ingredient("predict")
export_ing = Ingredient("export")


@maest_ing.config
def maest_config():
    arch = None  # registry name (models/registry.py): an init architecture or a released model; None: the checkpoint's, else DEFAULT_ARCH
    pretrained = False  # initialise from the arch's weights in the weights directory (PaSST/DeiT/MAEST)
    weights_dir = None  # where pre-trained weights live; None: $MAEST_WEIGHTS_DIR or ./weights
    checkpoint = None  # a MAEST checkpoint to load (Lightning .ckpt, state dict, or Hugging Face directory)
    checkpoint_swa_weights = True  # from a Lightning checkpoint, load the SWA weights (False: the plain ones)
    trust_checkpoint = False  # True: unpickle checkpoint/weights files fully, running any code they hold (only files you trust)
    reinit_heads = False  # training only: fine-tune on other labels: load the backbone strictly, re-initialise the heads for n_classes
    n_classes = None  # output classes; None: the checkpoint's, else the training ground truth's, else the arch's
    input_f = 96  # mel bands
    input_t = None  # frames of the longest clip (seconds * 16000 // 256), sizing the time embeddings; None: the checkpoint's, else the arch's (625 for init archs)
    s_patchout_t = 0  # training: time columns dropped per input (structured patchout)
    s_patchout_f = 0  # training: frequency rows dropped per input
    u_patchout = 0  # training: random patches dropped (unstructured patchout)
    s_patchout_f_indices = ()  # inference patchout: frequency rows always dropped
    s_patchout_f_interleaved = 0  # inference patchout: keep every n-th frequency row (0 = off)
    s_patchout_t_indices = ()  # inference patchout: time columns always dropped
    s_patchout_t_interleaved = 0  # inference patchout: keep every n-th time column (0 = off)
    distilled_type = None  # "mean": head((CLS+DIST)/2); "separated": CLS and DIST heads (teacher-student); None: the checkpoint's, else the arch's
    drop_path_rate = 0.0  # stochastic depth of the transformer blocks
    fused_attention = True  # F.scaled_dot_product_attention (False: explicit attention)


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
    num_workers = 4  # DataLoader worker processes
    epoch_length = 200_000  # training draws per epoch (all ranks together)
    sampler = "balanced"  # "balanced" (class-balanced weights 1000 / (count + 100)) or "random"
    sampler_replacement = False  # draw with replacement (released models: without, as upstream's code; needs epoch_length <= training tracks)
    seed = 0  # seeds the sampler draws and the crop offsets
    teacher_dir = None  # teacher logits (<dir>/<key>.logits.npy) for teacher-student training
    teacher_threshold = 0.45  # sigmoid threshold of the hard teacher targets
    test_hop = "full"  # test clips: "full" consecutive, "half" half-overlapping (as predict.hop for extraction)
    pin_memory = torch.cuda.is_available()  # page-locked batches for faster host-to-GPU copies
    # Training stores the label names in its checkpoints, so that predict and export name the classes.
    labels = None  # label names in ground-truth vector order (prepare_folder's dataset.json sets them); None: unnamed


@module_ing.config
def module_config():
    # Defaults: the recipe that produced the released models; the named config `recipe_paper`
    # (configs/maest.py) switches to the one upstream's config describes (README, "Training recipe").
    lr = 2e-5  # AdamW peak learning rate
    weight_decay = 1e-4  # AdamW weight decay (upstream: on every parameter)
    no_weight_decay_tokens = False  # no weight decay on the tokens and position embeddings (MAEST.no_weight_decay())
    no_weight_decay_biases_norms = False  # no weight decay on biases and LayerNorm weights (as timm)
    warm_up_len = 5  # epochs of exponential warm-up
    ramp_down_start = 50  # epoch where the linear ramp-down starts (released models: the SWA phase replaced it from epoch 49)
    ramp_down_len = 50  # epochs of the ramp-down
    last_lr_value = 0.01  # final learning rate as a fraction of the peak
    mixup_alpha = 0.3  # Beta(alpha, alpha) mixup of inputs and targets; 0 disables it
    masking = False  # SpecAugment masking (released models: none, upstream's code discarded the masked batch)
    mask_p = 0.2  # masking: a time mask covers at most this fraction of the frames (torchaudio's p; not a probability)
    n_time_masks = 20  # masking: time masks per input
    max_time_width = 8  # masking: time masks are 0 to max_time_width - 1 frames wide (torchaudio's time_mask_param)
    n_freq_masks = 8  # masking: frequency masks per input
    max_freq_width = 5  # masking: frequency masks are 0 to max_freq_width - 1 bands wide (torchaudio's freq_mask_param)
    roll_max_shift = 0  # random circular time shift in frames (0 = off)
    swa = True  # keep a stochastic-weight-averaged network (checkpoints hold it as net_swa)
    swa_epoch_start = 50  # the SWA phase starts with this epoch, counted from 1 (Lightning's swa_epoch_start: 50 = 0-based epoch 49)
    swa_freq = 1  # average the weights at the start of every n-th epoch of the SWA phase (released models: every epoch)
    swa_lr_schedule = True  # in the SWA phase the learning rate anneals to swa_lr (Lightning's SWALR) instead of the ramp-down
    swa_lr = lr  # learning rate of the SWA phase (upstream's swa_lrs=2e-5, its lr)
    swa_anneal_epochs = 10  # epochs from the learning rate in force to swa_lr (Lightning's annealing_epochs)
    swa_anneal_strategy = "cos"  # "cos" or "linear" (Lightning's annealing_strategy)
    teacher_student = False  # loss = mean(BCE(CLS head, labels), BCE(DIST head, teacher targets))
    freeze_blocks = 0  # fine-tuning: train neither the first n blocks nor (n > 0) the patch embedding, tokens and position embeddings
    layer_decay = 1.0  # layer-wise lr decay (BEiT/MAE fine-tuning): block i gets lr * layer_decay ** (depth - i), embeddings ** (depth + 1), heads lr


@trainer_ing.config
def trainer_config():
    max_epochs = 130  # training epochs
    accelerator = "auto"  # "cpu", "gpu" or "auto"
    devices = "auto"  # devices per node (e.g. 4), or "auto"
    num_nodes = 1  # machines for DDP
    strategy = "auto"  # "ddp" for several GPUs or nodes
    precision = "16-mixed" if torch.cuda.is_available() else "bf16-mixed"  # "32-true" for exact fp32
    default_root_dir = None  # checkpoints and TensorBoard logs go under it; None: outputs/<run_name>/train
    log_every_n_steps = 50
    num_sanity_val_steps = 0
    enable_progress_bar = True


@predict_ing.config
def predict_config():
    transformer_block = None  # block of the embeddings, 0-based; None: depth // 2 (6 of 12, the paper's best, "the 7th block")
    out_dir = None  # extraction output: <out_dir>/<key>.embeddings.npy / .logits.npy; None: outputs/<run_name>/embeddings
    hop = "full"  # "full": consecutive clips; "half": half-overlapping clips
    batch_size = 16  # clips per forward pass
    num_workers = 2  # DataLoader workers reading mel files
    bf16 = False  # bf16 autocast (fp16 on GPUs without bf16) for faster extraction and prediction
    device = "auto"  # "cpu", "cuda" or "auto"
    audio = []  # `predict` command: audio files or folders (wav, flac, ogg, mp3)
    top_k = 5  # `predict`: labels per file
    output = None  # `predict`: a .json or .tsv file to write (None: print JSON)
    labels_file = None  # `predict`, `export_hf`: label names, one per line (None: the arch's Discogs labels)


@export_ing.config
def export_config():
    out_dir = None  # export_hf: the Hugging Face directory; export_onnx: where model.onnx goes; None: outputs/<run_name>/export
    onnx_with_mel = False  # export_onnx: input raw 16 kHz audio of any length; the graph cuts clips (datamodule.clip_length, predict.hop) as predict
    onnx_block = None  # export_onnx: output the embeddings of this block ((B, 3, D); per clip with onnx_with_mel) instead of logits
    onnx_opset = 18  # export_onnx: ONNX opset version (18: torch's exporter's own; 17 only for plain logits graphs)
    hf_allow_separated = False  # export_hf: allow a teacher-student model (AST has one head: its logits will differ)
    hf_max_length = None  # export_hf: AST frames; None: the model's clip (datamodule.clip_length, else input_t), exact logits; "hub": the published models' 316/626/1256/1876; or frames


ex = Experiment("maest", ingredients=[maest_ing, datamodule_ing, module_ing, trainer_ing, predict_ing, export_ing])


@ex.config
def main_config():
    """MAEST pre-training, evaluation, extraction and export; see the ingredients for each part."""
    # Outputs default to outputs/<run_name>/ (train/, embeddings/, export/, norm_stats.json); the same
    # command line gives the same folder, so ckpt_path=last finds it (configs/runs.py).
    run_name = None  # the run's output folder; None: "demo" on the demo's data, else <dataset>_<arch>_<hash of the config>
    synthetic_data = {"out_dir": None, "n_tracks": 300, "clip_length": 10.0, "seed": 0}  # out_dir set: generate the demo dataset there first, if datamodule.base_dir is out_dir
    inference_checkpoint = None  # test/extract/predict/export load this checkpoint instead of maest.checkpoint; "last": <trainer.default_root_dir>/checkpoints/last.ckpt
    ckpt_path = None  # resume training exactly from this Lightning checkpoint ("last" = the run's newest: last.ckpt or its step checkpoint)
    checkpoint_every_n_train_steps = None  # also checkpoint every n steps (long epochs: lose less on a kill)
    norm_stats_out = None  # compute_norm_stats writes mean and std here; None: outputs/<run_name>/norm_stats.json
    speed_test_batch_size = 8  # model_speed_test batch size
    speed_test_iterations = 5  # model_speed_test timed iterations


register_named_configs(ex)


# ----------------------------------------------------------------------------------- factories
# maest.arch=None without a checkpoint that records its model: train PaSST's architecture.
DEFAULT_ARCH = "passt_s_swa_p16_128_ap476"
# The maest keys that are MAESTConfig fields (the others say where the weights come from).
_NET_KEYS = (
    "n_classes", "input_f", "input_t", "distilled_type", "s_patchout_t", "s_patchout_f", "u_patchout",
    "s_patchout_f_indices", "s_patchout_f_interleaved", "s_patchout_t_indices", "s_patchout_t_interleaved",
    "drop_path_rate", "fused_attention",
)


@functools.lru_cache(maxsize=4)
def _cached_record(path: str, version: tuple | None, trust_checkpoint: bool) -> dict | None:
    return read_model_record(path, trust_checkpoint)


def checkpoint_record(path, trust_checkpoint: bool = False) -> dict | None:
    """The model record of a checkpoint (SPEC §5.6; None without one), read once per file and run."""
    if path is None:
        return None
    file = Path(path)
    stat = file.stat() if file.is_file() else None
    return _cached_record(str(file), (stat.st_mtime_ns, stat.st_size) if stat else None, trust_checkpoint)


class NetSetup(typing.NamedTuple):
    """What a command builds: the arch name, its config, the checkpoint and its record."""

    arch: str | None
    config: MAESTConfig
    checkpoint: str | None
    record: dict | None
    reinit_heads: bool


@maest_ing.capture
def resolve_net(_config, data_n_classes: int | None = None, inference_checkpoint: str | None = None, training: bool = False) -> NetSetup:
    """The network of the ``maest`` config, before any weights are read.

    The checkpoint's record (SPEC §5.6) fixes the architecture; ``maest.*`` keys left at None
    (arch, n_classes, input_t, distilled_type) take its values, a given key that contradicts it is
    an error. Without a record: the arch's config (``maest.arch``, else DEFAULT_ARCH without a
    checkpoint). ``inference_checkpoint`` replaces ``maest.checkpoint``; ``maest.reinit_heads``
    acts only in training.
    """
    checkpoint = inference_checkpoint or _config["checkpoint"]
    reinit = bool(_config["reinit_heads"] and training)
    record = checkpoint_record(checkpoint, _config["trust_checkpoint"])
    arch = _config["arch"] or (DEFAULT_ARCH if checkpoint is None else None)
    options = {key: _config[key] for key in _NET_KEYS}
    options["s_patchout_f_indices"] = tuple(options["s_patchout_f_indices"])
    options["s_patchout_t_indices"] = tuple(options["s_patchout_t_indices"])
    source = f"checkpoint {checkpoint}"
    if record is not None and data_n_classes and not reinit and data_n_classes != record["config"]["n_classes"]:
        hint = ", or fine-tune it on these labels with maest.reinit_heads=True (the finetune named config)" if training else ""
        raise ValueError(
            f"the ground truth has {data_n_classes} classes but {source} predicts {record['config']['n_classes']}: "
            f"use the ground truth of the checkpoint's labels{hint}"
        )
    if options["n_classes"] is None and (record is None or reinit):
        options["n_classes"] = data_n_classes  # None: the checkpoint's or the arch's
    arch, config = config_from_record(arch, record, options, source, reinit_heads=reinit)
    spec = REGISTRY.get(arch)
    if (
        spec is not None and checkpoint is None and spec.weights_file and spec.init == "maest"
        and "input_t" in spec.config and config.input_t != spec.config["input_t"]
    ):
        _logger.warning("%s was trained with input_t=%d; maest.input_t=%d", arch, spec.config["input_t"], config.input_t)
    return NetSetup(arch, config, checkpoint, record, reinit)


@maest_ing.capture
def build_net(
    pretrained, weights_dir, checkpoint_swa_weights, trust_checkpoint, setup: NetSetup | None = None,
    data_n_classes: int | None = None, inference_checkpoint: str | None = None, training: bool = False,
):
    """The network of the ``maest`` config (``setup``, else ``resolve_net`` of the other arguments), its weights loaded."""
    setup = setup or resolve_net(data_n_classes=data_n_classes, inference_checkpoint=inference_checkpoint, training=training)
    return get_maest(
        setup.arch, checkpoint=setup.checkpoint, pretrained=pretrained, checkpoint_swa_weights=checkpoint_swa_weights,
        weights_directory=weights_dir, trust_checkpoint=trust_checkpoint, reinit_heads=setup.reinit_heads,
        **dataclasses.asdict(setup.config),
    )


def model_clip_length(config: MAESTConfig) -> float:
    """The model's clip in seconds: ``input_t`` frames (5 s 312, 10 s 625, 30 s 1875)."""
    return config.input_t * HOP_LENGTH / SAMPLE_RATE


@datamodule_ing.capture
def build_datamodule(
    base_dir, groundtruth_train, groundtruth_val, groundtruth_test, clip_length, batch_size_train,
    batch_size_test, num_workers, epoch_length, sampler, sampler_replacement, seed, teacher_dir, teacher_threshold,
    test_hop, pin_memory,
):
    return MAESTDataModule(
        base_dir=base_dir, clip_length=clip_length, groundtruth_train=groundtruth_train, groundtruth_val=groundtruth_val,
        groundtruth_test=groundtruth_test, batch_size_train=batch_size_train,
        batch_size_test=batch_size_test, num_workers=num_workers, epoch_length=epoch_length, sampler=sampler,
        sampler_replacement=sampler_replacement, seed=seed, teacher_dir=teacher_dir, teacher_threshold=teacher_threshold,
        test_hop=test_hop, pin_memory=pin_memory,
    )


@module_ing.capture
def build_module(net, _config, arch: str | None = None, labels: list[str] | None = None):
    return MAESTModule(net, arch=arch, labels=labels, **_config)


# Set by build_trainer itself; a `trainer.<key>` for one of them would be passed twice.
_TRAINER_OWN_ARGUMENTS = ("callbacks", "use_distributed_sampler")


def _accept_trainer_arguments(f):
    """Declare every Lightning Trainer argument in ``f``'s signature (``f`` takes them as ``**``).

    Sacred refuses a command-line key that no captured function names (ConfigAddedError), yet
    SPEC §4 promises ``trainer.<any Lightning Trainer argument>`` (e.g. ``trainer.limit_train_batches=5``);
    ``build_trainer`` reads them all from ``_config``.
    """
    import inspect

    import lightning.pytorch as pl

    own = inspect.signature(f)
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in inspect.signature(pl.Trainer.__init__).parameters
        if name != "self" and name not in own.parameters
    ]
    params = [p for p in own.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    f.__signature__ = own.replace(parameters=params + extra)
    return f


@trainer_ing.capture
@_accept_trainer_arguments
def build_trainer(_config, checkpoint_every_n_train_steps=None, monitor_val=True, log_scalar=None, **_lightning_arguments):
    """The Lightning Trainer of the ``trainer`` config (any Trainer argument) with checkpointing.

    ``log_scalar(name, value, step)`` (the Sacred run's): every epoch's metrics also go there.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from helpers.resume import RandomStateCheckpoint, StepCheckpoint

    options = dict(_config)
    clash = [k for k in _TRAINER_OWN_ARGUMENTS if k in options]
    if clash:
        raise ValueError(f"trainer.{clash[0]} cannot be configured: ex_maest.py sets it (see build_trainer)")
    root = Path(options.pop("default_root_dir") or run_output("train"))
    callbacks = [ModelCheckpoint(dirpath=root / "checkpoints", filename="{epoch}-{val_loss:.3f}-best", monitor="val_loss", mode="min", save_last=True)]
    if not monitor_val:
        callbacks = [ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)]
    if checkpoint_every_n_train_steps:
        callbacks.append(StepCheckpoint(dirpath=root / "checkpoints", filename="step-{step}", every_n_train_steps=checkpoint_every_n_train_steps, save_top_k=1, monitor="step", mode="max"))
    callbacks.append(RandomStateCheckpoint())  # exact resume: every rank's random state goes into each checkpoint
    if options.get("logger", True) is not False:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    # The data module shards the training draw by global rank itself (see helpers/datamodule.py).
    trainer = pl.Trainer(default_root_dir=root, callbacks=callbacks, use_distributed_sampler=False, **options)
    if log_scalar is not None:  # beside the configured loggers (TensorBoard by default)
        from helpers.metric_logger import ScalarCallbackLogger

        trainer.loggers = [*trainer.loggers, ScalarCallbackLogger(log_scalar)]
    return trainer


@maest_ing.capture
def check_pretrained_weights(arch, pretrained, weights_dir, checkpoint):
    """Fail before any data is read when ``pretrained`` weights are not in the weights directory."""
    if pretrained and checkpoint is None:
        pretrained_path(arch or DEFAULT_ARCH, weights_dir)  # raises FileNotFoundError naming the file and its URL


@ex.capture
def run_output(name: str, run_name: str) -> Path:
    """``outputs/<run_name>/<name>``: where an output goes when its key (e.g. ``predict.out_dir``) is None."""
    return run_dir(run_name) / name


@ex.capture
def _prepare_synthetic(synthetic_data, _config):
    """Generate the demo's synthetic dataset, only where the data module reads it (``datamodule.base_dir``)."""
    if synthetic_data.get("out_dir") and not uses_synthetic_data(_config):
        _logger.info("synthetic_data.out_dir=%s is not datamodule.base_dir: no synthetic data generated", synthetic_data["out_dir"])
    elif synthetic_data.get("out_dir"):
        from helpers.synthetic import make_synthetic_dataset

        info = make_synthetic_dataset(**synthetic_data)
        _logger.info("synthetic dataset ready in %s", info["base_dir"])
        return info
    return None


def _resolve_ckpt_path(ckpt_path, trainer):
    """``"last"``: the run's newest checkpoint, last.ckpt (epoch end) or the step checkpoint."""
    if ckpt_path == "last":
        folder = Path(trainer.default_root_dir) / "checkpoints"
        candidates = [p for p in [folder / "last.ckpt", *folder.glob("step-*.ckpt")] if p.is_file()]
        if not candidates:
            raise FileNotFoundError(
                f"ckpt_path='last' but {folder / 'last.ckpt'} does not exist: nothing to resume. The folder follows from "
                "run_name (by default from the config): resume with the command line of the run to resume, or set "
                "run_name or trainer.default_root_dir to its folder"
            )
        return str(max(candidates, key=lambda p: p.stat().st_mtime_ns))
    return ckpt_path


# ----------------------------------------------------------------------------------- config checks
def _at_least(minimum: int, note: str = ""):
    return (lambda v: v >= minimum), f"at least {minimum}{note}"


def _check_hf_max_length(value) -> None:
    if not (value is None or value == "hub" or (type(value) is int and value >= 16)):
        raise ValueError(f"export.hf_max_length must be None (the model's clip), 'hub' (the published models' lengths) or frames >= 16, got {value!r}")


# Keys whose valid values their default's type does not tell (other kinds, ranges). Every other key
# with a bool, int or float default must keep that type (an int is a valid float), and trainer.<key>
# must match Lightning's own annotation of that Trainer argument.
# key -> (type hint, (test, text) for a number of that type or None), or a function that raises ValueError
_CONFIG_RULES = {
    "datamodule.clip_length": (float | None, (lambda v: v > 0, "> 0 (seconds; None: the model's)")),
    "datamodule.batch_size_train": (int, _at_least(1)),
    "datamodule.batch_size_test": (int, _at_least(1)),
    "datamodule.num_workers": (int, _at_least(0)),
    "datamodule.epoch_length": (int, _at_least(1)),
    "datamodule.test_hop": lambda hop: hop_frames_for(hop, 2, key="datamodule.test_hop"),  # the one reading of a hop
    "maest.n_classes": (int | None, _at_least(1)),
    "maest.input_t": (int | None, _at_least(16, " (one patch)")),
    "module.freeze_blocks": (int, _at_least(0)),
    "module.layer_decay": (float, (lambda v: 0 < v <= 1, "in (0, 1] (1.0: off)")),
    "predict.transformer_block": (int | None, None),  # one block; extract() checks its range against the model
    "predict.hop": lambda hop: hop_frames_for(hop, 2),  # a validator of its own: its message
    "predict.batch_size": (int, _at_least(1)),
    "predict.num_workers": (int, _at_least(0)),
    "predict.top_k": (int, _at_least(1)),
    "export.hf_max_length": _check_hf_max_length,  # export_hf checks the frames against the model
    "trainer.max_epochs": (int | None, _at_least(-1, " (-1: no limit)")),
    "checkpoint_every_n_train_steps": (int | None, _at_least(1)),
    "run_name": check_run_name,
    "speed_test_batch_size": (int, _at_least(1)),
    "speed_test_iterations": (int, _at_least(1)),
}
_INFO_COMMANDS = ("print_config", "print_dependencies", "save_config", "print_named_configs", "help")


@functools.cache
def _trainer_hints() -> dict:
    """Lightning's annotations of the Trainer arguments: the rules of ``trainer.<key>``."""
    import lightning.pytorch as pl

    try:
        return {f"trainer.{name}": hint for name, hint in typing.get_type_hints(pl.Trainer.__init__).items()}
    except Exception:  # an annotation this Lightning cannot resolve: fall back to the defaults' types
        return {}


def check_config(config: dict) -> None:
    """Refuse values of the wrong type or range before any work, naming every such key at once.

    Sacred reads ``trainer.max_epochs=abc`` as the text "abc" and only warns; Lightning would then
    stop on a bare AssertionError, ``predict.top_k=-1`` would fail every file.
    """
    rules = {key: (hint, None) for key, hint in _trainer_hints().items()}
    check_config_values(config, default_config(ex), {**rules, **_CONFIG_RULES})


@ex.config_hook
def _check_config_hook(config, command_name, logger):
    if command_name not in _INFO_COMMANDS:  # print_config still shows a broken config
        check_config(config)
    return {}


_MODEL_USING_COMMANDS = ("test", "extract_embeddings", "extract_logits", "predict", "export_hf", "export_onnx", "model_speed_test")


@ex.config_hook
def _run_name_hook(config, command_name, logger):
    """run_name=None becomes the run's own name (configs/runs.py); a name given in the config wins.

    A command that only uses a model (test, extraction, predict, export) of a run trained here
    (``outputs/<run>/train/checkpoints/x.ckpt``) writes into that run's folder.
    """
    if config.get("run_name") is None:
        trained = trained_run_name(config) if command_name in _MODEL_USING_COMMANDS else None
        return {"run_name": trained or run_name_for(config)}
    return {}


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
def _training_labels(n_classes: int, labels) -> list[str] | None:
    """``datamodule.labels`` checked against the classes of the ground truth (they go into the checkpoints)."""
    if labels is None:
        return None
    labels = [str(name) for name in labels]
    if len(labels) != n_classes:
        raise ValueError(f"datamodule.labels lists {len(labels)} label names but the model has {n_classes} classes: give one name per ground-truth class")
    return labels


# ----------------------------------------------------------------------------------- commands
@ex.main
def main(_run, synthetic_data, ckpt_path, checkpoint_every_n_train_steps):
    """Pre-train (fit) a MAEST model; resume with ckpt_path=<file> or ckpt_path=last."""
    clip_length = check_training_clip()
    check_pretrained_weights()
    _prepare_synthetic(synthetic_data)
    datamodule = build_datamodule(clip_length=clip_length)
    setup = resolve_net(data_n_classes=datamodule.n_classes, training=True)
    net = build_net(setup=setup)
    module = build_module(net, arch=setup.arch, labels=_training_labels(setup.config.n_classes))
    has_val = datamodule.groundtruth["val"] is not None  # without one, no best-val_loss checkpoint
    trainer = build_trainer(checkpoint_every_n_train_steps=checkpoint_every_n_train_steps, monitor_val=has_val, log_scalar=_run.log_scalar)
    val_failures, failed_list = _list_dataset_failures(datamodule, "val", trainer, "validation file") if has_val else ({}, None)
    # weights_only: resuming never runs code from the file, whatever $TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says.
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resolve_ckpt_path(ckpt_path, trainer), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint_cb = trainer.checkpoint_callback
    result = {
        "best_checkpoint": checkpoint_cb.best_model_path if checkpoint_cb else None,
        "last_checkpoint": str(Path(checkpoint_cb.dirpath) / "last.ckpt") if checkpoint_cb else None,
        "logs": trainer.logger.log_dir if trainer.logger else None,
        "global_step": trainer.global_step,
        "metrics": metrics,
    }
    if trainer.is_global_zero:  # under DDP every rank runs main; one report
        _report(_run, result)
    # SPEC §8: trained and validated on the good files, checkpoints written; the run still fails.
    _exit_on_failures(val_failures, failed_list, "validation file", report=trainer.is_global_zero)
    return result


def _list_dataset_failures(datamodule, split: str, trainer, what: str) -> tuple[dict[str, str], Path]:
    """Files of an evaluation split that cannot be read, listed in <trainer.default_root_dir>/failed-<split>.txt.

    ClipDataset reads every file once up front (the index that evaluation then uses) and leaves
    the bad ones out, so the command goes on with the good ones and exits with status 1 at the end
    (SPEC §8). When no file can be read, it stops here.
    """
    dataset = datamodule.dataset(split)
    failures = dataset.failures
    keys = [dataset.key(track) for track in range(len(dataset.labels))]
    failed_list = Path(trainer.default_root_dir) / f"failed-{split}.txt"
    if trainer.is_global_zero:  # under DDP every rank runs the command; one writes the list
        update_failure_list(failed_list, failures, succeeded=[k for k in keys if k not in failures])
    if len(failures) == len(keys):
        _exit_on_failures(failures, failed_list, what, report=trainer.is_global_zero)
    return failures, failed_list


def _report(_run, result):
    lines = ["", "Training finished."]
    for key in ("val_roc", "val_ap", "val_loss", "val_roc_swa"):
        if key in result["metrics"]:
            lines.append(f"  {key:12s} {result['metrics'][key]:.4f}")
    lines.append(f"  best checkpoint: {result['best_checkpoint']}")
    lines.append(f"  last checkpoint: {result['last_checkpoint']}")
    lines.append(f"  TensorBoard logs: {result['logs']}  (tensorboard --logdir {result['logs']})")
    run_dirs = [getattr(o, "dir", None) for o in _run.observers]
    run_dirs = [d for d in run_dirs if d]
    lines.append(f"  Sacred run record: {run_dirs[0] if run_dirs else 'none (add -F DIR to keep one)'}")
    print("\n".join(lines))


@ex.command
def test(_run, synthetic_data, inference_checkpoint):
    """Test maest.checkpoint (or the configured weights) on datamodule.groundtruth_test, every clip."""
    _prepare_synthetic(synthetic_data)
    datamodule = build_datamodule(clip_length=inference_clip_length(resolve_net(inference_checkpoint=inference_checkpoint).config))
    net = build_net(data_n_classes=datamodule.n_classes, inference_checkpoint=inference_checkpoint)
    module = build_module(net)
    module.net_swa.load_state_dict(net.state_dict())  # the loaded weights are evaluated as-is
    trainer = build_trainer(log_scalar=_run.log_scalar)
    # The metrics are those of the good files; the bad ones are listed and the command then fails.
    failures, failed_list = _list_dataset_failures(datamodule, "test", trainer, "test file")
    results = trainer.test(module, datamodule=datamodule)
    _exit_on_failures(failures, failed_list, "test file", report=trainer.is_global_zero)  # every rank exits 1, one reports
    return results[0] if results else {}


def _exit_on_failures(failures: dict, failed_list: Path, what: str, report: bool = True) -> None:
    """SPEC §8: list every skipped input on stderr and exit with status 1 when there is one."""
    if failures:
        if report:
            print(format_failures(failures, failed_list, what), file=sys.stderr)
        raise SystemExit(1)


@ex.command
def compute_norm_stats(synthetic_data, norm_stats_out, datamodule):
    """Mean and std of the (compressed, unnormalised) training mel values; printed and saved."""
    from helpers.stats import mel_statistics

    _prepare_synthetic(synthetic_data)
    out = Path(norm_stats_out or run_output("norm_stats.json"))
    failed_list = out.parent / "failed-norm-stats.txt"
    stats = mel_statistics(datamodule["base_dir"], datamodule["groundtruth_train"], failed_list=failed_list)
    write_text_atomic(out, json.dumps(stats, indent=2))
    print(f"mean {stats['mean']:.6f}  std {stats['std']:.6f}  over {stats['n_frames']} frames of {stats['n_files']} files -> {out}")
    _exit_on_failures(stats["failed"], failed_list, "mel file")  # the statistics of the good files are written
    return stats


@ex.command
def model_speed_test(speed_test_batch_size, speed_test_iterations, inference_checkpoint, maest, predict):
    """Forward-pass speed of the configured model on random input of its input_t frames."""
    net = build_net(inference_checkpoint=inference_checkpoint)
    device = _device(predict["device"])
    net = net.to(device)
    x = torch.randn(speed_test_batch_size, 1, net.config.input_f, net.config.input_t + 1, device=device)
    x = x[..., : min(x.shape[-1], net.config.max_frames)]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=predict["bf16"]):
        net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(speed_test_iterations):
            net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / speed_test_iterations
    result = {"clips_per_s": speed_test_batch_size / seconds, "batch_seconds": seconds, "device": str(device)}
    print(f"{result['clips_per_s']:.2f} clips/s ({seconds * 1000:.1f} ms per batch of {speed_test_batch_size}, {device})")
    return result


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _extract(kind, predict, maest, datamodule_cfg, inference_checkpoint):
    """Shared body of extract_embeddings / extract_logits; exits non-zero when any file failed."""
    transformer_block, out_dir, hop = predict["transformer_block"], predict["out_dir"] or run_output("embeddings"), predict["hop"]
    batch_size, num_workers, bf16, device = predict["batch_size"], predict["num_workers"], predict["bf16"], predict["device"]
    if datamodule_cfg["groundtruth_predict"] is None:
        raise ValueError("set datamodule.groundtruth_predict to the ground-truth pickle that lists the files to extract (e.g. with target_mtt)")
    setup = resolve_net(inference_checkpoint=inference_checkpoint)
    clip_length = inference_clip_length(setup.config)
    n_frames = n_frames_for(clip_length)
    hop_frames = hop_frames_for(hop, n_frames)
    net = build_net(setup=setup).to(_device(device))
    if transformer_block is None:  # the paper's block 6 of 12, at the same relative depth of any model
        transformer_block = net.config.depth // 2
    report = extract(
        net,
        base_dir=datamodule_cfg["base_dir"],
        groundtruth=datamodule_cfg["groundtruth_predict"],
        out_dir=out_dir,
        kind=kind,
        block=transformer_block,
        n_frames=n_frames,
        hop_frames=hop_frames,
        batch_size=batch_size,
        num_workers=num_workers,
        bf16=bf16,
        run_info={"arch": setup.arch, "checkpoint": setup.checkpoint, "checkpoint_swa_weights": maest["checkpoint_swa_weights"],
                  # the clip as the model sees it: 5 and 4.992 s are both 312 frames, one setting
                  "pretrained": maest["pretrained"], "clip_length": n_frames * HOP_LENGTH / SAMPLE_RATE, "hop": hop},
    )
    print(report.summary())
    _exit_on_failures(report.failed, Path(out_dir) / f"failed-{kind}.txt", "mel file")
    return report.as_dict()


@ex.command
def extract_embeddings(synthetic_data, inference_checkpoint, maest, datamodule, predict):
    """Write <predict.out_dir>/<key>.embeddings.npy (n_clips, 3, D) for every datamodule.groundtruth_predict key."""
    _prepare_synthetic(synthetic_data)
    return _extract("embeddings", predict, maest, datamodule, inference_checkpoint)


@ex.command
def extract_logits(synthetic_data, inference_checkpoint, maest, datamodule, predict):
    """Write <predict.out_dir>/<key>.logits.npy (n_clips, n_classes) for every datamodule.groundtruth_predict key."""
    _prepare_synthetic(synthetic_data)
    return _extract("logits", predict, maest, datamodule, inference_checkpoint)


@ex.command
def predict(inference_checkpoint, predict):
    """Top-k labels of audio files: predict.audio=['a.mp3', 'folder/'] -> JSON (or predict.output=x.tsv).

    Files that cannot be labelled are listed in failed-predict.txt beside predict.output (in the
    working directory when the JSON is printed); the command then exits with status 1.
    """
    if not predict["audio"]:
        raise ValueError("set predict.audio to the audio files or folders to label, e.g. predict.audio='[\"song.mp3\", \"music/\"]'")
    setup = resolve_net(inference_checkpoint=inference_checkpoint)
    n_frames = n_frames_for(inference_clip_length(setup.config))
    hop_frames = hop_frames_for(predict["hop"], n_frames)
    net = build_net(setup=setup).to(_device(predict["device"]))
    labels = _labels(setup, predict["labels_file"])
    results, failures = predict_files(
        net, predict["audio"], labels, n_frames=n_frames, hop_frames=hop_frames,
        top_k=predict["top_k"], batch_size=predict["batch_size"], bf16=predict["bf16"],
    )
    text = write_predictions(results, predict["output"])
    if text is not None:
        print(text)
    # SPEC §8: the failures are listed beside predict.output (in the working directory when the
    # JSON is printed); an earlier run's entries for other files are kept, this run's good files dropped.
    failed_list = (Path(predict["output"]).parent if predict["output"] else Path()) / "failed-predict.txt"
    update_failure_list(failed_list, failures, succeeded=[r["file"] for r in results])
    _exit_on_failures(failures, failed_list, "audio file")
    return results


def _labels(setup: NetSetup, labels_file) -> list[str]:
    """Label names: predict.labels_file (one per line; blank lines ignored), else the checkpoint's
    (SPEC §5.6), else the arch's when it has as many, else class_<i>."""
    n_classes = setup.config.n_classes
    stored = setup.record["labels"] if setup.record else None
    spec = REGISTRY.get(setup.arch)
    if labels_file:
        path = Path(labels_file)
        if not path.is_file():
            raise FileNotFoundError(f"predict.labels_file={labels_file!r} does not exist: give a text file with one label name per line")
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif stored is not None:
        labels = stored
    elif spec is not None and spec.labels() and (setup.record is None or len(spec.labels()) == n_classes):
        labels = spec.labels()  # a released model's Discogs styles
    else:
        labels = [f"class_{i}" for i in range(n_classes)]
    if len(labels) != n_classes:
        raise ValueError(f"{len(labels)} label names for a model with {n_classes} outputs: set predict.labels_file to the right list")
    return labels


@ex.command
def export_hf(inference_checkpoint, export, predict):
    """Write the model as a Hugging Face ASTForAudioClassification directory (export.out_dir)."""
    from models.exchange.hf import export_hf as _export_hf

    setup = resolve_net(inference_checkpoint=inference_checkpoint)
    net = build_net(setup=setup)
    labels = _labels(setup, predict["labels_file"])
    max_length = export["hf_max_length"]
    if max_length is None:  # the clips predict and extraction feed the model
        max_length = n_frames_for(inference_clip_length(setup.config))
    out = _export_hf(
        net, export["out_dir"] or run_output("export"), labels=labels, allow_separated=export["hf_allow_separated"], max_length=max_length
    )
    print(f"Hugging Face model written to {out}")
    return str(out)


@ex.command
def export_onnx(inference_checkpoint, export, predict):
    """Write the model as ONNX (export.out_dir/model.onnx), optionally with the mel front-end or block embeddings."""
    from models.exchange.onnx import export_onnx as _export_onnx

    setup = resolve_net(inference_checkpoint=inference_checkpoint)
    net = build_net(setup=setup)
    path = Path(export["out_dir"] or run_output("export")) / "model.onnx"
    clips = {}
    if export["onnx_with_mel"]:  # the graph cuts the clips predict cuts
        n_frames = n_frames_for(inference_clip_length(setup.config))
        clips = {"clip_frames": n_frames, "hop_frames": hop_frames_for(predict["hop"], n_frames)}
    out = _export_onnx(net, path, with_mel=export["onnx_with_mel"], block=export["onnx_block"], opset=export["onnx_opset"], **clips)
    print(f"ONNX model written to {out}")
    return str(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv
    observed = any(a in ("-F", "--file_storage", "-u", "--unobserved", "-m", "--mongo_db") or a.startswith("--file_storage=") for a in argv)
    main_rank = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"  # DDP re-runs this per rank
    if not observed and main_rank and len(argv) > 1 and argv[1] not in ("print_config", "print_dependencies", "save_config", "print_named_configs", "help"):
        # Keep a run record by default (in the program only, never at import); -F DIR or -u override it.
        ex.observers.append(FileStorageObserver(os.environ.get("MAEST_SACRED_DIR", "outputs/sacred")))
    ex.run_commandline()
