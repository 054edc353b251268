"""ModelScope T2V backbone on tiny random models: golden references are diffusers' TextToVideoSDPipeline and an
independent loop written from the official code's table (docs/algorithms.md §5), with diffusers' schedulers."""
import os

import pytest
import torch
import torch.nn.functional as F

from pipelines.config import resolve_params
from pipelines.generate import build_plan, generate

from .conftest import rel, tiny_backbone_fixtures
from .reference import encode, framewise_cfg, video_cfg

PROMPT = "A red kite dances over a windy beach."


ms_dir, ms = tiny_backbone_fixtures("modelscope", "ms_dir")


@pytest.mark.heavy
def test_standard_equals_diffusers_text_to_video_pipeline(ms, ms_dir):
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(os.path.join(ms_dir, "base"))
    pipe.scheduler = DDIMScheduler.from_pretrained(os.path.join(ms_dir, "base"), subfolder="scheduler",
                                                   clip_sample=False,
                                                   timestep_spacing="linspace", steps_offset=1)
    pipe.set_progress_bar_config(disable=True)
    p = resolve_params(dict(prompt=PROMPT, sampler="standard", seed=4, steps=5, frames=4, height=64, width=64,
                            guidance=9.0),
                       backbone="modelscope")
    ours = generate(ms, [p], decode=False)[0]
    ref = pipe(prompt=PROMPT, num_frames=4, height=64, width=64, num_inference_steps=5, guidance_scale=9.0,
               generator=torch.Generator("cpu").manual_seed(4), output_type="latent").frames
    assert ours.latents.shape == ref.shape == (1, 4, 4, 8, 8)
    assert rel(ours.latents, ref) < 1e-4


def _setup(bb, ms_dir, params, inverse_table: str):
    """diffusers' DDIM (the VDM's config, linspace grid) and DDIMInverse (from `inverse_table`'s folder) schedulers,
    and both models' text embeddings written directly."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    ddim = DDIMScheduler.from_pretrained(os.path.join(ms_dir, "base"), subfolder="scheduler", clip_sample=False,
                                         timestep_spacing="linspace", steps_offset=1)
    inv = DDIMInverseScheduler.from_pretrained(os.path.join(ms_dir, inverse_table), subfolder="scheduler")
    ddim.set_timesteps(params.steps)
    inv.set_timesteps(params.steps)
    emb_v = encode(bb.tokenizer, bb.text_encoder, ["", params.prompt])
    emb_i = encode(bb.image_tokenizer, bb.image_text_encoder, ["", params.prompt]).repeat_interleave(params.frames, 0)
    return ddim, inv, emb_v, emb_i


def _official_ms_loop(bb, ms_dir, params):
    """docs/algorithms.md §5, sub-steps 1-5 in the code's order; the IDM sub-steps fold frames, resize to 64x64,
    move there with the scheduler, and resize back."""
    n, f = params.steps, params.frames
    ddim, inv, emb_v, emb_i = _setup(bb, ms_dir, params, "image_model")
    vdm = video_cfg(bb.unet, emb_v)

    def idm_step(x, t, w, sched, move_t):
        b, ch, _, h, wd = x.shape
        flat = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * f, ch, h, wd), size=(64, 64), mode="nearest")
        u, c = bb.image_unet(torch.cat([flat, flat]), t, encoder_hidden_states=emb_i).sample.chunk(2)
        moved = sched.step(u + w * (c - u), move_t, flat).prev_sample
        back = F.interpolate(moved, size=(h, wd), mode="nearest")
        return back.reshape(b, f, ch, h, wd).permute(0, 2, 1, 3, 4)

    x = torch.randn((1, 4, f, params.height // 8, params.width // 8),
                    generator=torch.Generator("cpu").manual_seed(params.seed))
    delta = 1000 // n
    with torch.inference_mode():
        for t in ddim.timesteps.tolist():
            p, pp = max(0, t - delta), max(0, t - 2 * delta)
            x = idm_step(x, t, 4.0, ddim, t)
            x = ddim.step(vdm(x, p, 4.0), p, x).prev_sample
            x = idm_step(x, pp, -4.0, inv, p)
            x = inv.step(vdm(x, p, -4.0), t, x).prev_sample
            x = ddim.step(vdm(x, t, 7.5), t, x).prev_sample  # the ModelScope code's main CFG
    return x


def _clean_loop(bb, ms_dir, params):
    """The clean `ivmixed` zigzag (docs/sample.md "Presets"): IDM at t moving t -> t-Δ, VDM at t-Δ moving on, the two
    inverse moves back with CFG -4, then the main DDIM step (CFG 7.5); no resize; the exact-identity zigzag at t = 0
    skipped."""
    n, f = params.steps, params.frames
    ddim, inv, emb_v, emb_i = _setup(bb, ms_dir, params, "base")
    vdm, idm = video_cfg(bb.unet, emb_v), framewise_cfg(bb.image_unet, emb_i)

    x = torch.randn((1, 4, f, params.height // 8, params.width // 8),
                    generator=torch.Generator("cpu").manual_seed(params.seed))
    delta = 1000 // n
    with torch.inference_mode():
        for t in ddim.timesteps.tolist():
            p, pp = max(0, t - delta), max(0, t - 2 * delta)
            if t > 0:
                x = ddim.step(idm(x, t, 4.0), t, x).prev_sample
                x = ddim.step(vdm(x, p, 4.0), p, x).prev_sample
                x = inv.step(idm(x, pp, -4.0), p, x).prev_sample
                x = inv.step(vdm(x, p, -4.0), t, x).prev_sample
            x = ddim.step(vdm(x, t, 7.5), t, x).prev_sample
    return x


@pytest.mark.heavy
def test_ivmixed_clean_equals_an_independent_loop(ms, ms_dir):
    p = resolve_params(dict(prompt=PROMPT, sampler="ivmixed", seed=4, steps=4, frames=3, height=64, width=64),
                       backbone="modelscope")
    ours = generate(ms, [p], decode=False)[0]
    assert rel(ours.latents, _clean_loop(ms, ms_dir, p)) < 1e-4
    assert ours.calls == {"I": 6, "V": 10}  # t = 0 is the last grid point: its zigzag is skipped


@pytest.mark.heavy
def test_a_batched_row_equals_the_row_alone(ms):
    rows = [resolve_params(dict(prompt=prompt, seed=s, steps=3, frames=2, height=64, width=64), backbone="modelscope")
            for prompt, s in ((PROMPT, 1), ("A red kite over a beach.", 2))]
    together = generate(ms, rows, decode=False)
    for row, res in zip(rows, together):
        assert rel(res.latents, generate(ms, [row], decode=False)[0].latents) < 1e-5


@pytest.mark.heavy
@pytest.mark.parametrize("size", [64, 128])  # latents 8x8 and 16x16: the IDM path resizes to 64x64 and back
def test_ivmixed_ms_v1_equals_the_official_loop(ms, ms_dir, size):
    p = resolve_params(dict(prompt=PROMPT, sampler="ivmixed_ms_v1", seed=9, steps=4, frames=3, height=size, width=size,
                            idm_guidance="6,2,7"), backbone="modelscope")  # the code ignores CFG flags: +-4 stays
    ours = generate(ms, [p], decode=False)[0]
    ref = _official_ms_loop(ms, ms_dir, p)
    assert rel(ours.latents, ref) < 1e-4
    assert ours.calls == {"I": 8, "V": 12}


def test_paper_call_counts_for_50_steps(ms):
    p = resolve_params(dict(prompt=PROMPT, sampler="ivmixed_ms_v1", steps=50, frames=2, height=64, width=64),
                       backbone="modelscope")
    assert build_plan(ms, [p]).calls() == {"I": 100, "V": 150}  # docs/algorithms.md §5: 250 calls
    p = resolve_params(dict(prompt=PROMPT, sampler="ivmixed", steps=50, frames=2, height=64, width=64),
                       backbone="modelscope")
    assert build_plan(ms, [p]).calls() == {"I": 98, "V": 148}


def test_presets_name_their_backbone():
    with pytest.raises(ValueError, match="^sampler: preset 'ivmixed_ad_v1' reproduces the code of the animatediff "
                                         "backbone only"):
        resolve_params({"prompt": "x", "sampler": "ivmixed_ad_v1"}, backbone="modelscope")
    with pytest.raises(ValueError, match="^sampler: preset 'freenoise' runs on the animatediff backbone only"):
        resolve_params({"prompt": "x", "sampler": "freenoise"}, backbone="modelscope")
    with pytest.raises(ValueError, match="^sampler: preset 'ivmixed_ms_v1'"):
        resolve_params({"prompt": "x", "sampler": "ivmixed_ms_v1"}, backbone="animatediff")


def test_vdm_temporal_layers_are_live_and_idm_is_framewise(ms):
    x = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, :, 0] += 1.0
    emb = torch.randn(2, 77, 32)
    with torch.inference_mode():
        v0, v1 = (ms.unet(z, 500, encoder_hidden_states=emb).sample for z in (x, y))
    assert (v0[:, :, 3] - v1[:, :, 3]).abs().max() > 1e-3
    # the IDM denoiser the sampler uses sees each frame alone: changing frame 0 leaves frames 1..3 bit-identical
    idm = ms.denoisers([PROMPT], [""], frames=4, idm_text="own", fps=8)["I"]
    w = torch.tensor([4.0])
    with torch.inference_mode():
        i0, i1 = (idm(z[:1], 500, w) for z in (x, y))
    assert (i0[:, :, 0] - i1[:, :, 0]).abs().max() > 1e-3
    assert torch.equal(i0[:, :, 1:], i1[:, :, 1:])
