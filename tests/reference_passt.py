"""An independent, deliberately plain transcription of the upstream PaSST/MAEST eval forward.

It follows the original code path step by step (explicit attention, per-head reshapes, the
original slicing of the time embeddings, the `(cls + dist) / 2` head and the unnormalised block
outputs of `transformer_block`) and reads a state dict by its upstream key names, so the tests
can check our network against the published algorithm rather than against itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _block(x, sd, i, num_heads):
    p = f"blocks.{i}."
    B, N, C = x.shape
    h = _ln(x, sd, p + "norm1", 1e-6)
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5
    attn = attn.softmax(dim=-1)
    a = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = _ln(x, sd, p + "norm2", 1e-6)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + h


@torch.no_grad()
def reference_forward(sd, x, depth, num_heads, transformer_block=-1):
    """Upstream ``PaSST.forward`` (eval, distilled_type='mean') or ``forward_features(transformer_block=i)``.

    ``x``: (B, 1, F, T). Returns logits (B, n_classes), or (B, 3*D) = cat(cls, dist, mean(tokens))
    after block ``transformer_block`` as upstream returns it.
    """
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(10, 10))
    B = x.shape[0]
    time_new_pos_embed = sd["time_new_pos_embed"]
    if x.shape[-1] < time_new_pos_embed.shape[-1]:
        time_new_pos_embed = time_new_pos_embed[:, :, :, : x.shape[-1]]
    else:
        x = x[:, :, :, : time_new_pos_embed.shape[-1]]
    x = x + time_new_pos_embed
    x = x + sd["freq_new_pos_embed"]
    x = x.flatten(2).transpose(1, 2)
    cls_tokens = sd["cls_token"].expand(B, -1, -1) + sd["new_pos_embed"][:, :1, :]
    dist_token = sd["dist_token"].expand(B, -1, -1) + sd["new_pos_embed"][:, 1:, :]
    x = torch.cat((cls_tokens, dist_token, x), dim=1)
    if transformer_block == -1:
        for i in range(depth):
            x = _block(x, sd, i, num_heads)
        x = _ln(x, sd, "norm", 1e-6)
        features = (x[:, 0] + x[:, 1]) / 2
        h = _ln(features, sd, "head.0", 1e-5)
        return F.linear(h, sd["head.1.weight"], sd["head.1.bias"])
    for i in range(transformer_block + 1):
        x = _block(x, sd, i, num_heads)
    return torch.cat([x[:, 0, :], x[:, 1, :], torch.mean(x[:, 2:, :], dim=1)], dim=1)
