"""Swin Transformer V1 and V2 (arXiv 2103.14030; arXiv 2111.09883), one class for both versions.

The parameter names follow the authors' layout (``layers.N.blocks.M``, patch merging at the END of stage N as
``layers.N.downsample``, classifier ``head``), so the authors' checkpoints load as they are. Blocks work on
channels-last maps, ``(B, H, W, C)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import WindowAttentionV1, WindowAttentionV2
from .cpu_kernels import CPULinear
from .layers import DropPath, trunc_normal_
from .shifted_windows import shifted_merge, shifted_partition
from .windows import ShiftedGrid, Size2, clip_window, pad_to_window, to_2tuple

VERSIONS = ("v1", "v2")


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> ``embed_dim`` channels, then LayerNorm (Swin sec. 3.1)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool = True):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images shaped (batch, {self.in_chans}, height, width), got {tuple(x.shape)}: "
                f"pass a 4-D NCHW batch with {self.in_chans} channels"
            )
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}: "
                f"resize or crop the images to multiples of {self.patch_size}"
            )
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class Mlp(nn.Module):
    """Transformer MLP, ``drop(fc2(drop(GELU(fc1(x)))))`` (Swin sec. 3.1); timm's ``Mlp`` parameter names."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.fc1 = linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchMerging(nn.Module):
    """2x2 neighbour concat (order (0,0), (1,0), (0,1), (1,1)) -> 2C.

    V1: LayerNorm(4C) then Linear (Swin sec. 3.1); V2: Linear then LayerNorm(2C) (Swin V2 sec. 3.1, res-post-norm).
    """

    def __init__(self, dim: int, version: str, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.version = version
        self.reduction = linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if version == "v2" else 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, dy, W/2, dx, C) -> neighbours ordered with the row offset first: (dx, dy)
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        if self.version == "v2":
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block (Swin sec. 3.2, eq. 3).

    V1 is pre-norm (``x + attn(norm(x))``); V2 is residual post-norm (``x + norm(attn(x))``, Swin V2 sec. 3.1)
    with an optional extra LayerNorm on the main branch (Swin V2 sec. 3.1, used for SwinV2-H/G). The block holds
    no mask: its attention builds the shift mask's three ``(N, N)`` patterns on the fly.
    """

    def __init__(
        self,
        version: str,
        dim: int,
        num_heads: int,
        window: Size2,
        shift: Size2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        pretrained_window: Size2 | None = None,
        extra_norm: bool = False,
        fused_attn: bool = True,
        attn_chunk_size: int | None = None,
        cpu_kernels: bool = False,
    ):
        super().__init__()
        self.version, self.window, self.shift = version, window, shift
        common = dict(attn_drop=attn_drop, proj_drop=drop, fused=fused_attn, chunk_size=attn_chunk_size,
                      cpu_kernels=cpu_kernels)
        if version == "v2":
            self.attn = WindowAttentionV2(
                dim, num_heads, window, qkv_bias, pretrained_window=pretrained_window, **common
            )
        else:
            self.attn = WindowAttentionV1(dim, num_heads, window, qkv_bias, **common)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, linear=CPULinear if cpu_kernels else nn.Linear)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # stochastic depth, per branch
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.extra_norm = nn.LayerNorm(dim) if extra_norm else None

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``: pad, cyclic shift, attend per window, undo both."""
        B, H, W, C = x.shape
        x = pad_to_window(x, self.window)  # pad BEFORE the roll so the shift mask matches the rolled map
        Hp, Wp = x.shape[1:3]
        windows = shifted_partition(x, self.window, self.shift)  # (B, nW, N, C)
        grid = (Hp // self.window[0], Wp // self.window[1])
        windows = self.attn(windows, ShiftedGrid(grid, self.shift) if any(self.shift) else None)
        x = shifted_merge(windows, self.window, self.shift, (Hp, Wp))  # (B, Hp, Wp, C)
        if Hp != H or Wp != W:
            x = x[:, :H, :W].contiguous()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.version == "v2":
            x = x + self.drop_path1(self.norm1(self.window_attention(x)))
            x = x + self.drop_path2(self.norm2(self.mlp(x)))
        else:
            x = x + self.drop_path1(self.window_attention(self.norm1(x)))
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        if self.extra_norm is not None:
            x = self.extra_norm(x)
        return x


class SwinStage(nn.Module):
    """A stage: ``depth`` blocks alternating shift 0 and window // 2, then optional patch merging."""

    def __init__(self, blocks: list[SwinBlock], downsample: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.checkpoint_activations = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


def _per_stage(value, num_stages: int, name: str) -> list:
    if isinstance(value, (int, float)) or value is None:
        return [value] * num_stages
    value = list(value)
    if len(value) == 2 and num_stages != 2 and all(isinstance(v, int) for v in value):
        return [tuple(value)] * num_stages  # one (h, w) pair for every stage
    if len(value) != num_stages:
        raise ValueError(f"{name} has {len(value)} entries but the model has {num_stages} stages: give one per stage")
    return value


def _checked_size(version: str, img_size: int | Sequence[int], patch_size: int, depths: Sequence[int],
                  num_heads: Sequence[int]) -> Size2:
    """``img_size`` as (H, W), after the checks a user's arguments can fail (one sentence each)."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if len(depths) != len(num_heads):
        raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
    size = to_2tuple(img_size)
    if size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"img_size {size} is not a multiple of the patch size {patch_size}: choose one that is")
    return size


class SwinTransformer(nn.Module):
    """Swin Transformer, ``version="v1"`` (arXiv 2103.14030) or ``"v2"`` (arXiv 2111.09883).

    ``img_size`` fixes each stage's window and shift (a window is clipped to a smaller feature map, and then not
    shifted); other input sizes that are multiples of the patch size also run, padded to window multiples.
    ``pretrained_window_sizes`` (V2) makes the CPB see coordinates normalised by the pretraining window, for
    fine-tuning at a larger window (Swin V2 sec. 3.3). ``fused_attn=False`` runs the explicit attention reference
    instead of ``scaled_dot_product_attention``. ``cpu_kernels=True`` opts into the CPU-only kernels of
    :mod:`swinv2.cpu_kernels` (oneDNN linears, a hand-written attention backward for training): same values,
    faster on a CPU, inert on a GPU.
    """

    def __init__(
        self,
        version: str = "v2",
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        pretrained_window_sizes: int | Sequence = 0,
        checkpoint_activations: bool = False,
        attn_chunk_size: int | None = None,
        extra_norm_every: int = 0,
        fused_attn: bool = True,
        cpu_kernels: bool = False,
    ):
        super().__init__()
        img_size = _checked_size(version, img_size, patch_size, depths, num_heads)
        num_stages = len(depths)
        self.version, self.img_size, self.patch_size = version, img_size, patch_size
        self.num_classes, self.embed_dim, self.depths = num_classes, embed_dim, tuple(depths)
        self.num_features = int(embed_dim * 2 ** (num_stages - 1))

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.patch_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_grid[0] * self.patch_grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        windows = [to_2tuple(w) for w in _per_stage(window_size, num_stages, "window_size")]
        pretrained_per_stage = _per_stage(pretrained_window_sizes, num_stages, "pretrained_window_sizes")
        pretrained = [to_2tuple(w) if w else None for w in pretrained_per_stage]
        total = sum(depths)
        drop_path = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear stochastic-depth rule
        block_options = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                             fused_attn=fused_attn, attn_chunk_size=attn_chunk_size, cpu_kernels=cpu_kernels)
        self.stage_windows: list[Size2] = []
        layers, size, dim = [], self.patch_grid, embed_dim
        for i, depth in enumerate(depths):
            window, half_shift = clip_window(size, windows[i], (windows[i][0] // 2, windows[i][1] // 2))
            self.stage_windows.append(window)
            blocks = [
                SwinBlock(version, dim, num_heads[i], window, (0, 0) if j % 2 == 0 else half_shift,
                          drop_path=drop_path[sum(depths[:i]) + j], pretrained_window=pretrained[i],
                          extra_norm=bool(extra_norm_every) and (j + 1) % extra_norm_every == 0,
                          **block_options)
                for j in range(depth)
            ]
            last = i == num_stages - 1
            merging = None if last else PatchMerging(dim, version, CPULinear if cpu_kernels else nn.Linear)
            layers.append(SwinStage(blocks, merging))
            if not last:
                size, dim = (math.ceil(size[0] / 2), math.ceil(size[1] / 2)), dim * 2
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(self.num_features)
        linear = CPULinear if cpu_kernels else nn.Linear
        self.head = linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if version == "v2":  # each block starts as the identity (res-post-norm, authors' init)
            for norm in (n for stage in self.layers for b in stage.blocks for n in (b.norm1, b.norm2)):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)
        self.set_checkpoint_activations(checkpoint_activations)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that take no weight decay, found by module and shape, not by name patterns.

        Biases and all 1-D parameters (norms, V2 q/v biases), V2 ``logit_scale`` and the whole CPB MLP, V1
        relative position bias tables, the absolute position embedding: the lists of the authors' Swin and SimMIM
        training code, applied to the parameters themselves (their name-keyword matching misses the CPB MLP and
        ``logit_scale`` once SimMIM prefixes ``encoder.``).
        """
        exempt = {id(self.absolute_pos_embed)} if self.absolute_pos_embed is not None else set()
        for module in self.modules():
            if isinstance(module, WindowAttentionV2):
                exempt.add(id(module.logit_scale))
                exempt.update(id(p) for p in module.cpb_mlp.parameters())
            elif isinstance(module, WindowAttentionV1):
                exempt.add(id(module.relative_position_bias_table))
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or id(p) in exempt}

    @property
    def num_layers(self) -> int:
        """Layers for layer-wise LR decay: the embedding, every block, and the final norm and head."""
        return sum(self.depths) + 2

    def layer_ids(self) -> dict[str, int]:
        """Parameter name -> layer for layer-wise LR decay (BEiT, arXiv 2106.08254 sec. 3; SimMIM fine-tuning,
        arXiv 2111.09886 sec. 4.1).

        The patch embedding and absolute position embedding are layer 0; block j of stage s is
        ``sum(depths[:s]) + j + 1``; stage s's patch merging shares the layer of its last block; the final norm
        and head are the last layer, ``num_layers - 1``.
        """
        layer = {id(p): self.num_layers - 1 for p in self.parameters()}
        layer.update({id(p): 0 for p in self.patch_embed.parameters()})
        if self.absolute_pos_embed is not None:
            layer[id(self.absolute_pos_embed)] = 0
        start = 0
        for stage in self.layers:
            for j, block in enumerate(stage.blocks):
                layer.update({id(p): start + j + 1 for p in block.parameters()})
            start += len(stage.blocks)
            if stage.downsample is not None:
                layer.update({id(p): start for p in stage.downsample.parameters()})
        return {name: layer[id(p)] for name, p in self.named_parameters()}

    def set_checkpoint_activations(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (``torch.utils.checkpoint``, non-reentrant)."""
        for stage in self.layers:
            stage.checkpoint_activations = enabled

    def embed(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> patch tokens ``(B, H/p, W/p, C)`` (with the absolute embedding if any).

        With ``mask`` ``(B, H/p, W/p)`` (1 = masked) and ``mask_token`` ``(C,)``, masked tokens are replaced by the
        token before the position embedding is added, as in masked image modelling (SimMIM, arXiv 2111.09886 3.1).
        """
        x = self.patch_embed(x)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        if self.absolute_pos_embed is not None:
            x = x + self._absolute_pos_embed(x.shape[1:3])
        return self.pos_drop(x)

    def _absolute_pos_embed(self, size: Size2) -> torch.Tensor:
        grid, C = self.patch_grid, self.embed_dim
        pos = self.absolute_pos_embed.view(1, grid[0], grid[1], C)
        if tuple(size) != grid:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=tuple(size), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        return pos

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, H/p, W/p, C)`` -> final-norm features ``(B, H/32, W/32, 8C)``."""
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final-norm token features, channels-last ``(B, H/32, W/32, num_features)``."""
        return self.forward_tokens(self.embed(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Token features -> logits (global average pool, then the linear head)."""
        return self.head(x.mean(dim=(1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_stages(self, x: torch.Tensor, out_indices: Sequence[int] = (0, 1, 2, 3)) -> list[torch.Tensor]:
        """Per-stage feature maps, NCHW, taken after each stage's blocks and before its patch merging."""
        bad = [i for i in out_indices if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"out_indices {bad} are out of range: the model has stages 0..{len(self.layers) - 1}")
        x, outs = self.embed(x), []
        for i, stage in enumerate(self.layers):
            x = stage.forward_blocks(x)
            if i in out_indices:
                outs.append(x.permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return outs
