"""A registry of architectures and released models, and ``get_maest`` to build any of them.

One table instead of one factory per variant: each entry says the network's shape, where its
weights come from and how to convert them. ``get_maest(name, ...)`` is the only builder.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import (
    NETWORK_SHAPE_FIELDS,
    CheckpointError,
    input_t_hint,
    load_checkpoint,
    load_pretrained,
    network_mismatch,
    read_checkpoint,
    read_model_record,
    record_of,
    select_state_dict,
    state_dict_shapes,
)
from .exchange.hf import CONFIG_NAME, INPUT_T_KEY, check_hf_config, hf_model_record, read_hf_state_dict
from .maest import MAEST, MAESTConfig

_logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A checkout keeps the label lists in data/labels; an installed wheel ships them as models/labels (pyproject.toml).
LABELS_DIR = next(
    (d for d in (PROJECT_ROOT / "data" / "labels", Path(__file__).resolve().parent / "labels") if d.is_dir()),
    PROJECT_ROOT / "data" / "labels",
)
WEIGHTS_ENV = "MAEST_WEIGHTS_DIR"

_MAEST_RELEASE = "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/"
VIT_B = dict(embed_dim=768, depth=12, num_heads=12)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    ``init`` says how ``weights_file`` is read: ``"maest"`` (a MAEST checkpoint, loaded strictly),
    ``"passt"`` (PaSST AudioSet weights: embeddings resized, foreign head dropped) or ``"deit"``
    (ImageNet DeiT-B distilled 384: 2-D position grid split into frequency and time).
    """

    name: str
    config: dict
    description: str
    weights_file: str | None = None
    url: str | None = None
    init: str = "maest"
    labels_file: str | None = None
    legacy_weights_file: str | None = None  # an older local name of weights_file, still found

    def labels(self) -> list[str] | None:
        if self.labels_file is None:
            return None
        return (LABELS_DIR / self.labels_file).read_text().splitlines()


def _released(name: str, seconds: int, description: str, **config) -> ModelSpec:
    # Upstream's release assets are the SWA checkpoints, named <name>-swa.ckpt (SPEC §5.1).
    n_classes = config.pop("n_classes", 400)
    return ModelSpec(
        name=name,
        config=dict(VIT_B, input_t=seconds * 16000 // 256, n_classes=n_classes, **config),
        description=description,
        weights_file=f"{name}-swa.ckpt",
        url=_MAEST_RELEASE + f"{name}-swa.ckpt",
        legacy_weights_file=f"{name}.ckpt",
        labels_file=f"labels-{n_classes}.txt",
    )


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        # Architectures to pre-train from (SPEC §4 "init").
        ModelSpec("maest-vit-b", dict(VIT_B), "ViT-B MAEST, random initialisation"),
        ModelSpec(
            "passt_s_swa_p16_128_ap476",
            dict(VIT_B),
            "ViT-B initialised from PaSST (AudioSet, mAP .476, SWA)",
            weights_file="passt-s-f128-p16-s10-ap.476-swa.pt",
            url="https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/passt-s-f128-p16-s10-ap.476-swa.pt",
            init="passt",
        ),
        ModelSpec(
            "passt_deit_bd_p16_384",
            dict(VIT_B),
            "ViT-B initialised from DeiT-B distilled 384 (ImageNet)",
            weights_file="deit_base_distilled_patch16_384-d0272ac0.pth",
            url="https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_384-d0272ac0.pth",
            init="deit",
        ),
        # Small networks for the demo and the tests.
        ModelSpec("maest-demo", dict(embed_dim=192, depth=4, num_heads=3), "small MAEST for the CPU demo"),
        ModelSpec("maest-tiny", dict(embed_dim=64, depth=2, num_heads=4), "tiny MAEST for tests"),
        # Released models (SPEC §4).
        _released("discogs-maest-5s-pw-129e", 5, "5 s, PaSST init, 129 epochs"),
        _released("discogs-maest-10s-pw-129e", 10, "10 s, PaSST init, 129 epochs"),
        _released("discogs-maest-10s-fs-129e", 10, "10 s, from scratch, 129 epochs"),
        _released("discogs-maest-10s-dw-75e", 10, "10 s, DeiT init, 75 epochs"),
        _released("discogs-maest-20s-pw-129e", 20, "20 s, PaSST init, 129 epochs"),
        _released("discogs-maest-30s-pw-129e", 30, "30 s, PaSST init, 129 epochs"),
        _released("discogs-maest-30s-pw-73e-ts", 30, "30 s, teacher-student, 73 epochs", distilled_type="separated"),
        _released("discogs-maest-30s-pw-129e-519l", 30, "30 s, PaSST init, 129 epochs, 519 labels", n_classes=519),
    ]
}


def get_spec(arch: str) -> ModelSpec:
    try:
        return REGISTRY[arch]
    except KeyError:
        raise KeyError(f"unknown MAEST architecture {arch!r}; known: {', '.join(sorted(REGISTRY))}") from None


def list_models() -> list[str]:
    return sorted(REGISTRY)


def weights_dir(path: str | os.PathLike | None = None) -> Path:
    """Where pre-trained weights live: ``path``, else $MAEST_WEIGHTS_DIR, else ``<project>/weights``."""
    return Path(path or os.environ.get(WEIGHTS_ENV) or PROJECT_ROOT / "weights")


def pretrained_path(arch: str, weights_directory: str | os.PathLike | None = None) -> Path:
    """The local weights file of ``arch``; a missing file is an error that says what to put where."""
    spec = get_spec(arch)
    if spec.weights_file is None:
        raise ValueError(f"{arch!r} has no pre-trained weights; build it with pretrained=False (config: maest.pretrained=False)")
    path = weights_dir(weights_directory) / spec.weights_file
    legacy = weights_dir(weights_directory) / spec.legacy_weights_file if spec.legacy_weights_file else None
    if not path.is_file() and legacy is not None and legacy.is_file():
        _logger.info("using %s (the weights' old local name; the release asset is named %s)", legacy, spec.weights_file)
        return legacy
    if not path.is_file():
        raise FileNotFoundError(
            f"pre-trained weights for {arch!r} not found at {path}. Download {spec.url} and save it as {path} "
            f"(or call models.registry.download_weights({arch!r}); set ${WEIGHTS_ENV} to use another directory)"
        )
    return path


def released_weights_hint(path: str | os.PathLike) -> str | None:
    """Where to get a missing file named as a registry arch's weights (``weights_file`` or its legacy name); else None."""
    path = Path(path)
    for spec in REGISTRY.values():
        if spec.url and path.name in (spec.weights_file, spec.legacy_weights_file):
            target = path.parent / spec.weights_file
            then = "" if target == path else f", then pass checkpoint={str(target)!r}"
            return (
                f"It is the released weights file of {spec.name!r}: download {spec.url} and save it as {target} "
                f"(or call models.registry.download_weights({spec.name!r}, weights_directory={str(path.parent)!r})){then}"
            )
    return None


def missing_checkpoint_error(path: str | os.PathLike) -> FileNotFoundError:
    """The error for a checkpoint path that does not exist; for a released weights file's name, where to get it."""
    hint = released_weights_hint(path)
    return FileNotFoundError(f"checkpoint {path} does not exist" + (f". {hint}" if hint else ""))


def read_record(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict | None:
    """The model record of a checkpoint (SPEC §5.6): a file's ``maest_model``, or what the ``config.json`` of a
    Hugging Face directory written by ``export_hf`` records; None without one. What every command reads first."""
    path = Path(path)
    if path.is_dir():
        return hf_model_record(path)
    if not path.exists():
        raise missing_checkpoint_error(path)
    return read_model_record(path, trust_checkpoint)


class DownloadError(OSError):
    """A weights file that could not be fetched; the message names the URL, the target and how to place it by hand."""


def download_weights(arch: str, weights_directory: str | os.PathLike | None = None, url: str | None = None) -> Path:
    """Fetch the weights of ``arch`` into the weights directory (atomic; skipped when present).

    A failed download (offline, HTTP error) is a ``DownloadError`` naming the URL and the file to save it as.
    """
    spec = get_spec(arch)
    if spec.weights_file is None:
        raise ValueError(f"{arch!r} has no pre-trained weights to download")
    target = weights_dir(weights_directory) / spec.weights_file
    if target.is_file():
        return target
    legacy = target.with_name(spec.legacy_weights_file) if spec.legacy_weights_file else None
    if legacy is not None and legacy.is_file():
        return legacy
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    url = url or spec.url
    _logger.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:  # URLError and HTTPError are OSErrors; so are timeouts and resets
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DownloadError(
            f"cannot download the weights of {arch!r} from {url} to {target}: {reason}. Without network access here, "
            f"download {url} elsewhere and save it as {target} (or set ${WEIGHTS_ENV} / weights_directory to the "
            "folder that holds it)"
        ) from e
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------- shapes
SHAPE_FIELDS = NETWORK_SHAPE_FIELDS + ("grid_t",)  # what must match for a registry model to hold a state dict (n_classes aside)


def _registry_order() -> list[ModelSpec]:
    """Released models first (in the registry's order), then the architectures to train."""
    return [s for s in REGISTRY.values() if s.labels_file is not None] + [s for s in REGISTRY.values() if s.labels_file is None]


def arch_of_shapes(found: dict, overrides: dict | None = None, fields: tuple[str, ...] = SHAPE_FIELDS) -> tuple[str, dict] | None:
    """The registry model whose config, with ``overrides``, has ``found``'s ``fields``
    (``models.checkpoints.state_dict_shapes``), and the overrides it needs: ``n_classes`` when the
    head differs, ``input_t`` when ``grid_t`` is not among ``fields`` and differs. Of those that fit,
    the first (``_registry_order``) that needs the fewest overrides; None if none fits.

    The released models that share shapes differ only in what the head predicts from CLS and DIST
    (``distilled_type``), never in the embeddings, so the first of them is as good as any.
    """
    valid = set(MAESTConfig.__dataclass_fields__)
    given = {k: v for k, v in (overrides or {}).items() if k in valid and v is not None}
    fits = []
    for spec in _registry_order():
        config = MAESTConfig(**{**spec.config, **given})
        if all(field in found and getattr(config, field) == found[field] for field in fields):
            needed = {}
            if "n_classes" in found and config.n_classes != found["n_classes"]:
                needed["n_classes"] = found["n_classes"]
            if "grid_t" in found and config.grid_t != found["grid_t"]:
                needed["input_t"] = found["grid_t"] * config.stride_t
            fits.append((len(needed), spec.name, needed))
    if not fits:
        return None
    _, name, needed = min(fits, key=lambda fit: fit[0])  # min keeps the first of equals
    return name, needed


def recognise_arch(state_dict: dict, source: str = "checkpoint", overrides: dict | None = None) -> tuple[str, dict]:
    """The registry model whose shapes ``state_dict`` has, and the overrides it needs (``n_classes``).

    Released models come first, in the registry's order; ``overrides`` (``MAESTConfig`` fields, e.g.
    ``input_t``) apply to each candidate. Shapes that fit no registry model are an error naming them
    and the option to set.
    """
    found = state_dict_shapes(state_dict)
    need = ("cls_token", "freq_new_pos_embed", "time_new_pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "head.1.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise CheckpointError(f"{source} is not a MAEST state dict: it lacks {', '.join(missing)}")
    fit = arch_of_shapes(found, overrides)
    if fit is not None:
        name, needed = fit
        _logger.info("%s records no architecture; recognised from its shapes as %s%s (pass arch= to choose another)",
                     source, name, f" with n_classes={found['n_classes']}" if needed else "")
        return name, needed
    held = ", ".join(f"{k}={v}" for k, v in found.items())
    frames = f"input_t in [{found['grid_t'] * 10}, {found['grid_t'] * 10 + 9}] for {found['grid_t']} time positions"
    network = arch_of_shapes(found, fields=NETWORK_SHAPE_FIELDS)
    if network is not None:  # a registry network trained on clips of another length: input_t is not in the weights
        name = network[0]
        raise CheckpointError(
            f"{source} records no architecture; its network is {name}'s ({held}) but trained on clips of another "
            f"length, which the weights do not say exactly: load_model(path, arch={name!r}, input_t=<the frames per clip "
            f"it was trained with>) ({frames}; the number of classes comes from the head)"
        )
    raise CheckpointError(
        f"{source} records no architecture and its shapes ({held}) fit no registry model: name it, e.g. "
        f"load_model(path, arch=<a registry name>, input_t=..., <any MAESTConfig field that differs>) ({frames}); "
        f"known: {', '.join(list_models())}"
    )


def check_network_shapes(arch: str | None, config: MAESTConfig, state_dict: dict, source: str = "checkpoint") -> None:
    """A ``CheckpointError`` naming the registry arch of ``state_dict``'s shape when its width, depth, ... are not
    ``config``'s (an arch named for a file that records none); time positions and head: the strict load's hints."""
    found = state_dict_shapes(state_dict)
    wrong = network_mismatch(config, found)
    if not wrong:
        return
    fit = arch_of_shapes(found, fields=NETWORK_SHAPE_FIELDS)
    if fit is None:
        fix = (
            f"no registry arch has that shape: set {', '.join(f'{k}={found[k]}' for k in wrong)} and the num_heads it was "
            f"trained with (no shape shows it); known: {', '.join(list_models())}"
        )
    else:
        name, needed = fit
        extra = [f"n_classes={needed['n_classes']}"] if "n_classes" in needed else []
        if "input_t" in needed:
            extra.append(input_t_hint(found["grid_t"], config.stride_t))
        spec = get_spec(name).config
        fix = (
            f"it is {name}'s shape (embed_dim={spec['embed_dim']}, depth={spec['depth']}, num_heads={spec['num_heads']}): "
            f"use arch={name!r} (config: maest.arch={name}){' with ' + ', '.join(extra) if extra else ''}"
        )
    named = f"{arch} has" if arch else "the model has"
    raise CheckpointError(
        f"{source} does not fit this model: its weights are {', '.join(f'{k}={found[k]}' for k in wrong)} where "
        f"{named} {', '.join(f'{k}={getattr(config, k)}' for k in wrong)}; {fix}"
    )


def build_config(arch: str, **overrides) -> MAESTConfig:
    spec = get_spec(arch)
    fields = set(MAESTConfig.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown MAEST options {sorted(unknown)}; valid: {sorted(fields)}")
    return MAESTConfig(**{**spec.config, **overrides})


def config_from_record(arch: str | None, record: dict | None, overrides: dict, source: str = "checkpoint", reinit_heads: bool = False) -> tuple[str | None, MAESTConfig]:
    """The architecture name and config to build: the checkpoint's record, the arch's, and ``overrides``.

    Without a record (upstream, bare or Hugging Face checkpoints) ``arch`` must be named. With one,
    the record fixes the architecture: an ``overrides`` value or a named ``arch`` whose registry
    config contradicts it is an error naming both (``n_classes`` may differ when ``reinit_heads``:
    fine-tuning on other labels). Fields the record leaves out (a Hugging Face directory's
    ``distilled_type``) are the arch's. Run-time options (patchout, dropout, ...) are taken as given.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None: the arch's / the checkpoint's
    fields = set(MAESTConfig.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown MAEST options {sorted(unknown)}; valid: {sorted(fields)}")
    if record is None:
        if arch is None:
            raise ValueError(
                f"{source} does not record its model (an upstream, bare or Hugging Face checkpoint): name its "
                f"architecture, e.g. arch='discogs-maest-30s-pw-129e' (config: maest.arch=...); known: {', '.join(list_models())}"
            )
        return arch, build_config(arch, **overrides)
    stored = record["config"]
    named = get_spec(arch).config if arch is not None else {}  # an unknown name is an error
    clashes = []  # sentences, each naming the given and the recorded value
    if arch is not None and arch != record["arch"]:
        wrong = [f"{k}={v} (the checkpoint has {stored[k]})" for k, v in named.items() if k != "n_classes" and k in stored and stored[k] != v]
        if wrong:
            clashes.append(f"arch={arch} (config: maest.arch) contradicts it: {arch} has {', '.join(wrong)}")
    wrong_keys = [k for k, v in overrides.items() if k in stored and stored[k] != v and not (k == "n_classes" and reinit_heads)]
    clashes += [f"{k}={overrides[k]} contradicts it (the checkpoint has {k}={stored[k]})" for k in wrong_keys]
    if clashes:
        held = ", ".join(f"{k}={stored[k]}" for k in stored)
        message = (
            f"{source} holds a {record['arch'] or 'MAEST'} model ({held}); {'; '.join(clashes)}. "
            "Drop the contradicting key(s): the checkpoint's config is used."
        )
        if wrong_keys == ["n_classes"] and len(clashes) == 1:  # only the head's size differs: fine-tuning can change it
            message += (
                " At inference, drop n_classes (and maest.reinit_heads: it only applies when training). To fine-tune "
                "on other labels, train with reinit_heads=True (config: maest.reinit_heads=True, or the finetune "
                "named config) and the new n_classes: the backbone loads, the heads are re-initialised."
            )
        raise ValueError(message)
    return arch or record["arch"], MAESTConfig(**{**named, **stored, **overrides})


def get_maest(
    arch: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    checkpoint_swa_weights: bool = True,
    weights_directory: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
    reinit_heads: bool = False,
    **overrides,
) -> MAEST:
    """Build ``arch`` (a registry name) in eval mode.

    ``checkpoint``: a MAEST checkpoint (Lightning, bare state dict or Hugging Face directory),
    loaded strictly; from a Lightning checkpoint the SWA weights unless ``checkpoint_swa_weights``
    is False. A checkpoint of this project records its model (SPEC §5.6), and so does the
    ``config.json`` of a directory written by ``export_hf``: ``arch`` may then be None, and a key
    that contradicts the record is an error. ``pretrained``: the registry's weights
    from the local weights directory (PaSST and DeiT weights are converted). Files are read without
    running code from them; a file whose weights need full unpickling loads only with
    ``trust_checkpoint=True`` (runs any code the file holds: only for files you trust).
    ``reinit_heads``: fine-tuning on other labels: the backbone loads strictly, the heads
    (``head.*``, ``head_dist.*``) are re-initialised for ``n_classes``. ``overrides``: any
    ``MAESTConfig`` field (n_classes, input_t, ...); None means the arch's or the checkpoint's.
    """
    obj = record = None
    hf_directory = checkpoint is not None and Path(checkpoint).is_dir()  # models.exchange.hf reads it
    source = f"{'Hugging Face directory' if hf_directory else 'checkpoint'} {checkpoint}"
    if hf_directory:
        record = hf_model_record(checkpoint)  # export_hf's config.json records the model; a folder without one is an error
        if record is None and arch is None:
            raise ValueError(
                f"{source}: its {CONFIG_NAME} has no {INPUT_T_KEY} (not written by export_hf, e.g. a Hub download), so it "
                f"does not record its model's clip: name its architecture, e.g. arch='discogs-maest-30s-pw-129e' "
                f"(config: maest.arch=...), or build it with models.exchange.hf.maest_from_hf(DIR), which infers the clip from max_length"
            )
    elif checkpoint is not None:
        if not Path(checkpoint).exists():
            raise missing_checkpoint_error(checkpoint)
        obj = read_checkpoint(checkpoint, trust_checkpoint)  # read once: record and weights
        record = record_of(obj, source)
    elif arch is None:
        raise ValueError("get_maest needs an arch (a registry name) or a checkpoint that records its model")
    arch, config = config_from_record(arch, record, overrides, source, reinit_heads)
    if obj is not None and not hf_directory:
        obj = select_state_dict(obj, use_swa=checkpoint_swa_weights, source=source)  # the weights, selected once
        check_network_shapes(arch, config, obj, source)  # before building: names the arch of the file's shape
    model = MAEST(config)
    if hf_directory:
        if not reinit_heads:
            check_hf_config(checkpoint, model.config)  # names the option to set, before the weights are read
        obj = read_hf_state_dict(checkpoint)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, use_swa=checkpoint_swa_weights, trust_checkpoint=trust_checkpoint, reinit_heads=reinit_heads, obj=obj)
    elif pretrained:
        spec = get_spec(arch)
        path = pretrained_path(arch, weights_directory)
        load_pretrained(model, path, kind=spec.init, use_swa=checkpoint_swa_weights, trust_checkpoint=trust_checkpoint, reinit_heads=reinit_heads)
    model.labels = _output_labels(arch, record, config, loaded=checkpoint is not None or pretrained, reinit_heads=reinit_heads)
    return model.eval()


def _output_labels(arch: str | None, record: dict | None, config: MAESTConfig, loaded: bool, reinit_heads: bool) -> list[str] | None:
    """The names of the outputs of weights just loaded: the checkpoint's record, else the released
    model's list when it has as many; None for new or re-initialised heads."""
    if not loaded or reinit_heads:
        return None
    if record is not None and record.get("labels") is not None:
        return list(record["labels"])
    spec = REGISTRY.get(arch) if arch is not None else None
    names = spec.labels() if spec is not None else None
    return names if names is not None and len(names) == config.n_classes else None
