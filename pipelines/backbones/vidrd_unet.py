"""VidRD's video UNet (docs/algorithms.md §9) as a diffusers model: SD-2.1-base's spatial layers plus temporal
convolutions and temporal attention, with parameter names equal to the `unet.*` keys of the published `ModelT2V.pth`
(so a converted checkpoint loads strictly).

Layout per block: resnet -> temporal conv -> transformer (mid block: resnet0 -> tconv0 -> attention -> resnet1 ->
tconv1). Resnet GroupNorms and `conv_norm_out` take their statistics over all frames of a sample together; the
transformer input GroupNorm is per frame. Inside each transformer block, after cross-attention: an interleaved sin/cos
frame embedding is added to the residual stream, then LayerNorm and self-attention over the frames of each position.
A temporal conv layer is 4 x [GroupNorm(32), SiLU, Dropout(0.1), Conv3d (3, 1, 1)] plus identity. With one frame the
temporal layers are off. `attention_head_dim` is SD-2.1's per-level head count (its legacy meaning).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.nn import functional as F

from .norms import frame_joint_group_norm

TEMPORAL_GROUPS = 32  # hard-coded in the official temporal conv layers, whatever norm_num_groups says


def frame_embedding(dim: int, frames: int) -> torch.Tensor:
    """(F, dim) sinusoidal frame positions: sin at even, cos at odd channels, frequencies 10000^(-2i/dim)."""
    pos = torch.arange(frames, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(frames, dim)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out


class TemporalConv(nn.Module):
    """4 x [GroupNorm(32), SiLU, Dropout, Conv3d (3, 1, 1)] over (B, C, F, h, w), plus the identity."""

    def __init__(self, channels: int, dropout: float = 0.1, layers: int = 4):
        super().__init__()
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.GroupNorm(TEMPORAL_GROUPS, channels), nn.SiLU(), nn.Dropout(dropout),
                     nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))]
        self.convs = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        if frames == 1:
            return x
        bf, c, h, w = x.shape
        v = x.reshape(bf // frames, frames, c, h, w).transpose(1, 2)
        y = v
        for m in self.convs:
            y = m(y)
        return (v + y).transpose(1, 2).reshape(x.shape)


class Resnet(nn.Module):
    """SD's resnet block on folded frames, its two GroupNorms pooled over the frames of a sample."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.conv1(F.silu(frame_joint_group_norm(self.norm1, x, frames)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(frame_joint_group_norm(self.norm2, h, frames))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Block(nn.Module):
    """Spatial self-attention, cross-attention, temporal attention, feed-forward (keys as the checkpoint's)."""

    def __init__(self, dim: int, heads: int, cross_dim: int, upcast: bool, temporal: bool, temp_embed: bool):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, upcast_attention=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim=cross_dim, heads=heads, dim_head=head_dim,
                               upcast_attention=upcast)
        self.temp_embed = temp_embed
        if temporal:
            self.temp_norm = nn.LayerNorm(dim)
            self.temp_attn = Attention(dim, heads=heads, dim_head=head_dim, upcast_attention=upcast)
        else:
            self.temp_attn = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, h: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.attn1(self.norm1(h)) + h
        h = self.attn2(self.norm2(h), encoder_hidden_states=context) + h
        if self.temp_attn is not None and frames > 1:
            bf, n, c = h.shape
            v = h.reshape(bf // frames, frames, n, c)
            if self.temp_embed:
                v = v + frame_embedding(c, frames).to(v)[None, :, None, :]
            t = v.permute(0, 2, 1, 3).reshape(-1, frames, c)  # (B*N, F, C): attention across frames
            t = self.temp_attn(self.temp_norm(t)) + t
            h = t.reshape(bf // frames, n, frames, c).permute(0, 2, 1, 3).reshape(bf, n, c)
        return self.ff(self.norm3(h)) + h


class Transformer(nn.Module):
    """Per-frame GroupNorm (eps 1e-6), projection in, one `Block`, projection out, residual."""

    def __init__(self, channels: int, heads: int, groups: int, cross_dim: int, linear: bool, upcast: bool,
                 temporal: bool, temp_embed: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([Block(channels, heads, cross_dim, upcast, temporal, temp_embed)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, hh, ww = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(bf, hh * ww, c)
        if self.linear:
            h = self.proj_in(h)
        h = self.transformer_blocks[0](h, context, frames)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(bf, hh, ww, c).permute(0, 3, 1, 2)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class _Down(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class Level(nn.Module):
    """One down or up level: (resnet, temporal conv, transformer?) x layers, then a down/up sampler."""

    def __init__(self, ins: list[int], cout: int, temb: int, cfg: dict, heads: int | None, sampler: nn.Module | None,
                 kind: str):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(c, cout, temb, cfg["groups"], cfg["eps"]) for c in ins])
        if cfg["temp_conv"]:
            self.temp_convs = nn.ModuleList([TemporalConv(cout) for _ in ins])
        if heads is not None:
            self.attentions = nn.ModuleList([
                Transformer(cout, heads, cfg["groups"], cfg["cross"], cfg["linear"], cfg["upcast"], True,
                            cfg["temp_embed"])
                for _ in ins])
        if sampler is not None:
            setattr(self, "downsamplers" if kind == "down" else "upsamplers", nn.ModuleList([sampler]))

    def layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        x = self.resnets[i](x, temb, frames)
        if hasattr(self, "temp_convs"):
            x = self.temp_convs[i](x, frames)
        if hasattr(self, "attentions"):
            x = self.attentions[i](x, context, frames)
        return x


class Mid(nn.Module):
    def __init__(self, c: int, temb: int, cfg: dict, heads: int):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(c, c, temb, cfg["groups"], cfg["eps"]) for _ in range(2)])
        if cfg["temp_conv"]:
            self.temp_convs = nn.ModuleList([TemporalConv(c) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer(c, heads, cfg["groups"], cfg["cross"], cfg["linear"],
                                                     cfg["upcast"], True, cfg["temp_embed"])])

    def forward(self, x, temb, context, frames):
        for i in range(2):
            if i:
                x = self.attentions[0](x, context, frames)
            x = self.resnets[i](x, temb, frames)
            if hasattr(self, "temp_convs"):
                x = self.temp_convs[i](x, frames)
        return x


@dataclass
class VidRDUNetOutput(BaseOutput):
    sample: torch.Tensor


class VidRDUNet(ModelMixin, ConfigMixin):
    """ε(x, t, text) on (B, C, F, h, w) latents; text (B, L, D) is shared by the frames of a sample."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, sample_size: int | None = None, in_channels: int = 4, out_channels: int = 4,
                 flip_sin_to_cos: bool = True, freq_shift: int = 0,
                 down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280), layers_per_block: int = 2,
                 downsample_padding: int = 1, norm_num_groups: int = 32, norm_eps: float = 1e-5,
                 cross_attention_dim: int = 1024, attention_head_dim: int | tuple[int, ...] = (5, 10, 20, 20),
                 use_linear_projection: bool = True, upcast_attention: bool = False,
                 add_temp_embed: bool = True, add_temp_conv: bool = True):
        super().__init__()
        ch = list(block_out_channels)
        heads = [attention_head_dim] * len(ch) if isinstance(attention_head_dim, int) else list(attention_head_dim)
        temb = ch[0] * 4
        cfg = dict(groups=norm_num_groups, eps=norm_eps, cross=cross_attention_dim, linear=use_linear_projection,
                   upcast=upcast_attention, temp_embed=add_temp_embed, temp_conv=add_temp_conv)
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for i, kind in enumerate(down_block_types):
            last = i == len(ch) - 1
            ins = [prev] + [ch[i]] * (layers_per_block - 1)
            self.down_blocks.append(Level(ins, ch[i], temb, cfg, heads[i] if kind.startswith("CrossAttn") else None,
                                          None if last else _Down(ch[i], downsample_padding), "down"))
            prev = ch[i]
        self.mid_block = Mid(ch[-1], temb, cfg, heads[-1])
        rch, rheads = ch[::-1], heads[::-1]
        self.up_blocks = nn.ModuleList()
        prev = rch[0]
        for i, kind in enumerate(up_block_types):
            last = i == len(ch) - 1
            skip_in = rch[min(i + 1, len(ch) - 1)]
            ins = [(prev if j == 0 else rch[i]) + (skip_in if j == layers_per_block else rch[i])
                   for j in range(layers_per_block + 1)]
            self.up_blocks.append(Level(ins, rch[i], temb, cfg, rheads[i] if kind.startswith("CrossAttn") else None,
                                        None if last else _Up(rch[i]), "up"))
            prev = rch[i]
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, ch[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(ch[0], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True) -> VidRDUNetOutput | tuple:
        b, c, f, hh, ww = sample.shape
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        temb = self.time_embedding(self.time_proj(t).to(self.dtype))  # the official UNet casts these to its dtype
        temb = temb.repeat_interleave(f, dim=0)
        context = encoder_hidden_states.to(self.dtype).repeat_interleave(f, dim=0)
        x = sample.to(self.dtype).permute(0, 2, 1, 3, 4).reshape(b * f, c, hh, ww)
        x = self.conv_in(x)
        skips = [x]
        for level in self.down_blocks:
            for i in range(len(level.resnets)):
                x = level.layer(i, x, temb, context, f)
                skips.append(x)
            if hasattr(level, "downsamplers"):
                x = level.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block(x, temb, context, f)
        for level in self.up_blocks:
            for i in range(len(level.resnets)):
                x = level.layer(i, torch.cat([x, skips.pop()], dim=1), temb, context, f)
            if hasattr(level, "upsamplers"):
                x = level.upsamplers[0](x, skips[-1].shape[-2:] if skips else None)
        x = self.conv_out(F.silu(frame_joint_group_norm(self.conv_norm_out, x, f)))
        out = x.reshape(b, f, -1, hh, ww).permute(0, 2, 1, 3, 4)
        return VidRDUNetOutput(sample=out) if return_dict else (out,)
