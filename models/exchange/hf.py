"""Hugging Face ``ASTForAudioClassification`` <-> MAEST (SPEC §5.5).

The published MAEST models on the Hub (``mtg-upf/discogs-maest-*``) are AST checkpoints. AST is
the same network with other names, two differences of form and one of substance:

- AST has one learned position embedding per patch, ``position_embeddings (1, 2 + F'*T', D)``;
  MAEST sums a frequency ``(1, D, F, 1)`` and a time ``(1, D, 1, T)`` embedding. Export writes the
  sum, flattened frequency-major like the patch tokens; import splits it back (row and column
  means) and refuses grids that are not such a sum (an AudioSet AST, not a MAEST model). The split
  is unique up to a constant moved between the two: the sum, hence every output, is unchanged.
- AST fuses nothing: ``qkv`` is stored as ``query``/``key``/``value``.
- AST classifies ``head((CLS + DIST) / 2)`` with one head. That is MAEST's ``distilled_type="mean"``.
  A ``"separated"`` (teacher-student) model predicts ``head(CLS)`` and has a second head for the
  teacher that AST has no place for: export refuses it unless ``allow_separated=True``, in which
  case the file predicts ``head((CLS + DIST) / 2)`` with the CLS head (what the published
  ``discogs-maest-30s-pw-73e-ts`` on the Hub does) and a warning says the logits differ.

AST feeds exactly ``max_length`` frames and has one time position per time patch of that length.
``export_hf`` writes ``max_length`` = the model's own clip (``input_t``: 312, 625, 1250, 1875 frames
for 5 to 30 s), so the exported model, with ``MAESTFeatureExtractor``, gives our logits on our
clips. Such a clip has one time patch fewer than the time embedding (30 of 31 for 5 s): the time
positions AST has no room for are written to ``maest_extra.safetensors`` beside the weights, and
``maest_input_t`` to ``config.json``, so that an import restores the whole model exactly
(transformers ignores both). ``max_length="hub"`` writes the published models' lengths instead
(``MAESTConfig.max_frames``: 316, 626, 1256, 1876, every position in the AST grid), to publish next
to them; their AST then sees 4, 1, 6 or 1 frames more than our clips and its logits differ from
ours on them. An import without ``maest_input_t`` (a Hub model) takes ``input_t`` as the whole-second
clip whose time embedding the grid fills (625 for ``max_length=626``), else ``time patches * 10``.

Files use the Hub layout (``encoder.layer.{i}.attention.attention.query``, ...), which transformers
4 and 5 both read and write. This module imports transformers only inside the functions that use
it: reading a directory needs only torch (and safetensors for ``.safetensors`` files).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from ..checkpoints import CheckpointError, load_state_dict_strict, read_checkpoint, read_safetensors
from ..maest import MAEST, MAESTConfig

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"
WEIGHT_NAMES = (SAFETENSORS_NAME, TORCH_NAME, SAFETENSORS_NAME + INDEX_SUFFIX, TORCH_NAME + INDEX_SUFFIX)
# MAEST parameters AST has no room for (the time positions past max_length); transformers never reads them.
EXTRA_NAMES = ("maest_extra.safetensors", "maest_extra.bin")
TIME_TAIL_KEY = "time_new_pos_embed_tail"  # (1, D, 1, k): the last k time positions, relative to the grid's split
INPUT_T_KEY = "maest_input_t"  # config.json: the exported model's input_t (time embedding = input_t // time_stride)
HUB_MAX_LENGTH = "hub"  # export_hf(max_length="hub"): the published models' max_length, MAESTConfig.max_frames

AST_MODEL_TYPE = "audio-spectrogram-transformer"
AST_ARCHITECTURE = "ASTForAudioClassification"
PREFIX = "audio_spectrogram_transformer."
# AST layer-norm eps of the published MAEST models (the blocks' and the final norm's). MAEST's head
# LayerNorm keeps torch's 1e-5 but AST has one eps for all: logits differ by about 1e-5 relative.
LAYER_NORM_EPS = 1e-6
# What MAEST's front-end and patch grid fix; an AST with other values is not a MAEST model.
MAEST_FIXED = {"num_mel_bins": 96, "patch_size": 16, "frequency_stride": 10, "time_stride": 10, "hidden_act": "gelu"}
ADDITIVE_RTOL = 1e-4  # max |grid - (freq + time)| / max |grid| for float32 position embeddings

# Per-block names: MAEST suffix -> AST (Hub layout) suffix, after "blocks.{i}." / PREFIX + "encoder.layer.{i}.".
_BLOCK_NAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")
# transformers >= 5 names modules differently in memory (it converts on load and save); accepted on import.
_V5_BLOCK_NAMES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_GLOBAL_NAMES = {
    "cls_token": PREFIX + "embeddings.cls_token",
    "dist_token": PREFIX + "embeddings.distillation_token",
    "patch_embed.proj.weight": PREFIX + "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": PREFIX + "embeddings.patch_embeddings.projection.bias",
    "norm.weight": PREFIX + "layernorm.weight",
    "norm.bias": PREFIX + "layernorm.bias",
    "head.0.weight": "classifier.layernorm.weight",
    "head.0.bias": "classifier.layernorm.bias",
    "head.1.weight": "classifier.dense.weight",
    "head.1.bias": "classifier.dense.bias",
}
POS_KEY = PREFIX + "embeddings.position_embeddings"


# ---------------------------------------------------------------------------------------- position grid
def merge_position_embeddings(new_pos: torch.Tensor, freq: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """MAEST ``(1,2,D)``, ``(1,D,F,1)``, ``(1,D,1,T)`` -> AST ``(1, 2 + F*T, D)``, frequency-major."""
    grid = (freq + time).flatten(2).transpose(1, 2)  # (1, F*T, D), index f * T + t as MAEST's tokens
    return torch.cat((new_pos, grid), dim=1)


def split_position_embeddings(
    pos: torch.Tensor, grid: tuple[int, int], source: str = "AST checkpoint"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AST ``(1, 2 + F*T, D)`` -> MAEST ``new_pos_embed``, ``freq_new_pos_embed``, ``time_new_pos_embed``.

    ``freq[f] = mean_t grid[f, t]`` and ``time[t] = mean_f grid[f, t] - mean(grid)`` reproduce the
    grid exactly when it is a sum of a frequency and a time term, which every MAEST export is. A
    grid that is not (an AST trained with free 2-D embeddings) raises ``CheckpointError``.
    """
    n_f, n_t = grid
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] != 2 + n_f * n_t:
        raise CheckpointError(
            f"{source}: position_embeddings of shape {tuple(pos.shape)} do not fit a {n_f} x {n_t} patch grid "
            f"(expected (1, {2 + n_f * n_t}, D))"
        )
    work = pos.float()
    image = work[0, 2:].reshape(n_f, n_t, -1)  # (F, T, D)
    freq = image.mean(dim=1)  # (F, D)
    time = image.mean(dim=0) - image.mean(dim=(0, 1))  # (T, D)
    residual = (image - freq[:, None] - time[None]).abs().max()
    scale = image.abs().max().clamp_min(1e-12)
    # Stored in half precision the sum carries rounding noise of a few ulps: allow it, nothing more.
    tolerance = max(ADDITIVE_RTOL, 4 * torch.finfo(pos.dtype).eps) if pos.is_floating_point() else ADDITIVE_RTOL
    if residual / scale > tolerance:
        raise CheckpointError(
            f"{source}: its position embeddings are not a sum of a frequency and a time embedding (relative "
            f"residual {float(residual / scale):.3g} > {tolerance:g}): this is an AST model, not a MAEST model, "
            "and MAEST cannot represent it"
        )
    new_pos = pos[:, :2]
    freq_embed = freq.t()[None, :, :, None].to(pos.dtype)  # (1, D, F, 1)
    time_embed = time.t()[None, :, None, :].to(pos.dtype)  # (1, D, 1, T)
    return new_pos, freq_embed, time_embed


# ---------------------------------------------------------------------------------------- configs
def export_max_length(config: MAESTConfig, max_length: int | str | None = None) -> int:
    """AST ``max_length`` for an export: None -> the model's clip (``input_t``), ``"hub"`` -> ``max_frames``, or checked frames."""
    if max_length is None:
        max_length = config.input_t
    elif max_length == HUB_MAX_LENGTH:
        max_length = config.max_frames
    longest = config.max_input_frames  # still one time position per patch
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not config.patch_size <= max_length <= longest:
        raise ValueError(
            f"max_length must be None (the model's clip, {config.input_t} frames), {HUB_MAX_LENGTH!r} (the published "
            f"models' length, {config.max_frames}) or frames in [{config.patch_size}, {longest}] for this model, got {max_length!r}"
        )
    return max_length


def hf_config_dict(config: MAESTConfig, labels: list[str] | None = None, max_length: int | str | None = None) -> dict:
    """The ``ASTConfig`` fields of a MAEST model (``id2label``/``label2id`` from ``labels``; ``max_length`` as ``export_hf``)."""
    if config.input_f != MAEST_FIXED["num_mel_bins"] or config.patch_size != MAEST_FIXED["patch_size"]:
        raise ValueError(
            f"only 96-band, 16x16-patch MAEST models export to AST (the MAEST front-end); this one has "
            f"input_f={config.input_f}, patch_size={config.patch_size}"
        )
    n_f, _ = config.patches(config.max_frames)
    if n_f != config.grid_f:
        raise ValueError(f"AST needs one frequency embedding per frequency patch; this model has {config.grid_f} for {n_f} patches")
    if labels is None:
        labels = [f"LABEL_{i}" for i in range(config.n_classes)]
    labels = [str(label) for label in labels]
    if len(labels) != config.n_classes:
        raise ValueError(f"{len(labels)} labels given for a model with n_classes={config.n_classes}")
    if len(set(labels)) != len(labels):
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        raise ValueError(f"labels must be unique (label2id maps names to indices); duplicated: {duplicated[:5]}")
    intermediate = int(config.embed_dim * config.mlp_ratio)
    return {
        "architectures": [AST_ARCHITECTURE],
        "model_type": AST_MODEL_TYPE,
        "num_mel_bins": config.input_f,
        "max_length": export_max_length(config, max_length),
        "patch_size": config.patch_size,
        "frequency_stride": config.stride_f,
        "time_stride": config.stride_t,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": intermediate,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,
        "qkv_bias": config.qkv_bias,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        # Styles are independent (MAEST is trained with a binary cross-entropy per label): pipelines
        # then report sigmoid scores, and a Hugging Face fine-tuning uses BCEWithLogitsLoss.
        "problem_type": "multi_label_classification",
        INPUT_T_KEY: config.input_t,
    }


def _patch_size(hf_config: dict) -> int | tuple:
    p = hf_config.get("patch_size", 16)
    if isinstance(p, (list, tuple)):
        return int(p[0]) if len(set(p)) == 1 else tuple(p)
    return int(p)


def _ast_grid(hf_config: dict) -> tuple[int, int]:
    p, fs, ts = _patch_size(hf_config), hf_config["frequency_stride"], hf_config["time_stride"]
    return (hf_config["num_mel_bins"] - p) // fs + 1, (hf_config["max_length"] - p) // ts + 1


def _check_maest_compatible(hf_config: dict, source: str) -> None:
    model_type = hf_config.get("model_type")
    if model_type not in (None, AST_MODEL_TYPE):
        raise CheckpointError(f"{source} holds a {model_type!r} model; MAEST imports {AST_ARCHITECTURE} ({AST_MODEL_TYPE!r}) models")
    missing = [k for k in ("num_mel_bins", "max_length", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in hf_config]
    if missing:
        raise CheckpointError(f"{source}: config lacks {missing}; not an {AST_ARCHITECTURE} config")
    found = {k: _patch_size(hf_config) if k == "patch_size" else hf_config.get(k, v) for k, v in MAEST_FIXED.items()}
    wrong = {k: v for k, v in found.items() if v != MAEST_FIXED[k]}
    if wrong:
        raise CheckpointError(
            f"{source}: {', '.join(f'{k}={v!r}' for k, v in wrong.items())}; MAEST models have "
            f"{', '.join(f'{k}={MAEST_FIXED[k]!r}' for k in wrong)} (its mel front-end and patch grid): "
            "this AST model cannot be loaded as MAEST"
        )


def maest_overrides_from_hf(hf_config: dict, source: str = "AST config") -> dict:
    """The ``MAESTConfig`` fields an AST config implies (``input_t``: ``maest_input_t``, else inferred, see the module docstring)."""
    _check_maest_compatible(hf_config, source)
    d, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    _, n_t = _ast_grid(hf_config)
    input_t = _input_t(hf_config, n_t, source)
    n_classes = len(hf_config["id2label"]) if hf_config.get("id2label") else hf_config.get("num_labels", 2)
    return {
        "n_classes": int(n_classes),
        "input_f": int(hf_config["num_mel_bins"]),
        "input_t": input_t,
        "patch_size": _patch_size(hf_config),
        "stride_f": int(hf_config["frequency_stride"]),
        "stride_t": int(hf_config["time_stride"]),
        "embed_dim": int(d),
        "depth": int(hf_config["num_hidden_layers"]),
        "num_heads": int(heads),
        "mlp_ratio": hf_config["intermediate_size"] / d,
        "qkv_bias": bool(hf_config.get("qkv_bias", True)),
        "distilled_type": "mean",  # AST's only classifier: head((CLS + DIST) / 2)
    }


def _input_t(hf_config: dict, n_t: int, source: str) -> int:
    stride = int(hf_config["time_stride"])
    if INPUT_T_KEY in hf_config:
        input_t = hf_config[INPUT_T_KEY]
        if isinstance(input_t, bool) or not isinstance(input_t, int) or input_t // stride < n_t:
            raise CheckpointError(
                f"{source}: {INPUT_T_KEY}={input_t!r} gives fewer time positions than max_length={hf_config['max_length']} needs ({n_t})"
            )
        return input_t
    # A Hub model: the whole-second clip (seconds * 16000 // 256) whose time embedding has n_t positions.
    whole_seconds = [int(s * 16000) // 256 for s in range(1, 3600)]
    fits = [t for t in whole_seconds if t // stride == n_t]
    return fits[0] if fits else n_t * stride


def check_hf_config(hf_config: dict | str | os.PathLike, config: MAESTConfig, source: str | None = None) -> None:
    """Raise ``CheckpointError`` naming the option to set when an AST config does not fit ``config``."""
    if not isinstance(hf_config, dict):
        source = source or f"Hugging Face directory {hf_config}"
        hf_config = read_hf_config(hf_config)
    source = source or "AST config"
    want = maest_overrides_from_hf(hf_config, source)
    problems = []
    arch = {k: want[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")}
    if any(getattr(config, k) != v for k, v in arch.items()):
        have = {k: getattr(config, k) for k in arch}
        problems.append(f"the network is {arch}, the model {have}: use an arch of that shape (maest.arch) or set those options")
    if want["n_classes"] != config.n_classes:
        problems.append(f"it predicts {want['n_classes']} labels: set n_classes={want['n_classes']} (maest.n_classes)")
    n_t = want["input_t"] // want["stride_t"]
    if n_t != config.grid_t:
        given = f"{INPUT_T_KEY}={hf_config[INPUT_T_KEY]}" if INPUT_T_KEY in hf_config else f"max_length={hf_config['max_length']} frames"
        problems.append(
            f"{given} gives {n_t} time positions, the model has {config.grid_t}: "
            f"set input_t={want['input_t']} (maest.input_t; any value in [{n_t * config.stride_t}, {n_t * config.stride_t + config.stride_t - 1}])"
        )
    if problems:
        raise CheckpointError(f"{source} does not fit this MAEST model:\n  " + "\n  ".join(problems))
    if config.distilled_type == "separated":
        _logger.warning(
            "%s is an AST model that predicts head((CLS + DIST) / 2); this MAEST model is 'separated' and predicts "
            "head(CLS) with the same weights, so its logits differ from the Hugging Face model's "
            "(build it with distilled_type='mean' to reproduce them)",
            source,
        )


# ---------------------------------------------------------------------------------------- state dicts
def maest_to_hf_state_dict(
    sd: dict[str, torch.Tensor], config: MAESTConfig, allow_separated: bool = False, max_length: int | str | None = None
) -> dict[str, torch.Tensor]:
    """MAEST state dict -> ``ASTForAudioClassification`` state dict (Hub layout, new contiguous tensors).

    The position grid has the time positions of ``max_length`` frames (as ``export_hf``; the rest:
    ``time_embedding_tail``). ``head_dist`` has no AST counterpart and is left out: a ``"mean"``
    model never uses it. A ``"separated"`` model needs ``allow_separated=True`` (module docstring).
    """
    if config.distilled_type == "separated" and not allow_separated:
        raise ValueError(
            "this MAEST model is distilled_type='separated' (teacher-student: logits = head(CLS)); "
            "ASTForAudioClassification can only compute head((CLS + DIST) / 2), so its logits would differ. "
            "Pass allow_separated=True to export it anyway (as the published discogs-maest-30s-pw-73e-ts)"
        )
    if config.distilled_type == "separated":
        _logger.warning("exporting a 'separated' MAEST model: the AST model predicts head((CLS + DIST) / 2), not head(CLS); its logits differ")
    out: dict[str, torch.Tensor] = {}
    remaining = dict(sd)
    for key, hf_key in _GLOBAL_NAMES.items():
        out[hf_key] = remaining.pop(key)
    n_t = config.patches(export_max_length(config, max_length))[1]
    out[POS_KEY] = merge_position_embeddings(
        remaining.pop("new_pos_embed"), remaining.pop("freq_new_pos_embed"), remaining.pop("time_new_pos_embed")[..., :n_t]
    )
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"{PREFIX}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = remaining.pop(f"{src}attn.qkv.{kind}", None)
            if qkv is not None:
                for name, part in zip(_QKV, qkv.chunk(3, dim=0)):
                    out[f"{dst}attention.attention.{name}.{kind}"] = part
            for ours, theirs in _BLOCK_NAMES.items():
                out[f"{dst}{theirs}.{kind}"] = remaining.pop(f"{src}{ours}.{kind}")
    for key in ("head_dist.weight", "head_dist.bias"):
        remaining.pop(key, None)
    if remaining:
        raise ValueError(f"MAEST state dict has keys with no AST counterpart: {sorted(remaining)[:10]}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def time_embedding_tail(time_embed: torch.Tensor, n_t: int) -> torch.Tensor | None:
    """The time positions after the first ``n_t`` ``(1, D, 1, T - n_t)``, minus the mean of the first ``n_t``; None if none.

    Importing splits the AST grid into frequency + time with the time part's mean moved to the
    frequency part (``split_position_embeddings``); stored relative to that mean, the tail appends
    to the imported time embedding exactly.
    """
    if time_embed.shape[-1] <= n_t:
        return None
    head = time_embed[..., :n_t].float()
    return (time_embed[..., n_t:].float() - head.mean(dim=-1, keepdim=True)).to(time_embed.dtype).contiguous()


def _canonical_hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub-layout names for a state dict in the Hub layout, transformers 5's module layout or a bare ``ASTModel``."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("embeddings.", "encoder.", "layers.", "layernorm.")):
            key = PREFIX + key  # an ASTModel saved without the classification wrapper
        m = re.match(re.escape(PREFIX) + r"layers\.(\d+)\.(.*)$", key)
        if m:
            i, rest = m.groups()
            for new, old in _V5_BLOCK_NAMES.items():
                if rest.startswith(new + "."):
                    rest = old + rest[len(new) :]
                    break
            key = f"{PREFIX}encoder.layer.{i}.{rest}"
        out[key] = value
    return out


def hf_to_maest_state_dict(
    sd: dict[str, torch.Tensor], hf_config: dict, source: str = "Hugging Face checkpoint", extra: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """``ASTForAudioClassification`` state dict + config -> (MAEST state dict, ``MAESTConfig`` overrides).

    ``extra``: the directory's ``maest_extra`` tensors (``export_hf``), holding the time positions
    past ``max_length`` when ``maest_input_t`` asks for more than the AST grid has.

    ``head_dist`` is set to a copy of the classifier: AST has a single head, applied to
    ``(CLS + DIST) / 2``, so the imported model is ``distilled_type="mean"``, which never uses
    ``head_dist``. Filling it keeps every MAEST load strict (a missing key stays an error) and
    gives a ``"separated"`` fine-tuning the same starting point for both heads.
    """
    overrides = maest_overrides_from_hf(hf_config, source)
    remaining = _canonical_hf_keys(sd)
    if "classifier.dense.weight" not in remaining:
        raise CheckpointError(
            f"{source} has no classifier ('classifier.dense.weight'): it is an ASTModel, MAEST loads "
            f"{AST_ARCHITECTURE} checkpoints"
        )
    out: dict[str, torch.Tensor] = {}
    missing = []

    def take(hf_key: str):
        if hf_key not in remaining:
            missing.append(hf_key)
            return None
        return remaining.pop(hf_key)

    for key, hf_key in _GLOBAL_NAMES.items():
        out[key] = take(hf_key)
    pos = take(POS_KEY)
    for i in range(overrides["depth"]):
        src, dst = f"{PREFIX}encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            if kind == "weight" or overrides["qkv_bias"]:
                parts = [take(f"{src}attention.attention.{name}.{kind}") for name in _QKV]
                if all(p is not None for p in parts):
                    out[f"{dst}attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            for ours, theirs in _BLOCK_NAMES.items():
                out[f"{dst}{ours}.{kind}"] = take(f"{src}{theirs}.{kind}")
    if missing or remaining:
        lines = [f"{source} does not match its config ({overrides['depth']} layers, qkv_bias={overrides['qkv_bias']}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}")
        if remaining:
            lines.append(f"  unexpected keys ({len(remaining)}): {', '.join(sorted(remaining)[:10])}")
        raise CheckpointError("\n".join(lines))
    out["new_pos_embed"], out["freq_new_pos_embed"], out["time_new_pos_embed"] = split_position_embeddings(
        pos, _ast_grid(hf_config), source
    )
    missing_t = overrides["input_t"] // overrides["stride_t"] - out["time_new_pos_embed"].shape[-1]
    if missing_t:
        tail = (extra or {}).get(TIME_TAIL_KEY)
        if tail is None or tail.shape[-1] != missing_t or tail.shape[:3] != out["time_new_pos_embed"].shape[:3]:
            raise CheckpointError(
                f"{source}: {INPUT_T_KEY}={overrides['input_t']} needs {missing_t} time position(s) past max_length="
                f"{hf_config['max_length']}, which {EXTRA_NAMES[0]} holds as {TIME_TAIL_KEY!r} "
                f"{'(missing)' if tail is None else f'(shape {tuple(tail.shape)})'}: copy that file from the export, "
                f"or remove {INPUT_T_KEY} from config.json to import the model as a {overrides['stride_t'] * _ast_grid(hf_config)[1]}-frame one"
            )
        out["time_new_pos_embed"] = torch.cat((out["time_new_pos_embed"], tail.to(out["time_new_pos_embed"].dtype)), dim=-1)
    out["head_dist.weight"] = out["head.1.weight"].clone()
    out["head_dist.bias"] = out["head.1.bias"].clone()
    eps = hf_config.get("layer_norm_eps", LAYER_NORM_EPS)
    if abs(eps - LAYER_NORM_EPS) > 1e-9:
        _logger.warning("%s uses layer_norm_eps=%g; MAEST uses %g: outputs may differ slightly", source, eps, LAYER_NORM_EPS)
    return out, overrides


# ---------------------------------------------------------------------------------------- files
def read_hf_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory: {CONFIG_NAME} is missing "
            f"(expected {CONFIG_NAME} and one of {', '.join(WEIGHT_NAMES)}); a checkpoint is a file "
            "(.ckpt, .pt, .safetensors) or a directory written by export_hf"
        )
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_file} holds a {type(hf_config).__name__}, not a Hugging Face config (a JSON object)")
    return hf_config


def hf_labels(hf_config: dict, n_classes: int, source: str = "AST config") -> list[str] | None:
    """The label names of ``id2label`` in index order; None without names (absent, or ``LABEL_<i>``, what
    ``export_hf`` writes for a model without label names)."""
    id2label = hf_config.get("id2label")
    if not id2label:
        return None
    try:
        by_index = {int(i): str(name) for i, name in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        by_index = None
    if by_index is None or sorted(by_index) != list(range(n_classes)):
        raise CheckpointError(f"{source}: id2label must map the indices 0 to {n_classes - 1} to names, got {str(id2label)[:200]}")
    labels = [by_index[i] for i in range(n_classes)]
    return None if labels == [f"LABEL_{i}" for i in range(n_classes)] else labels


def hf_model_record(path: str | os.PathLike) -> dict | None:
    """The model record (as ``models.checkpoints.record_of`` gives it) of a directory written by ``export_hf``.

    Its ``config.json`` fixes the network (``maest_input_t``, width, depth, heads, ``n_classes``) and
    ``id2label`` names the labels, so ``get_maest(checkpoint=DIR)`` needs no arch. ``distilled_type``
    is left out: AST computes ``head((CLS + DIST) / 2)`` whatever the exported model was trained as,
    so it stays the arch's or the caller's (``"mean"`` by default). None for other AST directories
    (a Hub download has no ``maest_input_t``: its clip is a guess, so its arch must be named).
    A folder without ``config.json`` is a ``FileNotFoundError`` saying it is not a Hugging Face directory.
    """
    source = f"Hugging Face directory {path}"
    hf_config = read_hf_config(path)
    if INPUT_T_KEY not in hf_config:
        return None
    config = maest_overrides_from_hf(hf_config, source)
    del config["distilled_type"]
    return {"arch": None, "config": config, "labels": hf_labels(hf_config, config["n_classes"], source)}


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)  # a corrupt file is a CheckpointError naming it
    return read_checkpoint(path)  # weights-only: never runs code from the file


def read_hf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw (AST-layout) state dict of a Hugging Face directory, single-file or sharded."""
    path = Path(path)
    for name in WEIGHT_NAMES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(INDEX_SUFFIX):
            return _load_weights_file(file)
        weight_map = json.loads(file.read_text(encoding="utf-8"))["weight_map"]
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_load_weights_file(path / shard))
        return sd
    raise FileNotFoundError(f"no weights in Hugging Face directory {path}: expected one of {', '.join(WEIGHT_NAMES)}")


def read_hf_extra(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``maest_extra`` tensors of an exported directory (empty for other AST directories)."""
    for name in EXTRA_NAMES:
        if (Path(path) / name).is_file():
            return _load_weights_file(Path(path) / name)
    return {}


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A Hugging Face ``ASTForAudioClassification`` directory -> MAEST state dict (``read_checkpoint`` hook)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {path} does not exist")
    hf_config = read_hf_config(path)
    sd = read_hf_weights(path)
    out, _ = hf_to_maest_state_dict(sd, hf_config, source=f"Hugging Face directory {path}", extra=read_hf_extra(path))
    return out


def maest_from_hf(path: str | os.PathLike, **overrides) -> MAEST:
    """Build a MAEST model shaped by a Hugging Face directory's config and load its weights (eval mode);
    ``model.labels`` are its ``id2label`` names (None for ``LABEL_<i>``).

    ``overrides``: other ``MAESTConfig`` fields (e.g. ``s_patchout_t_interleaved``); shape fields
    that contradict the directory fail the strict load.
    """
    path = Path(path)
    source = f"Hugging Face directory {path}"
    hf_config = read_hf_config(path)
    sd, shape = hf_to_maest_state_dict(read_hf_weights(path), hf_config, source=source, extra=read_hf_extra(path))
    model = MAEST(MAESTConfig(**{**shape, **overrides}))
    load_state_dict_strict(model, sd, source=source)
    model.labels = hf_labels(hf_config, model.config.n_classes, source)
    return model.eval()


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _write_config(out_dir: Path, config: dict) -> None:
    transformers = _transformers()
    if transformers is not None:
        # ASTConfig validates the fields and adds the ones of this transformers version.
        fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        hf_config = transformers.ASTConfig(**fields)
        hf_config.architectures = list(config["architectures"])
        hf_config.save_pretrained(out_dir)
        return
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(out_dir: Path, sd: dict[str, torch.Tensor], names: tuple[str, str] = (SAFETENSORS_NAME, TORCH_NAME)) -> Path:
    try:
        from safetensors.torch import save_file
    except ImportError:
        _logger.warning("safetensors is not installed: writing %s instead of %s", names[1], names[0])
        target = out_dir / names[1]
        torch.save(sd, target)
        return target
    target = out_dir / names[0]
    save_file(sd, str(target), metadata={"format": "pt"})
    return target


# export_hf stages in "<parent>/.<out_dir name>.<host>.<pid>.<8 random chars>.tmp/" (tempfile.mkdtemp's names);
# an export killed before its cleanup leaves one, which a later export into the same parent removes.
_STAGE_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp$")
# Before the host and pid were in the name: ".<out_dir name>.<8 random chars>.tmp".
_LEGACY_STAGE_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
# A staging folder no live export on this host owns, or untouched this long, is stale. An export
# writes its folder in seconds to minutes; another host's (a shared file system) is judged by age alone.
STALE_STAGE_AGE_S = 24 * 3600


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: count it as alive (judged by age)
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _newest_mtime(folder: Path) -> float:
    times = [folder.lstat().st_mtime]
    times += [entry.lstat().st_mtime for entry in folder.iterdir()]
    return max(times)


def remove_stale_stages(parent: Path, out_name: str) -> list[Path]:
    """Remove the staging folders earlier exports into ``parent`` left when killed; returns them.

    Only folders named as ``export_hf`` names them and holding nothing but files: one of this host
    whose process is gone, or one untouched for ``STALE_STAGE_AGE_S`` (another host's, or one of an
    older version of this code, named without host and pid, for an export to ``out_name``). A folder
    another export is writing now is left alone.
    """
    removed = []
    host, now = _host_tag(), time.time()
    for folder in parent.glob(".*.tmp"):
        match, legacy = _STAGE_NAME.match(folder.name), _LEGACY_STAGE_NAME.match(folder.name)
        if match is None and (legacy is None or legacy["name"] != out_name):
            continue
        try:
            if folder.is_symlink() or not folder.is_dir() or any(not e.is_file() or e.is_symlink() for e in folder.iterdir()):
                continue
            dead = match is not None and match["host"] == host and not _pid_alive(int(match["pid"]))
            if not dead and now - _newest_mtime(folder) < STALE_STAGE_AGE_S:
                continue
        except OSError:  # removed meanwhile by its own export or another cleaner
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            _logger.info("removed %s, the staging folder of an earlier export that did not finish", folder)
            removed.append(folder)
    return removed


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def export_hf(
    model: MAEST,
    out_dir: str | os.PathLike,
    labels: list[str] | None = None,
    feature_extractor: bool = True,
    allow_separated: bool = False,
    max_length: int | str | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face ``ASTForAudioClassification`` directory; returns ``out_dir``.

    ``labels``: the output names (``id2label``); None: ``model.labels`` (what ``get_maest`` read from the
    checkpoint or the released model), else ``LABEL_<i>``. ``max_length``: the frames AST (and the feature extractor) takes; None: the model's own clip
    (``model.config.input_t``; pass the clip the model is used with if it is another), ``"hub"``:
    the published models' length (``max_frames``), or a number of frames (module docstring).
    Files: ``config.json`` (``max_length``, ``maest_input_t``, labels as ``id2label``),
    ``model.safetensors`` (``pytorch_model.bin`` without safetensors), ``maest_extra.safetensors``
    when the time embedding is longer than the AST grid and, with ``feature_extractor``, the
    ``MAESTFeatureExtractor``'s ``preprocessor_config.json`` plus its code, so
    ``AutoFeatureExtractor.from_pretrained(out_dir, trust_remote_code=True)`` works.
    ``ASTForAudioClassification.from_pretrained(out_dir)`` then gives this model's logits for
    ``input_values = mel.transpose(1, 2)`` of exactly ``max_length`` frames. Inference patchout
    settings are not exported (AST has none; a warning says so): the directory computes every patch.
    Staging folders that earlier exports into the same parent left when killed are removed
    (``remove_stale_stages``).
    """
    config = model.config
    patchout = config.inference_patchout()
    if patchout:
        _logger.warning(
            "export_hf: inference patchout (%s) is not exported (AST has none): the exported model computes every "
            "patch, and its logits are those of this model after model.set_inference_patchout()",
            ", ".join(f"{k}={v}" for k, v in patchout.items()),
        )
    max_length = export_max_length(config, max_length)
    if labels is None:
        labels = getattr(model, "labels", None)  # get_maest's: the checkpoint's or the released model's names
    hf_config = hf_config_dict(config, labels, max_length)
    sd = maest_to_hf_state_dict(model.state_dict(), config, allow_separated=allow_separated, max_length=max_length)
    tail = time_embedding_tail(model.time_new_pos_embed.detach(), config.patches(max_length)[1])
    out_dir = Path(out_dir)
    if out_dir.is_file():
        raise NotADirectoryError(f"export_hf writes a directory; {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Staged in a sibling folder, then each file renamed into place: a killed export leaves every
    # file of the folder whole (the previous export's or this one's), never half written.
    remove_stale_stages(out_dir.parent, out_dir.name)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_host_tag()}.{os.getpid()}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_config(stage, hf_config)
        weights = _write_weights(stage, sd)
        if tail is not None:
            _write_weights(stage, {TIME_TAIL_KEY: tail}, names=EXTRA_NAMES)
        if feature_extractor:
            from ..feature_extraction import MAESTFeatureExtractor

            MAESTFeatureExtractor(max_length=max_length).save_pretrained(stage)
        for name in EXTRA_NAMES:  # a re-export into the folder must not keep a stale tail
            if not (stage / name).exists():
                (out_dir / name).unlink(missing_ok=True)
        mode = _file_mode()
        for path in sorted(stage.iterdir()):
            os.chmod(path, mode)  # safetensors writes 0600 files; every file gets the umask's mode, as open() gives
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _logger.info("exported %s (AST, max_length=%d frames) to %s", type(model).__name__, max_length, out_dir / weights.name)
    return out_dir
