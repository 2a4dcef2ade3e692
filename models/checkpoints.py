"""Reading every checkpoint format of SPEC §5 into a MAEST network, strictly.

- Lightning checkpoints ``{"state_dict": {"net.<k>", "net_swa.<k>"}}`` (ours and upstream's, whose
  torchaudio mel front-end buffers are checked against SPEC §2 and dropped);
- bare MAEST state dicts (the layout of the released models), also under ``"state_dict"`` or ``"model"``;
  a prefix that a wrapper put before every key (``module.`` of DataParallel/DDP, ``_orig_mod.`` of
  torch.compile) is dropped;
- PaSST AudioSet weights: frequency/time embeddings resized (bicubic), a foreign head dropped;
- DeiT-B distilled 384 (timm layout, optionally under ``"model"``): the 2-D position grid is
  resized to the new grid and averaged into frequency and time embeddings;
- Hugging Face ``ASTForAudioClassification`` directories: ``models.exchange.hf`` converts them
  (it builds on this module, never the other way; ``get_maest`` sends a directory there).

``checkpoint_filter_fn`` converts foreign weights and never touches the model; ``load_state_dict_strict``
reports every missing, unexpected or mis-shaped key by name.
Files are read without running code from them (``read_checkpoint``, ``models.safe_unpickle``);
full unpickling only with ``trust_checkpoint=True``.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath

import numpy as np
import torch
import torch.nn.functional as F

from .maest import ARCHITECTURE_FIELDS
from .mel import N_FFT, N_MELS, slaney_filterbank
from .safe_unpickle import Inert, InertGlobal, SafeLoadError, safe_load

_logger = logging.getLogger(__name__)

TOKEN_KEYS = ("cls_token", "dist_token", "new_pos_embed", "freq_new_pos_embed", "time_new_pos_embed")
HEAD_PREFIXES = ("head.", "head_dist.")
MODEL_RECORD_KEY = "maest_model"  # this project's checkpoints: {"arch", "config", "labels"} (SPEC §5.6)
SAVED_AT_KEY = "maest_saved_at_ns"  # when training wrote the checkpoint (time.time_ns): "newest" survives a copy of the folder


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file, the keys and the fix."""


# ---------------------------------------------------------------------------------------- reading
TRUST_HINT = "trust_checkpoint=True (config: maest.trust_checkpoint=True)"
# Plain types that Lightning puts in checkpoints, allowed for torch's weights-only reader (a
# WindowsPath cannot be built on POSIX: the restricted reader makes it a PureWindowsPath).
_SAFE_GLOBALS = [PurePosixPath, PureWindowsPath, PosixPath]


NOT_A_CHECKPOINT = "the file is truncated or not a torch checkpoint"
# How torch.save files begin: a zip archive (torch >= 1.6) or, in the legacy format, a binary pickle.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_torch_file(path: Path) -> None:
    """A clear error for a file that cannot be a torch checkpoint (text, audio, empty), before torch's reader trips on it."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (truncated, or not a torch checkpoint)")
    if not head.startswith(_TORCH_MAGIC):
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is not a torch checkpoint (neither a zip archive nor a pickle; it begins "
            f"with {head[:8]!r}): give the .ckpt/.pt/.pth file written by torch.save or a Lightning run, a "
            ".safetensors file, or a Hugging Face model directory"
        )


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file on CPU; a corrupt or truncated file is a ``CheckpointError`` naming it."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError(f"reading {path} needs safetensors: pip install safetensors (see requirements-extras.txt)") from e
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e} (the file is truncated or not a safetensors file)") from e


def read_checkpoint(path: str | os.PathLike, trust_checkpoint: bool = False, mmap: bool = False) -> dict:
    """Load a checkpoint file on CPU without running code from it.

    torch's weights-only reader comes first; a file it refuses (hyper-parameter objects, Sacred
    containers) is read by ``models.safe_unpickle.safe_load``: tensors and plain containers are
    rebuilt, any other object stays inert data and is logged. ``trust_checkpoint=True`` unpickles
    the file fully, which runs whatever code it holds: only for files you trust. ``mmap``: the
    tensors of a zip-format file are mapped, not read (for a look at shapes and entries).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a file: a Hugging Face model directory is read by "
            "models.exchange.hf (get_maest(checkpoint=DIR) reads it)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    _check_torch_file(path)
    if trust_checkpoint:
        _logger.warning("%s: trust_checkpoint=True, unpickling it fully (this runs any code the file holds)", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user: trust_checkpoint=True
        except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        refused = next((line.strip() for line in lines if "GLOBAL" in line or "Unsupported" in line), "objects besides tensors")
    except Exception as e:  # noqa: BLE001 - torch's reader fails on other files with any error (KeyError, IndexError, ...)
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e} ({NOT_A_CHECKPOINT})") from e
    # Hyper-parameter objects and the like: read as data, never unpickled.
    try:
        obj, inert = safe_load(path)
    except SafeLoadError as e:
        raise CheckpointError(
            f"cannot read checkpoint {path} safely: torch's weights-only reader refused it ({refused}) and the "
            f"restricted reader failed: {e}. If you trust this file, load it with {TRUST_HINT}"
        ) from e
    if inert:
        _logger.warning(
            "%s: %d kind(s) of pickled object were not unpickled, kept as inert data: %s. Only the weights are "
            "loaded; %s would unpickle them (only for files you trust)",
            path, len(inert), ", ".join(inert[:20]) + (" ..." if len(inert) > 20 else ""), TRUST_HINT,
        )
    return obj


# ---------------------------------------------------------------------------------------- model record
def model_record(arch: str | None, config, labels=None) -> dict:
    """What a checkpoint of this project holds besides the weights (SPEC §5.6), as plain data.

    ``{"arch": registry name or None, "config": config.architecture(), "labels": [names] or None}``:
    only str, int, float, bool, None, lists and dicts, so the file still loads with
    ``torch.load(weights_only=True)``.
    """
    if labels is not None:
        labels = [str(name) for name in labels]
        if len(labels) != config.n_classes:
            raise ValueError(f"{len(labels)} label names for a model with n_classes={config.n_classes}")
    return {"arch": None if arch is None else str(arch), "config": config.architecture(), "labels": labels}


def record_of(obj, source: str = "checkpoint") -> dict | None:
    """The checked model record inside a read checkpoint, or None (upstream, bare or foreign files)."""
    if not isinstance(obj, dict) or MODEL_RECORD_KEY not in obj:
        return None
    record = obj[MODEL_RECORD_KEY]
    problem = None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        problem = "it is not a dict with a 'config' dict"
    elif record.get("arch") is not None and not isinstance(record["arch"], str):
        problem = f"'arch' is {record['arch']!r}, not a name"
    else:
        config = record["config"]
        odd = [k for k, v in config.items() if k not in ARCHITECTURE_FIELDS or not isinstance(v, (bool, int, float, str))]
        labels = record.get("labels")
        if odd:
            problem = f"unknown or non-plain config entries {odd}"
        elif "n_classes" not in config:
            problem = "the config lacks n_classes"
        elif labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) != config["n_classes"]):
            problem = f"'labels' must be a list of {config['n_classes']} names"
    if problem:
        raise CheckpointError(f"{source}: its {MODEL_RECORD_KEY!r} record is malformed ({problem}); name the architecture (maest.arch) and load it as a plain checkpoint")
    return {"arch": record.get("arch"), "config": dict(record["config"]), "labels": record.get("labels")}


def read_model_record(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict | None:
    """The model record of a checkpoint file (None for files without one; a Hugging Face directory's is
    ``models.exchange.hf.hf_model_record``'s, and ``models.registry.read_record`` reads either).

    Memory-maps the file where torch's weights-only reader takes it, so the weights are not read.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder: models.registry.read_record reads a Hugging Face directory's record")
    if path.suffix == ".safetensors":
        return None  # bare weights: nothing recorded
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - refused or not a zip file: read it the careful way
        obj = read_checkpoint(path, trust_checkpoint)
    return record_of(obj, source=f"checkpoint {path}")


def select_state_dict(obj, use_swa: bool = True, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The network's state dict inside a Lightning, DeiT (``"model"``) or bare checkpoint (also under ``"state_dict"``).

    Every value must be a tensor; upstream's torchaudio mel front-end is checked and dropped, and so is
    a wrapper's prefix on every key (``strip_wrapper_prefix``).
    """
    if isinstance(obj, torch.nn.Module):  # a whole pickled network (readable only with trust_checkpoint=True)
        obj = obj.state_dict()
    if isinstance(obj, (Inert, InertGlobal)):
        raise CheckpointError(
            f"{source} holds a pickled {obj.module}.{obj.name} object, not a state dict; it was not unpickled. "
            f"If you trust this file, load it with {TRUST_HINT}"
        )
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} does not hold a state dict (found {type(obj).__name__})")
    sd = strip_wrapper_prefix(_network_state_dict(obj, use_swa, source), source)
    odd_keys = [k for k in sd if not isinstance(k, str)]
    if odd_keys:
        raise CheckpointError(f"{source}: state dict keys must be strings, found {', '.join(repr(k) for k in odd_keys[:5])}")
    objects = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    if objects:
        listed = ", ".join(f"{k} ({v!r})" if isinstance(v, (Inert, InertGlobal)) else f"{k} ({type(v).__name__})" for k, v in list(objects.items())[:5])
        msg = f"{source}: {len(objects)} weight(s) are not tensors: {listed}"
        if any(isinstance(v, (Inert, InertGlobal)) for v in objects.values()):
            msg += f". They are pickled objects that were not unpickled: if you trust this file, load it with {TRUST_HINT}"
        raise CheckpointError(msg)
    return drop_mel_frontend(sd, source)


# Prefixes a wrapper puts before every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def wrapper_prefix(keys) -> str:
    """The ``WRAPPER_PREFIXES`` (one or more: ``module.module.``) that every key starts with; "" if none."""
    keys, prefix = list(keys), ""
    while keys:
        step = next((p for p in WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(prefix + p) for k in keys)), None)
        if step is None:
            break
        prefix += step
    return prefix


def strip_wrapper_prefix(state_dict: dict, source: str = "checkpoint") -> dict:
    """``state_dict`` without the ``wrapper_prefix`` of its keys (a DataParallel/DDP or compiled network's)."""
    prefix = wrapper_prefix(state_dict)
    if not prefix:
        return state_dict
    _logger.info("%s: every key starts with %r (a wrapped network's state dict): the prefix is dropped", source, prefix)
    return {k[len(prefix) :]: v for k, v in state_dict.items()}


def _network_state_dict(obj: dict, use_swa: bool, source: str) -> dict:
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        if not any(isinstance(k, str) and k.startswith(("net.", "net_swa.")) for k in sd) and wrapper_prefix(sd) + "cls_token" in sd:
            return sd  # a bare MAEST state dict saved under "state_dict" (as under "model"), not a Lightning checkpoint
        prefixes = ("net_swa.", "net.") if use_swa else ("net.",)
        for prefix in prefixes:
            sub = {k[len(prefix) :]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)}
            if sub:
                if use_swa and prefix == "net.":
                    raise CheckpointError(
                        f"{source} is a Lightning checkpoint without SWA weights (no 'net_swa.' keys); "
                        "load its plain weights with checkpoint_swa_weights=False"
                    )
                return sub
        raise CheckpointError(f"{source} is a Lightning checkpoint without 'net.' keys; found e.g. {list(sd)[:5]}")
    if "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    return obj


# Upstream's network (since 2025) owns a torchaudio front-end: Spectrogram(n_fft=512) stores its
# Hann window and MelScale its (n_freqs, n_mels) filterbank. They must be SPEC §2's, which
# models.mel computes outside the network; then they carry nothing and are dropped.
MEL_FRONTEND_KEYS = ("melspectrogram.spec.window", "melspectrogram.mel_scale.fb")
MEL_FRONTEND_RTOL = 1e-4  # of the largest value: torchaudio's float32 filterbank is within 4e-6 of librosa's


def _mel_frontend_reference() -> dict[str, tuple[torch.Tensor, str]]:
    return {
        "melspectrogram.spec.window": (torch.hann_window(N_FFT, periodic=True, dtype=torch.float64), f"a periodic {N_FFT}-point Hann window"),
        "melspectrogram.mel_scale.fb": (
            torch.from_numpy(slaney_filterbank(dtype=np.float64)).T,
            f"the {N_FFT // 2 + 1}x{N_MELS} Slaney mel filterbank of SPEC §2 (16 kHz, 0-8000 Hz, unit-area bands)",
        ),
    }


def drop_mel_frontend(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Check upstream's mel front-end buffers against SPEC §2 and drop them (an error if they differ)."""
    present = [k for k in MEL_FRONTEND_KEYS if k in state_dict]
    if not present:
        return state_dict
    reference = _mel_frontend_reference()
    for key in present:
        want, description = reference[key]
        got = state_dict[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(got.shape)}; expected {tuple(want.shape)}, {description}")
        error = (got.double() - want).abs().max().item() / want.abs().max().item()
        if not error <= MEL_FRONTEND_RTOL:  # also catches NaN
            raise CheckpointError(
                f"{source}: {key} is not {description} (largest difference {error:.2g} of its peak, tolerance "
                f"{MEL_FRONTEND_RTOL:g}): this network was trained on other mels than MAEST's front-end computes"
            )
    _logger.info("%s: dropped upstream's mel front-end buffers %s (they equal SPEC §2's, computed by models.mel)", source, ", ".join(present))
    return {k: v for k, v in state_dict.items() if k not in MEL_FRONTEND_KEYS}


# ---------------------------------------------------------------------------------------- conversion
def resize_time_freq_embed(embed: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a ``(1, D, F, T)`` position embedding to ``size = (F', T')`` (PaSST -> MAEST)."""
    if tuple(embed.shape[-2:]) == tuple(size):
        return embed
    return F.interpolate(embed.float(), size=size, mode=mode, align_corners=False).to(embed.dtype)


def split_image_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_tokens: int = 2, mode: str = "bicubic"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ViT ``(1, tokens + G*G, D)`` -> token ``(1, tokens, D)``, frequency ``(1, D, F, 1)``, time ``(1, D, 1, T)``.

    The square grid is resized to ``grid = (F, T)``, then averaged over time (frequency embedding)
    and over frequency (time embedding), as in PaSST.
    """
    tokens, flat = pos_embed[:, :num_tokens], pos_embed[0, num_tokens:]
    side = int(round(flat.shape[0] ** 0.5))
    if side * side != flat.shape[0]:
        raise CheckpointError(f"pos_embed grid of {flat.shape[0]} positions is not square")
    image = flat.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
    image = F.interpolate(image.float(), size=grid, mode=mode, align_corners=False)
    return tokens, image.mean(dim=3, keepdim=True), image.mean(dim=2, keepdim=True)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model, kind: str = "maest") -> dict[str, torch.Tensor]:
    """Convert foreign weights (``kind`` "passt" or "deit") to ``model``'s layout; "maest" passes through."""
    if kind == "maest":
        return dict(state_dict)
    if kind not in ("passt", "deit"):
        raise ValueError(f"unknown weights kind {kind!r}: use 'maest', 'passt' or 'deit'")
    cfg = model.config
    out = dict(state_dict)
    if "pos_embed" in out:  # ImageNet ViT (DeiT)
        tok, freq, time = split_image_pos_embed(out.pop("pos_embed"), (cfg.grid_f, cfg.grid_t))
        out.update(new_pos_embed=tok, freq_new_pos_embed=freq, time_new_pos_embed=time)
    else:
        for key, size in (("freq_new_pos_embed", (cfg.grid_f, 1)), ("time_new_pos_embed", (1, cfg.grid_t))):
            if key not in out:
                raise CheckpointError(f"{kind} weights lack {key!r}: not a PaSST checkpoint")
            out[key] = resize_time_freq_embed(out[key], size)
    w = out.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 4 and w.shape[1] != 1:
        # RGB patch projection -> mono: sum over input channels (timm adapt_input_conv).
        out["patch_embed.proj.weight"] = w.float().sum(dim=1, keepdim=True).to(w.dtype)
    # A classifier of another size (AudioSet's 527, ImageNet's 1000) is dropped; the new head stays initialised.
    own = model.state_dict()
    for key in [k for k in out if k.startswith(HEAD_PREFIXES) or k == "head.weight" or k == "head.bias"]:
        if key not in own or own[key].shape != out[key].shape:
            _logger.info("dropping classifier weight %s %s (model needs %s)", key, tuple(out[key].shape), tuple(own[key].shape) if key in own else None)
            del out[key]
    return out


# ---------------------------------------------------------------------------------------- loading
def load_state_dict_strict(model, state_dict: dict[str, torch.Tensor], source: str = "checkpoint", allow_missing: tuple[str, ...] = ()):
    """Load ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key is an error naming it."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(allow_missing)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [(k, tuple(state_dict[k].shape), tuple(own[k].shape)) for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit this MAEST model ({_describe(model)}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        for k, got, want in shapes[:10]:
            lines.append(f"  {k}: checkpoint {got}, model {want}")
        hint = _hint(model, state_dict, shapes)
        if hint:
            lines.append(f"  {hint}")
        raise CheckpointError("\n".join(lines))
    own_missing = {k: own[k] for k in own if k not in state_dict}
    model.load_state_dict({**own_missing, **state_dict}, strict=True)
    return model


def _describe(model) -> str:
    c = model.config
    return f"embed_dim={c.embed_dim}, depth={c.depth}, n_classes={c.n_classes}, input_t={c.input_t} ({c.grid_t} time positions)"


# The MAESTConfig values a state dict's shapes fix (state_dict_shapes), besides grid_t and n_classes,
# which input_t and n_classes set on any architecture. num_heads is not among them: no shape shows it.
NETWORK_SHAPE_FIELDS = ("embed_dim", "depth", "mlp_ratio", "qkv_bias", "patch_size", "grid_f")


def state_dict_shapes(state_dict: dict[str, torch.Tensor]) -> dict:
    """The ``MAESTConfig`` values a MAEST state dict's shapes fix: ``NETWORK_SHAPE_FIELDS``, ``grid_t``
    (time positions) and ``n_classes``; those it cannot tell (a key missing, blocks not numbered
    ``0..depth-1``) are left out."""
    found = {}
    if "cls_token" in state_dict:
        found["embed_dim"] = state_dict["cls_token"].shape[-1]
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.count(".") >= 2}
    if blocks == {str(i) for i in range(len(blocks))}:
        found["depth"] = len(blocks)
    if "blocks.0.mlp.fc1.weight" in state_dict and "embed_dim" in found:
        found["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / found["embed_dim"]
    if "blocks.0.attn.qkv.weight" in state_dict:
        found["qkv_bias"] = "blocks.0.attn.qkv.bias" in state_dict
    if "patch_embed.proj.weight" in state_dict:
        found["patch_size"] = state_dict["patch_embed.proj.weight"].shape[-1]
    if "freq_new_pos_embed" in state_dict:
        found["grid_f"] = state_dict["freq_new_pos_embed"].shape[2]
    if "time_new_pos_embed" in state_dict:
        found["grid_t"] = state_dict["time_new_pos_embed"].shape[-1]
    if "head.1.weight" in state_dict:
        found["n_classes"] = state_dict["head.1.weight"].shape[0]
    return found


def network_mismatch(config, found: dict) -> list[str]:
    """The ``NETWORK_SHAPE_FIELDS`` where ``found`` (``state_dict_shapes``) and ``config`` differ."""
    return [k for k in NETWORK_SHAPE_FIELDS if k in found and found[k] != getattr(config, k)]


def input_t_hint(grid_t: int, stride_t: int) -> str:
    lo, hi = grid_t * stride_t, (grid_t + 1) * stride_t - 1
    return f"input_t in [{lo}, {hi}] (a {lo * 256 / 16000:.0f} s model; input_t = seconds * 16000 // 256)"


def _hint(model, state_dict, shapes) -> str:
    c = model.config
    bad = {k for k, _, _ in shapes}
    found = state_dict_shapes(state_dict)
    other = network_mismatch(c, found)
    if other:  # another network: the time positions and the head follow from it, no input_t or n_classes fixes it
        return (
            f"the checkpoint is another network: {', '.join(f'{k}={found[k]}' for k in other)} (this model: "
            f"{', '.join(f'{k}={getattr(c, k)}' for k in other)}): build the model with an arch of that shape, or "
            "set those options (and num_heads, which no shape shows)"
        )
    hints = []
    if "time_new_pos_embed" in bad:
        hints.append(f"the checkpoint has {found['grid_t']} time positions: build the model with {input_t_hint(found['grid_t'], c.stride_t)}")
    if bad & {"head.1.weight", "head_dist.weight"}:
        n = state_dict.get("head.1.weight", state_dict.get("head_dist.weight")).shape[0]
        hints.append(
            f"the checkpoint predicts {n} classes: build the model with n_classes={n}, or re-initialise the heads to "
            "fine-tune it on other labels (reinit_heads=True; config: maest.reinit_heads=True, or the finetune named config)"
        )
    return "; ".join(hints)


def load_checkpoint(model, path: str | os.PathLike, use_swa: bool = True, trust_checkpoint: bool = False, reinit_heads: bool = False, obj=None):
    """Load a MAEST checkpoint (Lightning or bare) strictly into ``model``.

    ``trust_checkpoint=True`` unpickles the file fully (runs any code it holds): only for files you trust.
    ``reinit_heads=True`` (fine-tuning on other labels): the backbone loads strictly, the heads keep
    ``model``'s fresh initialisation. ``obj``: the file's content when the caller has read it already
    (a Hugging Face directory's state dict, ``models.exchange.hf.read_hf_state_dict``).
    """
    if obj is None:
        obj = read_checkpoint(path, trust_checkpoint)
    sd = select_state_dict(obj, use_swa=use_swa, source=f"checkpoint {path}")
    if reinit_heads:
        return load_backbone(model, sd, source=f"checkpoint {path}")
    return load_state_dict_strict(model, sd, source=f"checkpoint {path}")


def load_pretrained(model, path: str | os.PathLike, kind: str = "maest", use_swa: bool = True, trust_checkpoint: bool = False, reinit_heads: bool = False):
    """Initialise ``model`` from weights of ``kind`` ('maest', 'passt' or 'deit'), converting as needed.

    ``reinit_heads=True``: every head is re-initialised (fine-tuning), not only a foreign one.
    """
    sd = select_state_dict(read_checkpoint(path, trust_checkpoint), use_swa=use_swa, source=f"weights {path}")
    if reinit_heads:
        return load_backbone(model, checkpoint_filter_fn(sd, model, kind=kind), source=f"{kind} weights {path}")
    sd = checkpoint_filter_fn(sd, model, kind=kind)
    # Foreign classifiers are dropped above; the model keeps its freshly initialised head.
    allow = HEAD_PREFIXES if kind != "maest" else ()
    return load_state_dict_strict(model, sd, source=f"{kind} weights {path}", allow_missing=allow)


def load_backbone(model, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"):
    """Fine-tuning: every key but the heads (``head.*``, ``head_dist.*``) loads strictly; the heads
    keep ``model``'s fresh initialisation for its ``n_classes``."""
    heads = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith(HEAD_PREFIXES)}
    backbone = {k: v for k, v in state_dict.items() if k not in heads}
    load_state_dict_strict(model, backbone, source=source, allow_missing=HEAD_PREFIXES)
    old = heads.get("head.1.weight", heads.get("head_dist.weight", (None,)))[0]
    _logger.info(
        "%s: backbone loaded; heads (head.*, head_dist.*) re-initialised for n_classes=%d (the checkpoint's heads had %s classes)",
        source, model.config.n_classes, old,
    )
    return model
