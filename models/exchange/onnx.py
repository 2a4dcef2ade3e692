"""ONNX export (``export_onnx``); Hugging Face AST directories are ``models.exchange.hf``.

The ONNX graph is the eval-mode network with dynamic batch and time axes:

- ``with_mel=False``: input ``mel`` ``(batch, 96, frames)``, normalised as ``MAEST.forward`` expects,
  any ``frames`` from one patch (16) to the longest the time embedding covers
  (``MAESTConfig.max_input_frames``: 635 for 10 s models); output ``logits`` ``(batch, n_classes)``, or
  ``embeddings`` ``(batch, 3, D)`` (CLS, DIST, mean of the patch tokens after ``block``, as
  ``MAEST.embeddings``) when ``block`` is given.
- ``with_mel=True``: input ``audio`` ``(batch, samples)`` at 16 kHz, any length (one track per row;
  tracks of different lengths go one at a time: padding them into one batch would change them).
  The graph does what ``models.inference.track_probabilities`` does: the mel front-end
  (``models.mel.MelSpectrogram``, an ONNX ``STFT``), clips of ``clip_frames`` cut as
  ``split_into_clips`` (a mel shorter than a clip zero-padded centred, ``pad_centre``; longer ones
  cut every ``hop_frames`` with the last clip aligned to the end, no frame dropped), normalised.
  Outputs: ``logits`` ``(batch, n_clips, n_classes)`` of every clip (what ``extract_logits``
  writes) and ``probabilities`` ``(batch, n_classes)``, the mean sigmoid over the clips (what
  ``predict`` reports); with ``block``, ``embeddings`` ``(batch, n_clips, 3, D)``.

It uses torch's dynamo exporter (``torch.onnx.export(dynamo=True)``, needs onnxscript); fused
attention exports as is. The exporter's native opset is 18: lower opsets go through onnx's version
converter, which converts the mel-input logits graph to 17 but not the front-end (``Pad``) nor the
embeddings output; such a request fails instead of silently writing another opset. Weights are stored inside the file (models under 2 GB;
ViT-B is about 350 MB). A logits graph of a model with label names (``model.labels``) carries them in
the file's metadata: ``metadata_props`` key ``"labels"``, a JSON list in output order
(onnxruntime: ``session.get_modelmeta().custom_metadata_map["labels"]``).

Inference patchout (``MAEST.set_inference_patchout``) is refused: the exporter cannot trace its
row/column selection, so the model must be exported with every patch (as ``export_hf`` writes it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_path
from ..maest import MAEST
from ..mel import HOP_LENGTH, MelSpectrogram, normalize

__all__ = ["export_onnx", "OnnxExportWrapper"]

_logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
LABELS_KEY = "labels"  # metadata_props: the output names of a logits graph, as a JSON list
MIN_FRAMES_KEY, MAX_FRAMES_KEY = "min_frames", "max_frames"  # metadata_props of a mel graph: the frames it takes


@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.WARNING):
    """Raise the named loggers to ``level`` for the block (a run logging INFO would print each of their steps)."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(max(level, logger.getEffectiveLevel()))
        yield
    finally:
        for logger, old in zip(loggers, saved):
            logger.setLevel(old)


def _name_derived_axes(model) -> None:
    """Name "clips" the output axes the exporter named by a size formula (the audio graph's clip count).

    torch.export names a derived size by its formula (``((samples//256) + Max(0, 624 - ...))//625 + 1``
    for the number of clips), which onnxruntime's ``get_outputs()`` and viewers show as the axis name.
    Only names change; the graph computes the same. ``model`` is the exporter's ``onnx_ir`` model.
    """
    for value in model.graph.outputs:
        if value.shape is None:
            continue
        dims = list(value.shape)
        renamed = [
            "clips" if type(d).__name__ == "SymbolicDim" and d.value is not None and not d.value.isidentifier() else d
            for d in dims
        ]
        if renamed != dims:
            value.shape = type(value.shape)(renamed)


class OnnxExportWrapper(nn.Module):
    """The exported function: mel -> logits or block embeddings, or audio -> clips -> the same per clip.

    ``clip_frames``/``hop_frames`` only matter with ``with_mel`` (module docstring).
    """

    def __init__(self, model: MAEST, with_mel: bool = False, block: int | None = None, clip_frames: int | None = None, hop_frames: int | None = None):
        super().__init__()
        self.model = model
        self.mel = MelSpectrogram() if with_mel else None  # compressed; normalised after the clips are cut, as track_probabilities
        self.block = block
        self.clip_frames = clip_frames or model.config.input_t
        self.hop_frames = hop_frames or self.clip_frames

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return self.model(x)  # (B, n_classes)
        return self.model.embeddings(x, block=self.block)  # (B, 3, D)

    def forward(self, x: torch.Tensor):
        if self.mel is None:
            return self._net(x)
        mel = self.mel(x)  # (B, F, T) compressed; the front-end computes in fp32
        B, n_mels, T = mel.shape
        clip, hop = self.clip_frames, self.hop_frames
        # models.inference.pad_centre without a branch on T (the exporter traces one graph for every length).
        pad = torch.sym_max(clip - T, 0)
        mel = F.pad(mel, (pad // 2, pad - pad // 2))
        T = mel.shape[-1]
        # models.inference.clip_starts: every hop, the last one aligned to the end.
        n_clips = (T - clip + hop - 1) // hop + 1
        starts = torch.clamp(torch.arange(n_clips, device=mel.device) * hop, max=T - clip)
        index = starts[:, None] + torch.arange(clip, device=mel.device)  # (n_clips, clip)
        clips = mel[:, :, index].permute(0, 2, 1, 3).reshape(B * n_clips, n_mels, clip)
        out = self._net(normalize(clips).to(self.model.cls_token.dtype))
        out = out.reshape(B, n_clips, *out.shape[1:])  # (B, n_clips, n_classes) or (B, n_clips, 3, D)
        if self.block is not None:
            return out
        return out, torch.sigmoid(out.float()).mean(dim=1)


def export_onnx(
    model: MAEST,
    path: str | os.PathLike,
    with_mel: bool = False,
    block: int | None = None,
    clip_frames: int | None = None,
    hop_frames: int | None = None,
    opset: int = DEFAULT_OPSET,
    labels: list[str] | None = None,
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (written complete or not at all); returns the path.

    Inputs and outputs: module docstring. ``clip_frames`` (``with_mel`` only): the clips the graph
    cuts, default the model's own (``model.config.input_t``: 625 for 10 s); ``hop_frames``: their
    hop, default one clip (``predict.hop=half``: ``clip_frames // 2``). ``block``: export the
    embeddings of this block (0-based) instead of the logits. ``labels``: the output names stored in
    the metadata of a logits graph; None: ``model.labels`` (none stored when that is None too).
    A model with inference patchout is an error saying how to clear it. ``model`` itself is not changed.
    """
    cfg = model.config
    patchout = cfg.inference_patchout()
    if patchout:
        settings = ", ".join(f"{k}={v}" for k, v in patchout.items())
        raise ValueError(
            f"export_onnx cannot export inference patchout ({settings}): the exporter cannot trace its row/column "
            "selection. Clear it before exporting with model.set_inference_patchout() (config: "
            f"{' '.join(f'maest.{k}={[] if isinstance(v, tuple) else 0}' for k, v in patchout.items())}); the file then "
            "computes every patch"
        )
    longest = cfg.max_input_frames
    if not with_mel and (clip_frames is not None or hop_frames is not None):
        raise ValueError("clip_frames and hop_frames set the clips of the audio graph: use them with with_mel=True")
    clip_frames = cfg.input_t if clip_frames is None else clip_frames
    if isinstance(clip_frames, bool) or not isinstance(clip_frames, int) or not cfg.patch_size <= clip_frames <= longest:
        raise ValueError(f"clip_frames must be in [{cfg.patch_size}, {longest}] for this model (input_t={cfg.input_t}), got {clip_frames!r}")
    hop_frames = clip_frames if hop_frames is None else hop_frames
    if isinstance(hop_frames, bool) or not isinstance(hop_frames, int) or not 1 <= hop_frames <= clip_frames:
        raise ValueError(f"hop_frames must be in [1, clip_frames={clip_frames}] (no frame between clips dropped), got {hop_frames!r}")
    if block is not None:
        model.block_index(block)  # the model's own check and message
    if labels is None:
        labels = getattr(model, "labels", None)  # get_maest's: the checkpoint's or the released model's names
    if labels is not None:
        labels = [str(name) for name in labels]
        if len(labels) != cfg.n_classes:
            raise ValueError(f"{len(labels)} labels given for a model with n_classes={cfg.n_classes}")
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it; fail here with an install hint
    except ImportError as e:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install -r requirements-extras.txt") from e

    # A private eval-mode copy: the finiteness check is a data-dependent branch the exporter cannot trace.
    net = copy.deepcopy(model).eval()
    net.config = net.config.replace(check_finite=False)
    wrapper = OnnxExportWrapper(net, with_mel=with_mel, block=block, clip_frames=clip_frames, hop_frames=hop_frames).eval()
    device, dtype = net.cls_token.device, net.cls_token.dtype
    # Batch 2 and lengths away from the bounds in the examples: torch.export specialises sizes 0 and 1
    # and values it sees at a bound; both axes must stay free.
    batch = torch.export.Dim("batch")
    if with_mel:
        wrapper.mel.to(device)
        example = torch.zeros(2, (clip_frames + hop_frames) * HOP_LENGTH + 100, device=device)
        input_name, axes = "audio", {0: batch, 1: torch.export.Dim("samples", min=2)}
        output_names = ["logits", "probabilities"] if block is None else ["embeddings"]
    else:
        example = torch.zeros(2, cfg.input_f, (cfg.patch_size + longest) // 2, device=device, dtype=dtype)
        input_name, axes = "mel", {0: batch, 2: torch.export.Dim("frames", min=cfg.patch_size, max=longest)}
        output_names = ["logits"] if block is None else ["embeddings"]

    with torch.no_grad(), _quiet_loggers("onnx_ir", "onnxscript"):  # hundreds of INFO lines of their passes per export
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[input_name],
            output_names=output_names,
            dynamic_shapes=(axes,),
            opset_version=opset,
            verbose=False,
        )
    written = program.model.opset_imports.get("", None)
    if written != opset:
        raise ValueError(
            f"the ONNX exporter could not convert this graph to opset {opset} (it stays at {written}); "
            f"use opset={written}{' or with_mel=False' if with_mel else ''}"
        )
    _name_derived_axes(program.model)
    if not with_mel:  # onnxruntime's error past the longest input is a broadcast of two sizes: the bounds are stated here
        program.model.metadata_props[MIN_FRAMES_KEY] = str(cfg.patch_size)
        program.model.metadata_props[MAX_FRAMES_KEY] = str(longest)
    if labels is not None and block is None:  # an embeddings graph has no class outputs to name
        program.model.metadata_props[LABELS_KEY] = json.dumps(labels, ensure_ascii=False)
    path = Path(path)
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)
    _logger.info("exported %s -> %s to %s (opset %d)", input_name, ", ".join(output_names), path, opset)
    return path
