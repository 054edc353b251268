"""The VideoCrafter2 UNet of the public diffusers conversion (docs/algorithms.md §5): diffusers' UNet3DConditionModel
plus fps conditioning, with parameter names equal to the checkpoint's state-dict keys (`fps_proj` has no weights;
`fps_embedding.linear_1/linear_2`), so `from_pretrained` on the published folder loads with no missing or
unexpected keys."""
from __future__ import annotations

import torch
from diffusers import UNet3DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps


class UNet3DVideoCrafterConditionModel(UNet3DConditionModel):
    """forward(sample (B, C, F, h, w), timestep, encoder_hidden_states (B, L, D), fps) — fps is the 4th argument.
    The per-video conditioning is MLP_t(sin t) + MLP_fps(sin fps) (docs/algorithms.md §5)."""

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D",
                                             "DownBlock3D"),
        up_block_types: tuple[str, ...] = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D",
                                           "CrossAttnUpBlock3D"),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int | tuple[int] = 64,
        num_attention_heads: int | tuple[int] | None = None,
        time_cond_proj_dim: int | None = None,
        fps_cond: bool = True,
    ):
        super().__init__(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                         down_block_types=down_block_types, up_block_types=up_block_types,
                         block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                         downsample_padding=downsample_padding, mid_block_scale_factor=mid_block_scale_factor,
                         act_fn=act_fn, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
                         cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
                         num_attention_heads=num_attention_heads, time_cond_proj_dim=time_cond_proj_dim)
        if fps_cond:
            self.fps_proj = Timesteps(block_out_channels[0], True, 0)
            self.fps_embedding = TimestepEmbedding(block_out_channels[0], block_out_channels[0] * 4, act_fn=act_fn)

    def forward(self, sample, timestep, encoder_hidden_states, fps=None, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None, return_dict: bool = True):
        if not self.config.fps_cond:
            return super().forward(sample, timestep, encoder_hidden_states, class_labels, timestep_cond, attention_mask,
                                   cross_attention_kwargs, down_block_additional_residuals,
                                   mid_block_additional_residual, return_dict)
        if fps is None:
            raise ValueError("fps: this UNet is fps-conditioned; pass fps (VideoCrafter2 code: 24)")
        b = sample.shape[0]
        fps_t = torch.as_tensor(fps, device=sample.device)
        fps_t = (fps_t.expand(b) if fps_t.dim() == 0 else fps_t).to(
            torch.int64 if not torch.is_floating_point(fps_t) else torch.float64)
        fps_emb = self.fps_embedding(self.fps_proj(fps_t).to(self.dtype))  # (B, D), added before the per-frame repeat

        def add_fps(_module, _inputs, out):
            return out + fps_emb

        handle = self.time_embedding.register_forward_hook(add_fps)
        try:
            return super().forward(sample, timestep, encoder_hidden_states, class_labels, timestep_cond, attention_mask,
                                   cross_attention_kwargs, down_block_additional_residuals,
                                   mid_block_additional_residual, return_dict)
        finally:
            handle.remove()
