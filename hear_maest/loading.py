"""Building a MAEST network from any checkpoint file, its architecture recognised from the file.

- this project's checkpoints record their model (SPEC §5.6): nothing to name;
- upstream's Lightning checkpoints and bare state dicts record nothing: the architecture is
  recognised from the weights' shapes (width, depth, frequency and time positions; the number
  of classes from the head) among the registry's models; the released models that share shapes
  differ only in what the head predicts from CLS and DIST (``distilled_type``), never in the
  embeddings, so the first of them is taken. Shapes that fit no registry model need ``arch=``;
- Hugging Face ``ASTForAudioClassification`` directories: shaped by their ``config.json``.

The SWA weights of a Lightning checkpoint are taken when the file has them, else the plain ones
(``checkpoint_swa_weights=True``/``False`` insists on one).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from models.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, record_of, select_state_dict
from models.maest import MAEST, MAESTConfig
from models.registry import REGISTRY, config_from_record, get_maest, list_models

_logger = logging.getLogger(__name__)

# The fields that fix the weights' shapes, besides n_classes (read from the head).
_SHAPE_FIELDS = ("embed_dim", "depth", "mlp_ratio", "qkv_bias", "patch_size", "grid_f", "grid_t")


def has_swa_weights(obj) -> bool:
    """Whether a read checkpoint is a Lightning checkpoint with SWA weights (``net_swa.`` keys)."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("net_swa.") for k in sd)


def _shapes(state_dict: dict[str, torch.Tensor], source: str) -> dict:
    need = ("cls_token", "freq_new_pos_embed", "time_new_pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "head.1.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise CheckpointError(f"{source} is not a MAEST state dict: it lacks {', '.join(missing)}")
    d = state_dict["cls_token"].shape[-1]
    return {
        "embed_dim": d,
        "depth": len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / d,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "patch_size": state_dict["patch_embed.proj.weight"].shape[-1],
        "grid_f": state_dict["freq_new_pos_embed"].shape[2],
        "grid_t": state_dict["time_new_pos_embed"].shape[-1],
        "n_classes": state_dict["head.1.weight"].shape[0],
    }


def recognise_arch(state_dict: dict[str, torch.Tensor], source: str = "checkpoint", overrides: dict | None = None) -> tuple[str, dict]:
    """The registry model whose shapes ``state_dict`` has, and the overrides it needs (``n_classes``).

    Released models come first, in the registry's order; ``overrides`` (``MAESTConfig`` fields, e.g.
    ``input_t``) apply to each candidate. Shapes that fit no registry model are an error naming them
    and the option to set.
    """
    found = _shapes(state_dict, source)
    fields = set(MAESTConfig.__dataclass_fields__)
    given = {k: v for k, v in (overrides or {}).items() if k in fields and v is not None}  # config_from_record reports the rest
    released = [spec for spec in REGISTRY.values() if spec.labels_file is not None]
    for spec in released + [spec for spec in REGISTRY.values() if spec.labels_file is None]:
        name, config = spec.name, MAESTConfig(**{**spec.config, **given})
        if all(getattr(config, field) == found[field] for field in _SHAPE_FIELDS):
            overrides = {} if config.n_classes == found["n_classes"] else {"n_classes": found["n_classes"]}
            _logger.info("%s records no architecture; recognised from its shapes as %s%s (pass arch= to choose another)",
                         source, name, f" with n_classes={found['n_classes']}" if overrides else "")
            return name, overrides
    held = ", ".join(f"{k}={v}" for k, v in found.items())
    raise CheckpointError(
        f"{source} records no architecture and its shapes ({held}) fit no registry model: name it, e.g. "
        f"load_model(path, arch='maest-tiny', input_t=..., n_classes=...) (arch: a registry name, with any "
        f"MAESTConfig field that differs; input_t in [{found['grid_t'] * 10}, {found['grid_t'] * 10 + 9}] for "
        f"{found['grid_t']} time positions); known: {', '.join(list_models())}"
    )


def load_maest(
    path: str | os.PathLike,
    arch: str | None = None,
    checkpoint_swa_weights: bool | None = None,
    trust_checkpoint: bool = False,
    **overrides,
) -> MAEST:
    """A MAEST network (eval mode) from a checkpoint file or a Hugging Face directory; see the module docstring.

    ``arch``: a registry name, needed only when the file neither records its model nor has the
    shapes of a registry model. ``overrides``: ``MAESTConfig`` fields (``input_t=``, ``n_classes=``, ...).
    """
    path = Path(path)
    if path.is_dir():  # Hugging Face directory: its config.json shapes the model
        if arch is None:
            from models.exchange.hf import maest_from_hf

            return maest_from_hf(path, **overrides)
        return get_maest(arch, checkpoint=path, **overrides)
    obj = read_checkpoint(path, trust_checkpoint)  # read once: record, shapes and weights
    source = f"checkpoint {path}"
    use_swa = has_swa_weights(obj) if checkpoint_swa_weights is None else checkpoint_swa_weights
    record = record_of(obj, source)
    if record is None and arch is None:
        arch, shape_overrides = recognise_arch(select_state_dict(obj, use_swa, source), source, overrides)
        overrides = {**shape_overrides, **overrides}
    arch, config = config_from_record(arch, record, overrides, source)
    model = MAEST(config)
    load_checkpoint(model, path, use_swa=use_swa, trust_checkpoint=trust_checkpoint, obj=obj)
    return model.eval()
