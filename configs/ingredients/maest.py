"""The ``maest`` ingredient: the network (architecture, weights, patchout) and the factories that build it."""

from __future__ import annotations

import dataclasses
import functools
import logging
import typing
from pathlib import Path

from sacred import Ingredient

from models import get_maest
from models.maest import MAESTConfig
from models.mel import HOP_LENGTH, SAMPLE_RATE
from models.registry import REGISTRY, config_from_record, pretrained_path, read_record

_logger = logging.getLogger("ex_maest")

maest_ing = Ingredient("maest")


@maest_ing.config
def maest_config():
    arch = None  # registry name (models/registry.py): an init architecture or a released model; None: the checkpoint's, else DEFAULT_ARCH
    pretrained = False  # initialise from the arch's weights in the weights directory (PaSST/DeiT/MAEST)
    weights_dir = None  # where pre-trained weights live; None: $MAEST_WEIGHTS_DIR or ./weights
    checkpoint = None  # a MAEST checkpoint to load (Lightning .ckpt, state dict, or Hugging Face directory)
    checkpoint_swa_weights = True  # from a Lightning checkpoint, load the SWA weights (False: the plain ones)
    trust_checkpoint = False  # True: unpickle checkpoint/weights files fully, running any code they hold (only files you trust)
    allow_random_weights = False  # inference commands: True runs a network with neither checkpoint nor pre-trained weights (a random baseline)
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
    return read_record(path, trust_checkpoint)


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
def resolve_net(
    _config, data_n_classes: int | None = None, inference_checkpoint: str | None = None, training: bool = False,
    data_labels: list | None = None,
) -> NetSetup:
    """The network of the ``maest`` config, before any weights are read.

    The checkpoint's record (SPEC §5.6) fixes the architecture; ``maest.*`` keys left at None
    (arch, n_classes, input_t, distilled_type) take its values, a given key that contradicts it is
    an error. Without a record: the arch's config (``maest.arch``, else DEFAULT_ARCH without a
    checkpoint). ``inference_checkpoint`` replaces ``maest.checkpoint``; ``maest.reinit_heads``
    acts only in training. ``data_labels`` (``datamodule.labels``) must be the checkpoint's label names, in
    its order, where both are known: the outputs are scored column by column.
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
    if record is not None and not reinit and record.get("labels") is not None and data_labels is not None:
        check_same_labels(list(record["labels"]), [str(name) for name in data_labels], source, training)
    if options["n_classes"] is None and (record is None or reinit):
        options["n_classes"] = data_n_classes  # None: the checkpoint's or the arch's
    elif data_n_classes and options["n_classes"] is not None and options["n_classes"] != data_n_classes:
        hint = " (on a checkpoint of other labels, fine-tune: the finetune named config)" if training else ""
        raise ValueError(
            f"maest.n_classes={options['n_classes']} but the ground truth has {data_n_classes} classes: the model's outputs "
            f"are scored against the ground truth's columns. Leave maest.n_classes unset (it follows the data){hint}, or "
            f"use a ground truth of {options['n_classes']} classes"
        )
    recorded = record["config"]["n_classes"] if record is not None else None
    if recorded is not None and not reinit and options["n_classes"] is not None and options["n_classes"] != recorded:
        raise ValueError(_other_labels_message(source, record, options["n_classes"], data_labels, training))
    arch, config = config_from_record(arch, record, options, source, reinit_heads=reinit)
    spec = REGISTRY.get(arch)
    if (
        spec is not None and checkpoint is None and spec.weights_file and spec.init == "maest"
        and "input_t" in spec.config and config.input_t != spec.config["input_t"]
    ):
        _logger.warning("%s was trained with input_t=%d; maest.input_t=%d", arch, spec.config["input_t"], config.input_t)
    return NetSetup(arch, config, checkpoint, record, reinit)


def _named(labels, shown: int = 4) -> str:
    return f": {', '.join(map(str, labels[:shown]))}{', ...' if len(labels) > shown else ''}" if labels else ""


def _other_labels_message(source: str, record: dict, n_classes: int, data_labels, training: bool) -> str:
    """``maest.n_classes`` (given, or from a data config such as prepare_folder's dataset.json) is not the checkpoint's."""
    recorded = record["config"]["n_classes"]
    fix = ("fine-tune it on these labels with maest.reinit_heads=True (the finetune named config)" if training else
           "test and extraction of logits need a model trained on these labels (fine-tune it: the finetune named config); "
           "predict, extract_embeddings and the exports need no data config: leave it out")
    return (
        f"{source} was trained on {recorded} classes{_named(record.get('labels'))}, but maest.n_classes={n_classes} "
        f"(given, or set by a data config such as prepare_folder's dataset.json{_named(list(data_labels or []))}): {fix}"
    )


def check_same_labels(model_labels: list[str], data_labels: list[str], source: str, training: bool) -> None:
    """Refuse data whose label names (``datamodule.labels``) are not those the model's outputs stand for, in order."""
    if model_labels == data_labels or len(model_labels) != len(data_labels):  # a count mismatch is said with the classes
        return
    differ = [i for i, (ours, theirs) in enumerate(zip(data_labels, model_labels)) if ours != theirs]
    shown = ", ".join(f"{i}: {data_labels[i]!r} here, {model_labels[i]!r} in the model" for i in differ[:5])
    more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
    order = " (the same names in another order)" if sorted(data_labels) == sorted(model_labels) else ""
    hint = ", or fine-tune it on these labels with maest.reinit_heads=True (the finetune named config)" if training else ""
    raise ValueError(
        f"datamodule.labels are not the labels {source} was trained on{order}: {len(differ)} of {len(data_labels)} "
        f"positions differ ({shown}{more}). Its outputs would be scored against the wrong labels: use a ground truth "
        f"of the model's labels, in its order{hint}"
    )


@maest_ing.capture
def check_weights_given(setup: NetSetup, command: str, pretrained, allow_random_weights) -> None:
    """Refuse to run an inference command on random weights unless asked to: without a checkpoint and
    ``maest.pretrained``, the network is initialised at random and its outputs mean nothing."""
    if setup.checkpoint is not None or pretrained or allow_random_weights:
        return
    raise ValueError(
        f"{command} has no weights to load: neither inference_checkpoint, maest.checkpoint nor maest.pretrained is set, so the "
        f"{setup.arch} network would be randomly initialised and its outputs would mean nothing. Name the model: a released "
        "one with its named config (e.g. `with maest_30s_from_passt_infer`, weights in weights/), a run trained here with "
        "inference_checkpoint=outputs/<run_name>/train/checkpoints/last.ckpt, or any checkpoint with maest.checkpoint=FILE; "
        "for a random-weights baseline on purpose, set maest.allow_random_weights=True"
    )


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



@maest_ing.capture
def check_pretrained_weights(arch, pretrained, weights_dir, checkpoint):
    """Fail before any data is read when ``pretrained`` weights are not in the weights directory."""
    if pretrained and checkpoint is None:
        pretrained_path(arch or DEFAULT_ARCH, weights_dir)  # raises FileNotFoundError naming the file and its URL
