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
        return text_encoder(ids.to(text_encoder.device))[0]


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
    def eps(x, t, w):  # the UNet in its own dtype, the latents float32 (a no-op for a float32 UNet)
        u, c = unet(torch.cat([x, x]).to(unet.dtype), t, encoder_hidden_states=emb).sample.float().chunk(2)
        return u + w * (c - u)
    return eps


def framewise_cfg(unet, emb: torch.Tensor):
    """The same for an image UNet with the frames folded into the batch; `emb` holds one row per folded frame."""
    def eps(x, t, w):
        b, ch, f, h, wd = x.shape
        flat = torch.cat([x, x]).permute(0, 2, 1, 3, 4).reshape(2 * b * f, ch, h, wd).to(unet.dtype)
        out = unet(flat, t, encoder_hidden_states=emb).sample.float()
        u, c = out.reshape(2 * b, f, ch, h, wd).permute(0, 2, 1, 3, 4).chunk(2)
        return u + w * (c - u)
    return eps


def animatediff_ivmixed_loop(models, ddim_config: dict, inverse_config: dict, *, prompt: str, seed: int, steps: int,
                             frames: int, height: int, width: int, legacy: bool, idm_guidance=4, vdm_guidance=4,
                             guidance=7.5) -> torch.Tensor:
    """IV-Mixed on AnimateDiff in the official code's shape (docs/algorithms.md §2, "Timestep labels"): diffusers'
    DDIMScheduler.step and DDIMInverseScheduler.step called with the code's timestep arguments, raw UNet calls, CFG
    written out. `models` holds the UNets, tokenizers and text encoders (`unet`, `image_unet`, `tokenizer`,
    `text_encoder`, `image_tokenizer`, `image_text_encoder`); CFG values, text embeddings and schedulers come from the
    inputs and diffusers. `legacy`: the AnimateDiff code's labels (`ivmixed_ad_v1`); else the ModelScope/VC chain."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    ddim = DDIMScheduler.from_config(ddim_config, clip_sample=False, timestep_spacing="linspace", steps_offset=1)
    inv = DDIMInverseScheduler.from_config(inverse_config)
    ddim.set_timesteps(steps)
    inv.set_timesteps(steps)
    emb_v = encode(models.tokenizer, models.text_encoder, ["", prompt])
    emb_i = emb_v if legacy else encode(models.image_tokenizer, models.image_text_encoder, ["", prompt])
    emb_v, emb_i = emb_v.repeat_interleave(frames, 0), emb_i.repeat_interleave(frames, 0)

    vdm, idm = video_cfg(models.unet, emb_v), framewise_cfg(models.image_unet, emb_i)

    x = torch.randn((1, 4, frames, height // 8, width // 8),
                    generator=torch.Generator("cpu").manual_seed(seed)).to(models.unet.device)
    delta = 1000 // steps
    w_i, w_v = cfg_values(idm_guidance, steps), cfg_values(vdm_guidance, steps)
    with torch.inference_mode():
        for i, t in enumerate(ddim.timesteps.tolist()):
            p, pp = max(0, t - delta), max(0, t - 2 * delta)
            if legacy:  # AD: IDM labelled p stepping p->pp, then VDM labelled t stepping t->p
                x = ddim.step(idm(x, p, w_i[i]), p, x).prev_sample
                x = ddim.step(vdm(x, t, w_v[i]), t, x).prev_sample
            elif t > 0:  # MS/VC chain; at t = 0 the zigzag is an exact identity and is skipped
                x = ddim.step(idm(x, t, w_i[i]), t, x).prev_sample
                x = ddim.step(vdm(x, p, w_v[i]), p, x).prev_sample
            if legacy or t > 0:
                x = inv.step(idm(x, pp, -w_i[i]), p, x).prev_sample
                x = inv.step(vdm(x, p, -w_v[i]), t, x).prev_sample
            x = ddim.step(vdm(x, t, guidance), t, x).prev_sample
    return x
