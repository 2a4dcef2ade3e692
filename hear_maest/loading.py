"""Building a MAEST network from any checkpoint file, its architecture recognised from the file.

- this project's checkpoints record their model (SPEC §5.6): nothing to name;
- upstream's Lightning checkpoints and bare state dicts record nothing: the architecture is
  recognised from the weights' shapes (width, depth, frequency and time positions; the number
  of classes from the head) among the registry's models; the released models that share shapes
  differ only in what the head predicts from CLS and DIST (``distilled_type``), never in the
  embeddings, so the first of them is taken (one with the file's number of classes first).
  Shapes that fit no registry model need ``arch=``;
- Hugging Face ``ASTForAudioClassification`` directories: shaped by their ``config.json``.

The SWA weights of a Lightning checkpoint are taken when the file has them, else the plain ones
(``checkpoint_swa_weights=True``/``False`` insists on one: True on a file without SWA weights, a
bare state dict included, is an error naming the file). The recognition is
``models.registry.recognise_arch``, re-exported here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


from models.checkpoints import CheckpointError, load_checkpoint, read_checkpoint, record_of, select_state_dict, state_dict_shapes
from models.maest import MAEST, MAESTConfig
from models.registry import check_network_shapes, config_from_record, get_maest, get_spec, recognise_arch

_logger = logging.getLogger(__name__)

__all__ = ["has_swa_weights", "load_maest", "recognise_arch"]  # recognise_arch: models.registry's, re-exported


def has_swa_weights(obj) -> bool:
    """Whether a read checkpoint is a Lightning checkpoint with SWA weights (``net_swa.`` keys)."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("net_swa.") for k in sd)


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
    if checkpoint_swa_weights and not has_swa_weights(obj):
        raise CheckpointError(
            f"{source} has no SWA weights (no 'net_swa.' keys: {'a Lightning checkpoint without them' if _is_lightning(obj) else 'a bare state dict'}), "
            "but checkpoint_swa_weights=True insists on them: load the weights it has with checkpoint_swa_weights=None "
            "(the default) or False"
        )
    use_swa = has_swa_weights(obj) if checkpoint_swa_weights is None else checkpoint_swa_weights
    record = record_of(obj, source)
    sd = select_state_dict(obj, use_swa, source)
    if record is None and arch is None:
        arch, shape_overrides = recognise_arch(sd, source, overrides)
        overrides = {**shape_overrides, **overrides}
    elif record is None and "n_classes" not in overrides:  # a named arch: the number of classes is the head's
        heads = state_dict_shapes(sd).get("n_classes")
        if heads is not None and heads != get_spec(arch).config.get("n_classes", MAESTConfig.n_classes):
            _logger.info("%s: n_classes=%d, from its head", source, heads)
            overrides = {**overrides, "n_classes": heads}
    arch, config = config_from_record(arch, record, overrides, source)
    check_network_shapes(arch, config, sd, source)  # a named arch of another width or depth: names the file's
    model = MAEST(config)
    load_checkpoint(model, path, use_swa=use_swa, trust_checkpoint=trust_checkpoint, obj=sd)
    return model.eval()


def _is_lightning(obj) -> bool:
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("net.") for k in sd)
