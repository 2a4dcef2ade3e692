"""Exchange formats: ONNX (``export_onnx``) and Hugging Face AST directories (``export_hf``).

The ONNX graph is the eval-mode network with a dynamic batch axis and a fixed input length:

- ``with_mel=False``: input ``mel`` ``(batch, 96, n_frames)``, normalised as ``MAEST.forward`` expects;
- ``with_mel=True``: input ``audio`` ``(batch, (n_frames - 1) * 256)`` at 16 kHz, through the same
  mel front-end (``models.mel.MelSpectrogram(normalized=True)``, an ONNX ``STFT``);

and output ``logits`` ``(batch, n_classes)``, or ``embeddings`` ``(batch, 3, D)`` (CLS, DIST, mean
of the patch tokens after ``block``, as ``MAEST.embeddings``) when ``block`` is given.

It uses torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, needs onnxscript); fused
attention exports as is. The exporter's native opset is 18: lower opsets go through onnx's version
converter, which converts the mel-input logits graph to 17 but not the front-end (``Pad``) nor the
embeddings output; such a request fails instead of silently writing another opset. Weights are stored inside the file (models under 2 GB;
ViT-B is about 350 MB).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from helpers.files import atomic_path
from models.hf import export_hf
from models.maest import MAEST
from models.mel import HOP_LENGTH, MelSpectrogram

__all__ = ["export_onnx", "export_hf", "OnnxExportWrapper"]

_logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18


class OnnxExportWrapper(nn.Module):
    """The exported function: optional mel front-end, then logits or the embeddings of ``block``."""

    def __init__(self, model: MAEST, with_mel: bool = False, block: int | None = None):
        super().__init__()
        self.model = model
        self.mel = MelSpectrogram(normalized=True) if with_mel else None
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mel is not None:
            # (B, samples) -> (B, 96, frames); the front-end computes in fp32, the network in its own dtype
            x = self.mel(x).to(self.model.cls_token.dtype)
        if self.block is None:
            return self.model(x)  # (B, n_classes)
        return self.model.embeddings(x, block=self.block)  # (B, 3, D)


def export_onnx(
    model: MAEST,
    path: str | os.PathLike,
    with_mel: bool = False,
    block: int | None = None,
    n_frames: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (written complete or not at all); returns the path.

    ``n_frames``: input length in mel frames, default the longest the model takes
    (``model.config.max_frames``, e.g. 1876 for 30 s); with ``with_mel`` the audio input has
    ``(n_frames - 1) * 256`` samples. ``block``: export the ``(B, 3, D)`` embeddings of this block
    (0-based) instead of the logits. ``model`` itself is not changed.
    """
    cfg = model.config
    n_frames = cfg.max_frames if n_frames is None else int(n_frames)
    if not cfg.patch_size <= n_frames <= cfg.max_frames:
        raise ValueError(f"n_frames must be in [{cfg.patch_size}, {cfg.max_frames}] for this model (input_t={cfg.input_t}), got {n_frames}")
    if block is not None:
        model.block_index(block)  # the model's own check and message
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it; fail here with an install hint
    except ImportError as e:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install -r requirements-extras.txt") from e

    # A private eval-mode copy: the finiteness check is a data-dependent branch the exporter cannot trace.
    net = copy.deepcopy(model).eval()
    net.config = net.config.replace(check_finite=False)
    wrapper = OnnxExportWrapper(net, with_mel=with_mel, block=block).eval()
    device, dtype = net.cls_token.device, net.cls_token.dtype
    # Batch 2 in the example: torch.export specialises sizes 0 and 1, the batch axis must stay free.
    if with_mel:
        example, input_name = torch.zeros(2, (n_frames - 1) * HOP_LENGTH, device=device), "audio"
        wrapper.mel.to(device)
    else:
        example, input_name = torch.zeros(2, cfg.input_f, n_frames, device=device, dtype=dtype), "mel"
    output_name = "logits" if block is None else "embeddings"

    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            verbose=False,
        )
    written = program.model.opset_imports.get("", None)
    if written != opset:
        raise ValueError(
            f"the ONNX exporter could not convert this graph to opset {opset} (it stays at {written}); "
            f"use opset={written}{' or with_mel=False' if with_mel else ''}"
        )
    path = Path(path)
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)
    _logger.info("exported %s -> %s to %s (opset %d)", input_name, output_name, path, opset)
    return path
