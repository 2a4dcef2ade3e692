"""The MAEST network: a PaSST-style ViT on mel spectrograms with patchout.

A 16x16 patch embedding with stride 10 turns a ``(B, 1, 96, T)`` mel into a ``(9, T')`` grid of
tokens. Position is the sum of a frequency embedding ``(1, D, F, 1)`` and a time embedding
``(1, D, 1, T)``; CLS and DIST tokens carry their own embedding ``new_pos_embed``. Patchout
(Koutini et al. 2022, Section 2.2) drops time columns, frequency rows or random patches in
training; inference patchout drops listed or interleaved rows/columns to extract faster.

Names and shapes of parameters equal the published checkpoints (SPEC §5.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .layers import Block, PatchEmbed
from .mel import HOP_LENGTH, SAMPLE_RATE

DISTILLED_TYPES = ("mean", "separated")
# The fields that fix the parameters' shapes and what forward computes; a checkpoint of this project
# records them (models.checkpoints.model_record) so that the network is rebuilt from the file alone.
# The rest (patchout, dropout, attention kernel, input checks) are run-time options of each command.
ARCHITECTURE_FIELDS = (
    "n_classes", "input_f", "input_t", "patch_size", "stride_f", "stride_t", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "distilled_type",
)
# Inference patchout: rows/columns dropped in every mode (set_inference_patchout); off at their defaults.
INFERENCE_PATCHOUT_FIELDS = ("s_patchout_f_indices", "s_patchout_f_interleaved", "s_patchout_t_indices", "s_patchout_t_interleaved")


@dataclass
class MAESTConfig:
    """Everything that fixes the network's shape and behaviour; defaults are ViT-B, 10 s, 400 classes."""

    n_classes: int = 400  # output labels (400 or 519 Discogs styles for the released models)
    input_f: int = 96  # mel bands of the input
    input_t: int = 625  # frames of the longest training clip; sizes the time embedding (input_t // stride_t)
    patch_size: int = 16  # square patches
    stride_f: int = 10  # patch stride over frequency (overlapping patches)
    stride_t: int = 10  # patch stride over time
    embed_dim: int = 768  # token width D
    depth: int = 12  # transformer blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    distilled_type: str = "mean"  # "mean": head((CLS+DIST)/2); "separated": CLS head and DIST head
    u_patchout: int = 0  # training: random patches dropped from the flattened sequence
    s_patchout_t: int = 0  # training: time columns dropped
    s_patchout_f: int = 0  # training: frequency rows dropped
    s_patchout_f_indices: tuple[int, ...] = ()  # always: frequency rows dropped (inference patchout)
    s_patchout_f_interleaved: int = 0  # always: keep every n-th frequency row (0 = off)
    s_patchout_t_indices: tuple[int, ...] = ()  # always: time columns dropped
    s_patchout_t_interleaved: int = 0  # always: keep every n-th time column (0 = off)
    fused_attention: bool = True  # F.scaled_dot_product_attention; False = explicit softmax(QK^T)V
    check_finite: bool = True  # reject NaN/inf inputs (one device sync per forward)

    @property
    def grid_f(self) -> int:
        """Rows of the frequency embedding (upstream: input_f // stride_f)."""
        return self.input_f // self.stride_f

    @property
    def grid_t(self) -> int:
        """Columns of the time embedding (upstream: input_t // stride_t)."""
        return self.input_t // self.stride_t

    @property
    def max_frames(self) -> int:
        """The longest input whose every frame lies in a patch with a time embedding (the published AST max_length)."""
        return (self.grid_t - 1) * self.stride_t + self.patch_size

    @property
    def max_input_frames(self) -> int:
        """The longest input the model accepts: ``grid_t`` time patches, one per time position. Its last
        ``stride_t - 1`` frames past ``max_frames`` start no further patch and are not used."""
        return self.max_frames + self.stride_t - 1

    def patches(self, n_frames: int) -> tuple[int, int]:
        return ((self.input_f - self.patch_size) // self.stride_f + 1, (n_frames - self.patch_size) // self.stride_t + 1)

    def check_patchout(self, n_frames: int) -> None:
        """Training patchout must leave patches of an ``n_frames`` input (shape arithmetic only, no device sync).

        The construction check is made against ``input_t``; a shorter training crop has fewer time
        columns, and dropping all of them would train on the CLS and DIST tokens alone.
        """
        n_f, n_t = self.patches(n_frames)
        clip = f"this {n_frames}-frame input ({n_frames * HOP_LENGTH / SAMPLE_RATE:.1f} s clip)"
        if self.s_patchout_t >= n_t:  # n_t >= 1: patchout is on
            raise ValueError(
                f"structured time patchout s_patchout_t={self.s_patchout_t} removes all {n_t} time columns of {clip}: "
                f"use a longer datamodule.clip_length or a smaller maest.s_patchout_t (at most {n_t - 1})"
            )
        if self.s_patchout_f >= n_f:
            raise ValueError(
                f"structured frequency patchout s_patchout_f={self.s_patchout_f} removes all {n_f} frequency rows "
                f"of {clip}: use a smaller maest.s_patchout_f (at most {n_f - 1})"
            )
        remaining = (n_f - self.s_patchout_f) * (n_t - self.s_patchout_t)
        if self.u_patchout >= remaining:
            raise ValueError(
                f"unstructured patchout u_patchout={self.u_patchout} removes all {remaining} patches left of {clip} "
                f"after structured patchout: use a longer datamodule.clip_length or a smaller maest.u_patchout "
                f"(at most {remaining - 1})"
            )

    def replace(self, **changes) -> "MAESTConfig":
        return dataclasses.replace(self, **changes)

    def architecture(self) -> dict:
        """The ``ARCHITECTURE_FIELDS`` as plain data (int, float, bool, str)."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

    def inference_patchout(self) -> dict:
        """The inference patchout fields that are on (``{}`` when every row and column is kept)."""
        return {name: getattr(self, name) for name in INFERENCE_PATCHOUT_FIELDS if getattr(self, name)}


class MAEST(nn.Module):
    """Mel ``(B, F, T)`` or ``(B, 1, F, T)`` (normalised) -> logits ``(B, n_classes)``."""

    def __init__(self, config: MAESTConfig | None = None, **overrides):
        super().__init__()
        config = (config or MAESTConfig()).replace(**overrides) if overrides else (config or MAESTConfig())
        config = config.replace(
            s_patchout_f_indices=tuple(int(i) for i in config.s_patchout_f_indices),
            s_patchout_t_indices=tuple(int(i) for i in config.s_patchout_t_indices),
        )
        _validate_config(config)
        self.config = config
        # The names of the outputs, or None: get_maest sets them from the checkpoint's record or the
        # released model's list, and export_hf writes them as id2label. Not part of the state dict.
        self.labels: list[str] | None = None
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.stride_f, config.stride_t, 1, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, D))  # CLS and DIST positions
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, D, config.grid_f, 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, D, 1, config.grid_t))
        self.pos_drop = nn.Dropout(config.drop_rate)
        dpr = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]  # stochastic depth decay
        self.blocks = nn.Sequential(
            *[
                Block(
                    D,
                    config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    drop=config.drop_rate,
                    attn_drop=config.attn_drop_rate,
                    drop_path=dpr[i],
                    fused_attention=config.fused_attention,
                )
                for i in range(config.depth)
            ]
        )
        self.norm = nn.LayerNorm(D, eps=1e-6)
        # The head's LayerNorm keeps torch's default eps (1e-5), as upstream PaSST.
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, config.n_classes))
        self.head_dist = nn.Linear(D, config.n_classes)
        self._init_weights()

    # ------------------------------------------------------------------ construction
    def _init_weights(self) -> None:
        for p in (self.new_pos_embed, self.freq_new_pos_embed, self.time_new_pos_embed, self.dist_token, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    def no_weight_decay(self) -> set[str]:
        """Names of the tokens and position embeddings, which ``module.no_weight_decay_tokens=True``
        trains without weight decay (timm's hook; upstream decays them, as every parameter)."""
        return {"new_pos_embed", "freq_new_pos_embed", "time_new_pos_embed", "cls_token", "dist_token"}

    def set_fused_attention(self, fused: bool) -> None:
        self.config = self.config.replace(fused_attention=fused)
        for block in self.blocks:
            block.attn.fused = fused

    def set_inference_patchout(
        self,
        f_indices: tuple[int, ...] = (),
        f_interleaved: int = 0,
        t_indices: tuple[int, ...] = (),
        t_interleaved: int = 0,
    ) -> None:
        """Drop frequency rows / time columns in every mode (faster extraction; SPEC §4 keys)."""
        config = self.config.replace(
            s_patchout_f_indices=tuple(int(i) for i in f_indices),
            s_patchout_f_interleaved=int(f_interleaved),
            s_patchout_t_indices=tuple(int(i) for i in t_indices),
            s_patchout_t_interleaved=int(t_interleaved),
        )
        _validate_config(config)
        self.config = config

    # ------------------------------------------------------------------ input
    def _check_input(self, x) -> torch.Tensor:
        cfg = self.config
        if not torch.is_tensor(x):
            raise TypeError(f"MAEST expects a torch.Tensor mel spectrogram (B, {cfg.input_f}, T), got {type(x).__name__}")
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != 1:
            fix = ("add a batch axis first (mel[None])" if x.dim() == 2 and x.shape[0] == cfg.input_f
                   else "raw audio goes through models.mel.MelSpectrogram first")
            raise ValueError(
                f"MAEST expects a mel spectrogram of shape (B, {cfg.input_f}, T) or (B, 1, {cfg.input_f}, T), got {tuple(x.shape)}; {fix}"
            )
        if x.numel() == 0:
            raise ValueError(f"MAEST got an empty input of shape {tuple(x.shape)}")
        if x.shape[2] != cfg.input_f:
            raise ValueError(
                f"MAEST expects {cfg.input_f} mel bands, got {x.shape[2]} (input shape {tuple(x.shape)}); "
                "inputs must be (B, n_mels, frames): transpose a (B, frames, n_mels) array"
            )
        n_frames = x.shape[3]
        if n_frames < cfg.patch_size:
            raise ValueError(
                f"MAEST needs at least {cfg.patch_size} frames, got {n_frames}: pad short clips, e.g. "
                "models.inference.split_into_clips(mel, n_frames) centres a (n_mels, frames) mel in silence as training did"
            )
        if cfg.patches(n_frames)[1] > cfg.grid_t:  # i.e. n_frames > cfg.max_input_frames
            raise ValueError(
                f"input of {n_frames} frames is longer than this model's time embeddings allow "
                f"(at most {cfg.max_input_frames} frames, {cfg.grid_t} time patches); cut it into clips of at most "
                f"{cfg.max_input_frames} frames, e.g. with models.inference.split_into_clips"
            )
        x = self._cast_input(x)
        if cfg.check_finite and not torch.isfinite(x).all():
            raise ValueError("MAEST input contains NaN or inf values; check the mel spectrogram (a corrupt file?)")
        return x

    def _cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """Real floating input in the parameters' dtype; complex, integer and bool input is refused.

        Casting float64/float16/bf16 to the weights' dtype is exact enough for mels; under autocast the
        ops still run in the autocast dtype. A normalised mel is real and fractional, so an integer or
        complex tensor is a mistake upstream (raw PCM, a complex STFT), not something to convert.
        """
        if x.is_complex():
            raise TypeError(
                f"MAEST got a complex input ({x.dtype}): a mel spectrogram is real; pass the magnitude "
                "(x.abs()) through the mel front-end (models.mel.MelSpectrogram), not a complex STFT"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"MAEST got an input of dtype {x.dtype}: it expects a floating-point, normalised mel "
                "spectrogram; convert integer data to float and normalise it (models.mel.normalize)"
            )
        dtype = self.patch_embed.proj.weight.dtype
        return x if x.dtype == dtype else x.to(dtype)

    # ------------------------------------------------------------------ tokens
    def _keep(self, n: int, drop: int, device) -> torch.Tensor:
        """Sorted random subset of ``n - drop`` indices, drawn on ``device``."""
        return torch.randperm(n, device=device)[: n - drop].sort().values

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Checked input -> token sequence ``(B, 2 + patches, D)`` before the first block."""
        cfg = self.config
        if self.training:
            cfg.check_patchout(x.shape[-1])  # against this input's own patches, not input_t's
        x = self.patch_embed(x)  # (B, D, F', T')
        B, _, F_dim, T_dim = x.shape
        time_pos = self.time_new_pos_embed
        if T_dim < time_pos.shape[-1]:
            if self.training:
                # A random offset into the time embeddings for inputs shorter than the maximum.
                offset = torch.randint(0, time_pos.shape[-1] - T_dim + 1, (1,), device=x.device)
                time_pos = time_pos.index_select(3, offset + torch.arange(T_dim, device=x.device))
            else:
                time_pos = time_pos[..., :T_dim]
        x = x + time_pos + self.freq_new_pos_embed[:, :, :F_dim]

        # Structured patchout (training only).
        if self.training and cfg.s_patchout_t:
            x = x.index_select(3, self._keep(T_dim, cfg.s_patchout_t, x.device))
        if self.training and cfg.s_patchout_f:
            x = x.index_select(2, self._keep(F_dim, cfg.s_patchout_f, x.device))
        # Inference patchout (every mode, deterministic).
        if cfg.s_patchout_f_indices or cfg.s_patchout_f_interleaved:
            x = x.index_select(2, self._kept(x.shape[2], cfg.s_patchout_f_indices, cfg.s_patchout_f_interleaved, x.device))
        if cfg.s_patchout_t_indices or cfg.s_patchout_t_interleaved:
            x = x.index_select(3, self._kept(x.shape[3], cfg.s_patchout_t_indices, cfg.s_patchout_t_interleaved, x.device))

        x = x.flatten(2).transpose(1, 2)  # (B, F'*T', D), frequency-major as upstream
        if self.training and cfg.u_patchout:
            x = x.index_select(1, self._keep(x.shape[1], cfg.u_patchout, x.device))

        cls = self.cls_token.expand(B, -1, -1) + self.new_pos_embed[:, :1]
        dist = self.dist_token.expand(B, -1, -1) + self.new_pos_embed[:, 1:]
        return self.pos_drop(torch.cat((cls, dist, x), dim=1))

    @staticmethod
    def _kept(n: int, dropped: tuple[int, ...], interleaved: int, device) -> torch.Tensor:
        keep = torch.ones(n, dtype=torch.bool)
        for i in dropped:
            if i < n:
                keep[i] = False
        idx = torch.arange(n)[keep]
        if interleaved:
            idx = idx[::interleaved]
        if idx.numel() == 0:
            raise ValueError(f"inference patchout removes all {n} rows/columns of this input; drop fewer")
        return idx.to(device)

    # ------------------------------------------------------------------ outputs
    def block_index(self, block: int) -> int:
        """``block`` checked against the depth, negative indices counted from the end."""
        depth = self.config.depth
        if not isinstance(block, int) or not -depth <= block < depth:
            raise ValueError(f"block must be an integer in [0, {depth - 1}] (0-based; negative counts from the end), got {block!r}")
        return block % depth

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised output tokens of the last block ``(B, 2 + patches, D)``."""
        x = self.blocks(self.tokens(self._check_input(x)))
        return self.norm(x)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS-head logits, DIST-head logits) of a ``separated`` model (teacher-student training)."""
        if self.config.distilled_type != "separated":
            raise ValueError("forward_heads needs distilled_type='separated'; this model averages the tokens ('mean')")
        x = self.forward_features(x)
        return self.head(x[:, 0]), self.head_dist(x[:, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self.config.distilled_type == "mean":
            return self.head((x[:, 0] + x[:, 1]) / 2)
        # separated: the CLS head predicts the labels; the DIST head the teacher's (see forward_heads)
        return self.head(x[:, 0])

    def block_indices(self, block: int | list[int] | tuple[int, ...] | str) -> list[int]:
        """``block`` as a list of checked 0-based indices: an int, a list/tuple of ints, or ``"all"``."""
        if isinstance(block, str):
            if block != "all":
                raise ValueError(f'block must be an integer, a list of integers or "all", got {block!r}')
            return list(range(self.config.depth))
        if isinstance(block, (list, tuple)):
            if not block:
                raise ValueError("block is an empty list: name at least one block (0-based), or \"all\"")
            indices = [self.block_index(b) for b in block]
            if len(set(indices)) < len(indices):
                raise ValueError(f"block lists a block twice: {list(block)} (blocks {indices} after counting negatives from the end)")
            return indices
        return [self.block_index(block)]

    def hidden_states(self, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """Token sequences ``(B, 2 + patches, D)`` after each of ``blocks`` (checked indices), from one pass.

        The blocks run once, up to the deepest one asked for; nothing after it is computed.
        """
        h = self.tokens(self._check_input(x))
        wanted, states = set(blocks), {}
        for i, blk in enumerate(self.blocks[: max(blocks) + 1]):
            h = blk(h)
            if i in wanted:
                states[i] = h
        return [states[b] for b in blocks]

    def embeddings(self, x: torch.Tensor, block: int | list[int] | str = 6) -> torch.Tensor:
        """CLS, DIST and the mean of the patch tokens after ``block`` (0-based, not normalised).

        An int gives ``(B, 3, D)``; a list of blocks or ``"all"`` gives ``(B, n_blocks, 3, D)`` (in the
        order asked) from one forward pass.
        """
        states = self.hidden_states(x, self.block_indices(block))
        out = torch.stack([torch.stack((h[:, 0], h[:, 1], h[:, 2:].mean(dim=1)), dim=1) for h in states], dim=1)
        return out if isinstance(block, (list, tuple, str)) else out[:, 0]

    def timestamp_embeddings(self, x: torch.Tensor, block: int | list[int] | str = 6) -> torch.Tensor:
        """Frame-level embeddings: per time column of patches, the mean over frequency of its patch tokens.

        An int ``block`` gives ``(B, T', D)``; a list or ``"all"`` gives ``(B, n_blocks, T', D)``. Column
        ``j`` is centred at ``column_times_ms(n_frames)[j]`` from the clip's start. Needs the full patch
        grid, so training patchout must be off (``model.eval()``); inference patchout is respected.
        """
        cfg = self.config
        if self.training and (cfg.u_patchout or cfg.s_patchout_t or cfg.s_patchout_f):
            raise ValueError("timestamp_embeddings needs every patch of the grid: training patchout is on; call model.eval() first")
        n_f, n_t = self.patch_grid(x.shape[-1])
        states = self.hidden_states(x, self.block_indices(block))
        out = torch.stack([h[:, 2:].unflatten(1, (n_f, n_t)).mean(dim=1) for h in states], dim=1)  # (B, n_blocks, T', D)
        return out if isinstance(block, (list, tuple, str)) else out[:, 0]

    def patch_grid(self, n_frames: int) -> tuple[int, int]:
        """Frequency rows and time columns of an ``n_frames`` input after inference patchout."""
        cfg = self.config
        n_f, n_t = cfg.patches(n_frames)
        if cfg.s_patchout_f_indices or cfg.s_patchout_f_interleaved:
            n_f = len(self._kept(n_f, cfg.s_patchout_f_indices, cfg.s_patchout_f_interleaved, "cpu"))
        return n_f, len(self._time_columns(n_t))

    def _time_columns(self, n_t: int) -> torch.Tensor:
        cfg = self.config
        if cfg.s_patchout_t_indices or cfg.s_patchout_t_interleaved:
            return self._kept(n_t, cfg.s_patchout_t_indices, cfg.s_patchout_t_interleaved, "cpu")
        return torch.arange(n_t)

    def column_times_ms(self, n_frames: int) -> torch.Tensor:
        """Centre time (ms, float64) of each time column of an ``n_frames`` clip, from its first frame.

        A column spans frames ``[j * stride_t, j * stride_t + patch_size)``; frame ``i`` is centred at
        ``i * HOP_LENGTH / SAMPLE_RATE`` seconds (centred STFT), so column ``j`` at frame
        ``j * stride_t + (patch_size - 1) / 2``: 120 ms, 280 ms, ... for the released models.
        """
        cfg = self.config
        columns = self._time_columns(cfg.patches(n_frames)[1]).double()
        return (columns * cfg.stride_t + (cfg.patch_size - 1) / 2) * (1000.0 * HOP_LENGTH / SAMPLE_RATE)

    def attention_maps(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Self-attention weights ``(B, heads, N, N)`` of ``block`` (explicit attention path)."""
        block = self.block_index(block)
        h = self.tokens(self._check_input(x))
        for blk in self.blocks[:block]:
            h = blk(h)
        _, attn = self.blocks[block](h, return_attention=True)
        return attn


def _validate_config(cfg: MAESTConfig) -> None:
    if cfg.distilled_type not in DISTILLED_TYPES:
        raise ValueError(f"distilled_type must be one of {DISTILLED_TYPES}, got {cfg.distilled_type!r}")
    if cfg.n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {cfg.n_classes}")
    if cfg.input_f < cfg.patch_size or cfg.input_t < cfg.patch_size:
        raise ValueError(f"input_f ({cfg.input_f}) and input_t ({cfg.input_t}) must be at least the patch size {cfg.patch_size}")
    n_f, n_t = cfg.patches(cfg.input_t)
    if cfg.grid_f < n_f:
        raise ValueError(f"the frequency embedding ({cfg.grid_f} rows) is smaller than the {n_f} frequency patches")
    for name, value, n in (("s_patchout_t", cfg.s_patchout_t, n_t), ("s_patchout_f", cfg.s_patchout_f, n_f)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        if value >= n:
            raise ValueError(
                f"{name}={value} would remove every patch: a {cfg.input_t}-frame input has only {n} "
                f"{'time columns' if name.endswith('t') else 'frequency rows'}; use at most {n - 1}"
            )
    remaining = (n_f - cfg.s_patchout_f) * (n_t - cfg.s_patchout_t)
    if cfg.u_patchout < 0 or cfg.u_patchout >= remaining:
        raise ValueError(f"u_patchout={cfg.u_patchout} must be in [0, {remaining - 1}]: only {remaining} patches remain after structured patchout")
    for name, idx, n in (("s_patchout_f_indices", cfg.s_patchout_f_indices, n_f), ("s_patchout_t_indices", cfg.s_patchout_t_indices, n_t)):
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"{name} {bad} out of range: valid indices are 0..{n - 1}")
        if len(set(idx)) >= n:
            raise ValueError(f"{name} would remove all {n} rows/columns")
    for name, step in (("s_patchout_f_interleaved", cfg.s_patchout_f_interleaved), ("s_patchout_t_interleaved", cfg.s_patchout_t_interleaved)):
        if step < 0:
            raise ValueError(f"{name} must be >= 0 (0 = off), got {step}")
