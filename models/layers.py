"""ViT building blocks (the few timm layers MAEST needs, written here so timm is not imported).

Parameter names equal timm's and PaSST's, so published state dicts load without renaming.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's fused linear (matmul + bias, + GELU or + residual in one call; the op inductor emits on CPU).
# F.linear on CPU first copies the bias into the output and then accumulates the matmul into it: an
# extra pass over every activation that, with the separate GELU and residual adds, costs about a
# fifth of a bf16 forward. The op has no autograd, so it only runs where no gradient is wanted.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# dtypes for which the fused op is faster than F.linear (measured with benchmarks/bench_speed.py: the
# bf16 forward by about a fifth; the fp32 one by about 5 %, where oneDNN's and MKL's sgemm are on a
# par and the saving is the separate bias, GELU and residual passes).
FUSED_LINEAR_DTYPES = {torch.bfloat16, torch.float32}


def use_fused_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where the oneDNN fused linear may replace ``F.linear``: CPU inference in a fused dtype.

    Not while autocast casts for us, not when a gradient is needed, not under ``torch.compile``
    (inductor fuses the plain ops itself), and not while tracing or exporting (ONNX has no such op).
    """
    return (
        _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype in FUSED_LINEAR_DTYPES
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
    )


def fused_linear(x: torch.Tensor, layer: nn.Linear, activation: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)``, then exact (erf) GELU (``activation="gelu"``) or ``+ residual``, in one oneDNN call."""
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
    if activation == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for ``_CastLinear``'s forward: on CPU in a fused dtype, oneDNN's linear with the bias in the matmul.

    The same result, bit for bit, as ``F.linear`` (whose CPU kernel first copies the bias into the
    output: a pass over every activation); no autograd is needed inside the Function.
    """
    if _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype in FUSED_LINEAR_DTYPES and weight.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class _ScratchBuffers(threading.local):
    """Per-thread reusable buffers: the low-precision weight copies of ``_CastLinear``, ``_CPUAttention``'s blocks.

    Every training step casts each weight to bf16 twice (forward, backward) and computes each
    weight gradient in bf16 before autograd makes it fp32: 3 x 2 bytes per parameter of short-lived
    tensors. Fresh, they are often fresh memory (above glibc's mmap threshold, or in heap pages that
    ``helpers.memory`` handed back), whose pages the kernel faults in and zeroes: for the ViT-B MLP
    weights that took twice as long as the copy itself. One buffer per (use, shape, dtype) is reused
    by every block instead: a few tens of MB for a ViT-B, and the same arithmetic. CPU only: CUDA's
    caching allocator already reuses its blocks.
    """

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}


_SCRATCH = _ScratchBuffers()
SCRATCH_CASTS = True  # off: fresh tensors, as before (the tests compare both)
FP32_CPU_TRAINING_LINEAR = True  # fp32 CPU training through _CastLinear; off: F.linear (the tests compare both)
UNFOLD_PATCHES = True  # PatchEmbed's CPU training path; off: the convolution (the tests compare both)


def _scratch(like: torch.Tensor, dtype: torch.dtype, use: str) -> torch.Tensor | None:
    """A reusable ``like``-shaped ``dtype`` buffer for ``use`` (None off CPU, or in ``like``'s own dtype)."""
    if not SCRATCH_CASTS or like.device.type != "cpu" or like.dtype == dtype:
        return None
    return _scratch_buffer(use, like.shape, dtype)


def _scratch_buffer(use: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable CPU buffer for ``use``, of ``shape`` and ``dtype`` (fresh when ``SCRATCH_CASTS`` is off)."""
    if not SCRATCH_CASTS:
        return torch.empty(shape, dtype=dtype)
    key = (use, tuple(shape), dtype)
    buffer = _SCRATCH.buffers.get(key)
    if buffer is None:
        buffer = _SCRATCH.buffers[key] = torch.empty(shape, dtype=dtype)
    return buffer


def _scratch_cast(weight: torch.Tensor, dtype: torch.dtype, use: str) -> torch.Tensor:
    """``weight.to(dtype)``, written into a reused buffer where ``_scratch`` gives one.

    The result is only read by the one matmul that follows it; nothing may keep it.
    """
    buffer = _scratch(weight, dtype, use)
    return weight.to(dtype) if buffer is None else buffer.copy_(weight)


class _CastLinear(torch.autograd.Function):
    """``F.linear`` in a low-precision ``dtype`` of fp32 parameters (autocast's arithmetic), saving less for backward.

    Under autocast, ``F.linear`` casts the weight, and autograd keeps that bf16 copy of every weight
    until backward: 2 bytes per parameter on top of the fp32 ones. This saves the fp32 parameter
    (already alive) and casts it again in backward. With ``gelu_input``, ``x`` is the MLP's hidden
    pre-activation and GELU runs first; its output is recomputed in backward instead of saved.
    The forward, the output and the gradients are those of autocast's ``F.linear`` (and
    ``F.gelu``): the same ops in the same dtype. With ``dtype=torch.float32`` (fp32 CPU training,
    see ``autocast_linear``) nothing is cast: what is kept is the bias inside oneDNN's matmul and
    the GELU output recomputed rather than saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, gelu_input):
        with torch.autocast(x.device.type, enabled=False):
            h = x.to(dtype)
            a = F.gelu(h) if gelu_input else h
            out = _linear(a, _scratch_cast(weight, dtype, "weight"), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(h, weight)
        ctx.dtype, ctx.gelu_input, ctx.has_bias, ctx.x_dtype = dtype, gelu_input, bias is not None, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(ctx.dtype)
            w = _scratch_cast(weight, ctx.dtype, "weight")
            a = F.gelu(h) if ctx.gelu_input else h
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = grad @ w
                if ctx.gelu_input:
                    grad_x = torch.ops.aten.gelu_backward(grad_x, h)
                grad_x = grad_x.to(ctx.x_dtype)
            flat_grad = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = torch.mm(flat_grad.t(), a.reshape(-1, a.shape[-1]), out=_scratch(weight, ctx.dtype, "grad")).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = flat_grad.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def autocast_linear(x: torch.Tensor, layer: nn.Linear, gelu_input: bool = False) -> torch.Tensor:
    """``layer(gelu(x) if gelu_input else x)``; in training through ``_CastLinear`` where it pays.

    Under autocast (any device) it saves memory; in fp32 CPU training it computes in fp32 (the cast
    is then a no-op) for oneDNN's bias inside the matmul and GELU recomputed in backward: the 10 s
    ViT-B fp32 step about 5 % faster than ``F.linear``'s (bias copied into the output first) and
    without the saved GELU outputs (166 MB), its gradients within fp32 rounding of ``F.linear``'s
    (another summation order; ``tests/test_precision.py``).
    """
    device = x.device.type
    if torch.is_grad_enabled() and layer.weight.dtype == torch.float32 and layer.weight.requires_grad and not torch.compiler.is_compiling():
        if torch.is_autocast_enabled(device):
            return _CastLinear.apply(x, layer.weight, layer.bias, torch.get_autocast_dtype(device), gelu_input)
        if FP32_CPU_TRAINING_LINEAR and device == "cpu" and x.dtype == torch.float32 and _ONEDNN_LINEAR:
            return _CastLinear.apply(x, layer.weight, layer.bias, torch.float32, gelu_input)
    return layer(F.gelu(x) if gelu_input else x)


class PatchEmbed(nn.Module):
    """Overlapping 16x16 patches of a ``(B, 1, F, T)`` spectrogram -> ``(B, D, F', T')`` grid."""

    def __init__(self, patch_size: int = 16, stride_f: int = 10, stride_t: int = 10, in_chans: int = 1, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.stride = (stride_f, stride_t)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=self.stride)

    def grid(self, n_mels: int, n_frames: int) -> tuple[int, int]:
        """Patches along frequency and time for an input of ``n_mels x n_frames``."""
        return ((n_mels - self.patch_size) // self.stride[0] + 1, (n_frames - self.patch_size) // self.stride[1] + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (UNFOLD_PATCHES and x.device.type == "cpu" and torch.is_grad_enabled() and self.proj.weight.requires_grad
                and not torch.compiler.is_compiling()):
            return self._forward_unfolded(x)
        return self.proj(x)  # (B, D, F', T')

    def _forward_unfolded(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as patches (``F.unfold``) times the flattened kernel: the training path.

        The same products as the convolution (up to summation order). Its weight gradient is then
        one matmul: on the 10 s ViT-B step's batch the CPU convolution's forward and backward took
        22-29 ms, this 3-4 ms.
        """
        n_f, n_t = self.grid(x.shape[-2], x.shape[-1])
        patches = F.unfold(x, self.patch_size, stride=self.stride)  # (B, C * p * p, F' * T')
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        y = F.linear(patches.transpose(1, 2), weight, self.proj.bias)  # (B, F' * T', D)
        return y.transpose(1, 2).unflatten(2, (n_f, n_t))  # (B, D, F', T'), a view


# Attention backward for CPU training in bf16 (see _CPUAttention); off: SDPA's own backward (the tests compare both).
MATMUL_ATTENTION_BACKWARD = True
# Largest (heads, N, N) fp32 score block _CPUAttention's backward holds per sample: beyond it (long inputs
# without patchout) the score matrices outgrow the caches and SDPA's tiled kernel is the better choice.
# ViT-B, bf16, forward + backward against SDPA's (benchmarks/bench_attention_backward.py's method): 2.0x at
# 160 tokens, 1.4x at 281 (10 s, patchout 30), 1.06x at 500, 0.90x at 800, 0.71x at 1200. 16 MB: N <= 591.
_MATMUL_ATTENTION_MAX_BYTES = 16 * 2**20


def use_matmul_attention_backward(q: torch.Tensor, dropout_p: float) -> bool:
    """True where ``_CPUAttention`` replaces SDPA: CPU bf16 training without attention dropout, inputs not too long."""
    heads, n = q.shape[1], q.shape[2]
    return (
        MATMUL_ATTENTION_BACKWARD
        and q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.requires_grad
        and torch.is_grad_enabled()
        and dropout_p == 0.0
        and heads * n * n * 4 <= _MATMUL_ATTENTION_MAX_BYTES
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


class _CPUAttention(torch.autograd.Function):
    """Softmax attention of the projected ``qkv`` ``(B, N, 3 * C)``: SDPA's flash kernel forward, a matmul backward.

    PyTorch's CPU flash-attention backward runs at 130-180 GFLOP/s on ViT-B training shapes in bf16,
    a small share of the bf16 matmul ceiling (many small GEMMs per head and query block, then a copy
    that stacks the three gradients). This backward does the same arithmetic as a few batched matmuls
    per sample, all heads at once, and copies the three gradients into ``qkv``'s layout once:

        P = exp(q k^T * scale - logsumexp)     (fp32 scores from fp32 copies of q and k)
        dV = P^T dO,  dP = dO V^T (fp32),  dS = P * (dP - rowsum(dO * O)),  dQ = dS K * scale,  dK = dS^T Q * scale

    Scores, ``dP`` and ``dS`` are fp32 as in the flash kernel; P and dS are rounded to bf16 for the
    matmuls that follow, as the flash kernel rounds them. The score blocks of one sample and the
    head-major copies are reused buffers (``_scratch_buffer``: about 22 MB for the 10 s ViT-B step).
    Against the fp32 gradient from the same inputs it is as accurate as SDPA's backward or more
    (``tests/test_precision.py``). Long inputs and fp32 keep SDPA's backward (``use_matmul_attention_backward``).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        B, N, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads
        return out.transpose(1, 2).reshape(B, N, C)  # (B, N, heads, head_dim)-contiguous: a view

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        B, N, C3 = qkv.shape
        H = ctx.num_heads
        D = C3 // 3 // H
        scale = D**-0.5
        with torch.autocast("cpu", enabled=False):
            dtype = qkv.dtype
            grad4 = grad.to(dtype).reshape(B, N, H, D)
            delta = (grad4.float() * out.transpose(1, 2).float()).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, H, N, 1): rowsum(dO * O)
            # q, k, v and dO (B, H, N, D)-contiguous; the three gradients collect in the same layout
            qkv_h = _scratch_buffer("attention qkv", (3, B, H, N, D), dtype).copy_(qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4))
            do = _scratch_buffer("attention dO", (B, H, N, D), dtype).copy_(grad4.transpose(1, 2))
            grads = _scratch_buffer("attention grads", (3, B, H, N, D), dtype)
            s = _scratch_buffer("attention scores", (H, N, N), torch.float32)
            d = _scratch_buffer("attention dP", (H, N, N), torch.float32)
            p16 = _scratch_buffer("attention P", (H, N, N), dtype)
            a32 = _scratch_buffer("attention a32", (H, N, D), torch.float32)
            b32 = _scratch_buffer("attention b32", (H, N, D), torch.float32)
            q, k, v = qkv_h.unbind(0)
            for i in range(B):
                torch.bmm(a32.copy_(q[i]).mul_(scale), b32.copy_(k[i]).transpose(1, 2), out=s)
                s.sub_(lse[i].unsqueeze(-1)).exp_()  # P, fp32
                p16.copy_(s)
                torch.bmm(p16.transpose(1, 2), do[i], out=grads[2, i])  # dV
                torch.bmm(a32.copy_(do[i]), b32.copy_(v[i]).transpose(1, 2), out=d)  # dP
                p16.copy_(d.sub_(delta[i]).mul_(s))  # dS
                torch.bmm(p16, k[i], out=grads[0, i])  # dQ / scale
                torch.bmm(p16.transpose(1, 2), q[i], out=grads[1, i])  # dK / scale
            grads[:2].mul_(scale)
            # a fresh tensor in qkv's layout (.contiguous() could hand back the scratch buffer itself)
            grad_qkv = torch.empty((B, N, 3, H, D), dtype=dtype).copy_(grads.permute(1, 3, 0, 2, 4))
        return grad_qkv.view(B, N, C3), None


class Attention(nn.Module):
    """Multi-head self-attention; fused (``F.scaled_dot_product_attention``) unless maps are asked for."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        x, attn = self.attend(autocast_linear(x, self.qkv), return_attention)
        x = self.proj_drop(autocast_linear(x, self.proj))
        return (x, attn) if return_attention else x

    def attend(self, qkv: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected ``qkv`` ``(B, N, 3 * C)`` -> attention output ``(B, N, C)`` before ``proj`` (and the maps)."""
        B, N, C3 = qkv.shape
        # Strided views, no copy: SDPA takes any strides, and its CPU kernel writes its output
        # (B, N, heads, head_dim)-contiguous, so the transpose + reshape below is a view as well.
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        attn = None
        if self.fused and not return_attention and use_matmul_attention_backward(q, dropout_p):
            return _CPUAttention.apply(qkv, self.num_heads), None
        if self.fused and not return_attention:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            attn = attn.softmax(dim=-1)
            x = F.dropout(attn, dropout_p) @ v if dropout_p else attn @ v
        return x.transpose(1, 2).reshape(B, N, C3 // 3), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop.p:  # dropout sits between GELU and fc2: the plain path
            return self.drop(self.fc2(self.drop(self.act(autocast_linear(x, self.fc1)))))
        return autocast_linear(autocast_linear(x, self.fc1), self.fc2, gelu_input=True)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of whole samples in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        fused_attention: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, fused=fused_attention)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if not return_attention and not self.training and self.attn.fused and use_fused_linear(x, self.attn.qkv.weight):
            return self._forward_fused(x)
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True)
        else:
            y, attn = self.attn(self.norm1(x)), None
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Eval forward with bias, GELU and both residual adds inside the matmuls (see ``fused_linear``).

        The same arithmetic as ``forward`` in eval (dropout and drop-path are identities there).
        """
        attn, mlp = self.attn, self.mlp
        y, _ = attn.attend(fused_linear(self.norm1(x), attn.qkv))
        x = fused_linear(y, attn.proj, residual=x)  # x + proj(attention)
        return fused_linear(fused_linear(self.norm2(x), mlp.fc1, "gelu"), mlp.fc2, residual=x)  # x + mlp(norm2(x))
