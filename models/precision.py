"""Inference precision: one call turns a MAEST model into its fastest accurate inference form.

    from models import get_maest
    from models.precision import prepare_for_inference

    model = prepare_for_inference(get_maest("discogs-maest-30s-pw-129e", checkpoint="x.ckpt"), "bf16")
    logits = model(mel).float()             # mel: fp32 (B, 96, T), cast inside
    emb = model.embeddings(mel, block=6).float()

bf16 runs the whole network in bf16 weights (no autocast: autocast casts every weight on every
call); the kernels that need it accumulate in fp32 (LayerNorm statistics, the softmax of
``scaled_dot_product_attention``, matmul sums), so the error against fp32 stays small (see
README "Performance" for the measured logits and embedding errors). fp16 is for CUDA only: CPUs have no
fast fp16 matmul.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import heap
from .maest import MAEST

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a ``PRECISIONS`` name; an unknown name is an error that lists them."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return DTYPES[precision]


def check_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of ``precision`` if ``device`` runs it, else an error saying what to use instead."""
    dtype = precision_dtype(precision)
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision 'fp16' needs a CUDA device; this model is on {device.type}: use 'bf16' (fast on CPUs "
            "with AVX-512 BF16/AMX) or 'fp32'"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support: use precision 'fp16' or 'fp32'")
    return dtype


def prepare_for_inference(model: MAEST, precision: str = "bf16", compile: bool = False, reuse_freed_memory: bool = True) -> MAEST:
    """``model`` in eval mode, its weights in ``precision``, optionally compiled; returns the same object.

    precision: ``"fp32"``, ``"bf16"`` (default; CPU or a GPU with bf16) or ``"fp16"`` (CUDA only;
        a clear error elsewhere). The weights are cast IN PLACE (``model.to(dtype)``): keep a
        ``copy.deepcopy`` if you still need the fp32 model.
    compile: ``torch.compile`` each transformer block in place (``nn.Module.compile``), so the
        state-dict keys, ``model.embeddings``, ``model.hidden_states``, ``model.timestamp_embeddings``,
        ``model.column_times_ms``, ``model.block_index(es)``, ``.config``, ``.n_classes`` and
        ``.embed_dim`` all stay as they are. The first call of each new input shape compiles (tens of
        seconds on CPU); it pays for long extraction runs of one clip length, not for a few clips.
    reuse_freed_memory: on CPU, ``models.heap.reuse_freed_memory()``: the large tensors a forward
        frees stay in glibc's heap for the next one instead of being unmapped and faulted in again
        (the fp32 30 s forward 10-20 % faster). A setting of the whole process; False leaves it alone.

    The returned model takes fp32 (or any float) mel input and casts it to the weights' dtype;
    its outputs are in that dtype (call ``.float()`` before saving or comparing). NaN/inf input is
    still refused with a clear error (``MAESTConfig.check_finite``).
    """
    if not isinstance(model, MAEST):
        raise TypeError(f"prepare_for_inference expects a models.MAEST, got {type(model).__name__}")
    device = next(model.parameters()).device
    dtype = check_precision(precision, device)
    model.eval()
    model.requires_grad_(False)
    model.to(dtype)
    if reuse_freed_memory and device.type == "cpu":
        heap.reuse_freed_memory()
    if compile:
        for block in model.blocks:
            block.compile(dynamic=False)
    _logger.info("model prepared for inference: %s on %s%s", precision, device, ", compiled blocks" if compile else "")
    return model


# ---------------------------------------------------------------------- speed accounting
def forward_flops(config, n_frames: int, batch: int = 1, n_tokens: int | None = None) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward of ``batch`` clips of ``n_frames`` (``config``: a MAESTConfig).

    Counts the matmuls (patch embedding, qkv, attention scores and values, projection, MLP, head);
    LayerNorm, softmax and GELU are a few per cent and left out, as is usual. ``n_tokens``: the
    sequence length after patchout (default: the full grid plus CLS and DIST).
    """
    n_f, n_t = config.patches(n_frames)
    n = n_tokens if n_tokens is not None else n_f * n_t + 2
    d, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    per_block = 2 * n * d * (3 * d + d + 2 * hidden) + 4 * n * n * d
    patch = 2 * n_f * n_t * d * config.patch_size**2
    return float(batch * (config.depth * per_block + patch + 2 * d * config.n_classes))


def training_step_flops(config, n_frames: int, batch: int) -> float:
    """FLOPs of forward + backward with the config's training patchout: 3x the forward of the kept tokens."""
    n_f, n_t = config.patches(n_frames)
    n_tokens = (n_f - config.s_patchout_f) * (n_t - config.s_patchout_t) - config.u_patchout + 2
    return 3.0 * forward_flops(config, n_frames, batch, n_tokens=n_tokens)


def matmul_gflops(precision: str = "fp32", size: int = 4096, repeats: int = 3, device: str = "cpu") -> float:
    """This machine's matmul ceiling: the best GFLOP/s of ``repeats`` square ``size`` ``torch.matmul``s."""
    import time

    dtype = precision_dtype(precision)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def time_forward(model: nn.Module, x: torch.Tensor, iterations: int = 3) -> float:
    """Seconds of ``model(x)`` without gradients: the fastest of ``iterations`` after one warm-up call."""
    import time

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.no_grad():
        for i in range(iterations + 1):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i:  # the first call selects kernels (and compiles, with compile=True)
                best = min(best, time.perf_counter() - start)
    return best


__all__ = ["PRECISIONS", "DTYPES", "precision_dtype", "check_precision", "prepare_for_inference", "forward_flops", "training_step_flops", "matmul_gflops", "time_forward"]
