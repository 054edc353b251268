"""Independent building blocks for the reference loops: written from the papers and diffusers' documented behaviour,
importing nothing from the project (a reference never calls the code under test, not even its helpers)."""
from __future__ import annotations

from fractions import Fraction

import torch


def encode(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """What diffusers' pipelines feed the UNet: ids padded/truncated to the tokenizer's max length, last hidden
    state."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.inference_mode():
        return text_encoder(ids)[0]


def cfg_values(spec, n: int) -> list[float]:
    """Per-step CFG of a `W` or `BEGIN,END[,RHO]` spec (docs/algorithms.md §2): the Karras ramp
    w_i = (b^(1/ρ) + i/(n-1)·(e^(1/ρ) - b^(1/ρ)))^ρ, ρ = 7 unless given; a single number is constant."""
    parts = [float(Fraction(p)) for p in str(spec).split(",")]
    if len(parts) == 1:
        return [parts[0]] * n
    b, e, rho = (parts + [7.0])[:3]
    return [float((b ** (1 / rho) + i / max(n - 1, 1) * (e ** (1 / rho) - b ** (1 / rho))) ** rho) for i in range(n)]


def video_cfg(unet, emb: torch.Tensor):
    """ε̂ = u + w (c − u) of a video UNet on (B, C, F, h, w), both CFG halves in one call (negatives first)."""
    def eps(x, t, w):
        u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
        return u + w * (c - u)
    return eps


def framewise_cfg(unet, emb: torch.Tensor):
    """The same for an image UNet with the frames folded into the batch; `emb` holds one row per folded frame."""
    def eps(x, t, w):
        b, ch, f, h, wd = x.shape
        flat = torch.cat([x, x]).permute(0, 2, 1, 3, 4).reshape(2 * b * f, ch, h, wd)
        out = unet(flat, t, encoder_hidden_states=emb).sample
        u, c = out.reshape(2 * b, f, ch, h, wd).permute(0, 2, 1, 3, 4).chunk(2)
        return u + w * (c - u)
    return eps
