"""Upstream MAEST's network (palonso/MAEST ``models/maest.py``, from kkoutini/PaSST and timm 0.4.x), for timing.

The real upstream code imports timm and torchaudio, which do not import next to a CPU-only torch
here; this file transcribes the parts a forward and a training step run, layer for layer and op for
op, so that the "upstream" column of ``benchmarks/bench_speed.py`` times the same computation as
upstream does:

- ``Attention``: timm 0.4's explicit ``softmax(q @ k^T * scale) @ v`` with the ``(B, N, 3, heads,
  head_dim)`` reshape/permute, no fused kernel;
- ``Mlp``, ``Block`` (pre-norm, ``nn.LayerNorm(eps=1e-6)``, GELU), ``DropPath`` as timm's;
- ``MAEST.forward_features``: patch embedding without flattening, time embedding sliced (random
  offset in training), frequency embedding added, structured patchout by advanced indexing with
  ``torch.randperm`` indices drawn on the CPU, flatten, unstructured patchout, CLS/DIST tokens,
  ``blocks``, ``norm``; ``forward`` returns ``(logits, features)`` with ``features = (cls + dist) / 2``.

The parameter names equal upstream's (and this project's), so ``load_state_dict`` takes a MAEST
state dict as it is (tests/test_speed_benchmark.py checks the logits are ours). Upstream's
``melspectrogram`` submodule (torchaudio) is left out: its forward does not run on mel input.
Source: https://github.com/palonso/MAEST/blob/main/models/maest.py (Attention, Mlp, Block,
MAEST.forward_features, MAEST.forward).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size=16, stride=16, in_chans=1, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.grid_size = (img_size[0] // stride[0], img_size[1] // stride[1])
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)
        self.norm = nn.Identity()

    def forward(self, x):
        x = self.proj(x)  # flatten=False in MAEST
        x = self.norm(x)
        return x


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        random_tensor = keep_prob + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        random_tensor.floor_()
        return x.div(keep_prob) * random_tensor


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class UpstreamMAEST(nn.Module):
    """Upstream ``MAEST`` (distilled=True, the released models' layout); ``forward`` -> ``(logits, features)``."""

    def __init__(
        self,
        img_size=(96, 625),
        stride=(10, 10),
        num_classes=400,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        u_patchout=0,
        s_patchout_t=0,
        s_patchout_f=0,
        distilled_type="mean",
    ):
        super().__init__()
        self.u_patchout, self.s_patchout_t, self.s_patchout_f = u_patchout, s_patchout_t, s_patchout_f
        self.distilled_type = distilled_type
        self.patch_embed = PatchEmbed(img_size, 16, stride, 1, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, embed_dim))
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, self.patch_embed.grid_size[0], 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, 1, self.patch_embed.grid_size[1]))
        self.pos_drop = nn.Dropout(p=0.0)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))
        self.head_dist = nn.Linear(embed_dim, num_classes)
        for p in (self.new_pos_embed, self.freq_new_pos_embed, self.time_new_pos_embed, self.dist_token, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = self.patch_embed(x)  # [b, e, f, t]
        B_dim, E_dim, F_dim, T_dim = x.shape
        time_new_pos_embed = self.time_new_pos_embed
        if x.shape[-1] <= time_new_pos_embed.shape[-1]:
            if self.training:
                toffset = torch.randint(1 + time_new_pos_embed.shape[-1] - x.shape[-1], (1,)).item()
                time_new_pos_embed = time_new_pos_embed[:, :, :, toffset : toffset + x.shape[-1]]
            else:
                time_new_pos_embed = time_new_pos_embed[:, :, :, : x.shape[-1]]
        else:
            raise ValueError(f"the patches shape {tuple(x.shape)} are larger than the time encodings {tuple(time_new_pos_embed.shape)}")
        x = x + time_new_pos_embed
        x = x + self.freq_new_pos_embed
        # Structured patchout (PaSST Section 2.2): indices drawn on the CPU, advanced indexing.
        if self.training and self.s_patchout_t:
            random_indices = torch.randperm(T_dim)[: T_dim - self.s_patchout_t].sort().values
            x = x[:, :, :, random_indices]
        if self.training and self.s_patchout_f:
            random_indices = torch.randperm(F_dim)[: F_dim - self.s_patchout_f].sort().values
            x = x[:, :, random_indices, :]
        x = x.flatten(2).transpose(1, 2)
        if self.training and self.u_patchout:
            seq_len = x.shape[1]
            random_indices = torch.randperm(seq_len)[: seq_len - self.u_patchout].sort().values
            x = x[:, random_indices, :]
        cls_tokens = self.cls_token.expand(B_dim, -1, -1) + self.new_pos_embed[:, :1, :]
        dist_token = self.dist_token.expand(B_dim, -1, -1) + self.new_pos_embed[:, 1:, :]
        x = torch.cat((cls_tokens, dist_token, x), dim=1)
        x = self.pos_drop(x)
        x = self.blocks(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1]

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(1)  # upstream: x.unsqueeze_(1), in place on the caller's tensor
        x = self.forward_features(x)
        features = (x[0] + x[1]) / 2
        if self.distilled_type == "mean":
            return self.head(features), features
        return self.head(x[0]), self.head_dist(x[1]), features


def build_upstream(n_frames: int, n_classes: int = 400, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                   s_patchout_t: int = 0, upstream_dir: str | None = None) -> nn.Module:
    """Upstream's network for ``n_frames`` inputs: this transcription, or the real code from ``upstream_dir``.

    ``upstream_dir``: a checkout of palonso/MAEST whose ``models.maest`` imports (timm 0.4 and
    torchaudio installed); it is put first on ``sys.path``, so call this in a process that has not
    imported this project's ``models`` package (bench_speed.py runs each variant in its own).
    """
    if upstream_dir is None:
        return UpstreamMAEST(img_size=(96, n_frames), num_classes=n_classes, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, s_patchout_t=s_patchout_t)
    import sys

    sys.path.insert(0, str(upstream_dir))
    from models.maest import MAEST  # upstream's, from upstream_dir

    return MAEST(img_size=(96, n_frames), stride=(10, 10), in_chans=1, num_classes=n_classes, embed_dim=embed_dim,
                 depth=depth, num_heads=num_heads, qkv_bias=True, distilled=True, s_patchout_t=s_patchout_t)
