"""The comparators of the sampler lab (docs/lab.md) on the tiny AnimateDiff set, each against diffusers' own
implementation from the same noise: FreeU (`AnimateDiffPipeline.enable_freeu`), FreeInit
(`AnimateDiffPipeline.enable_free_init`), guidance on part of the schedule (the documented dynamic-CFG callback) and
PAG (`AnimateDiffPAGPipeline`); FreeU composed with IV-Mixed; the FreeInit filter against a direct evaluation of its
formula; the options' grammar."""
import pytest
import torch

from pipelines.config import resolve_params
from pipelines.freeinit import butterworth_lowpass
from pipelines.freenoise import shuffle_noise
from pipelines.generate import build_plan, generate
from pipelines.grammar import parse_variant

PROMPT = "Two horses race across a grassy field at sunset."
FREEU = dict(b1=1.2, b2=1.4, s1=0.9, s2=0.2)


def _ours(backbone, small, seed=0, **kw):
    return generate(backbone, [resolve_params(dict(prompt=PROMPT, seed=seed, **small, **kw))])[0]


def _theirs(pipe, small, seed=0, output_type="latent"):
    return pipe(prompt=PROMPT, num_frames=small["frames"], height=small["height"], width=small["width"],
                num_inference_steps=small["steps"], guidance_scale=7.5, output_type=output_type,
                generator=torch.Generator("cpu").manual_seed(seed)).frames


@pytest.mark.heavy
def test_freeu_equals_diffusers_animatediff_pipeline_with_enable_freeu(ad_backbone, ad_pipe, small):
    ours = _ours(ad_backbone, small, sampler="freeu")
    ad_pipe.enable_freeu(**FREEU)
    try:
        ref = _theirs(ad_pipe, small)
    finally:
        ad_pipe.disable_freeu()
    plain = _theirs(ad_pipe, small)
    assert torch.equal(ours.latents, ref)  # the same hooks on the same UNet, from the same noise
    assert not torch.allclose(ref, plain, atol=1e-3)  # FreeU changes the result: the check above can fail
    assert ours.calls == {"I": 0, "V": small["steps"]}
    # the hooks are removed after the batch: the next row of the actor samples without FreeU
    assert torch.equal(_ours(ad_backbone, small, sampler="standard").latents, plain)


@pytest.mark.heavy
def test_freeinit_equals_diffusers_animatediff_pipeline_with_enable_free_init(ad_backbone, ad_pipe, small):
    ours = _ours(ad_backbone, small, seed=3, sampler="standard", variant="standard@freeinit=2")
    ad_pipe.enable_free_init(num_iters=2, use_fast_sampling=False, method="butterworth", order=4,
                             spatial_stop_frequency=0.25, temporal_stop_frequency=0.25)
    try:
        ref = _theirs(ad_pipe, small, seed=3)
    finally:
        ad_pipe.disable_free_init()
    once = _theirs(ad_pipe, small, seed=3)
    assert torch.equal(ours.latents, ref)  # the same filter, FFTs and noise draws in the same order
    assert not torch.allclose(ref, once, atol=1e-3)  # the second run starts elsewhere: the check above can fail
    assert ours.calls == {"I": 0, "V": 2 * small["steps"]}


@pytest.mark.heavy
def test_freeu_inside_iv_mixed_touches_only_the_video_model_calls(ad_backbone, small):
    plain = _ours(ad_backbone, small, sampler="ivmixed")
    mixed = _ours(ad_backbone, small, sampler="ivmixed_freeu")
    assert mixed.calls == plain.calls and not torch.allclose(mixed.latents, plain.latents, atol=1e-3)
    # FreeU with unit scales is the identity up to the FFT's rounding: the composition adds nothing else
    unit = _ours(ad_backbone, small, sampler="ivmixed", variant="down:IV-IV@freeu=1/1/1/1")
    assert ((unit.latents - plain.latents).norm() / plain.latents.norm()).item() < 1e-5
    # the image model never gets the hooks
    assert getattr(ad_backbone.image_unet.up_blocks[0], "b1", None) is None


def test_the_freeinit_filter_is_the_butterworth_formula():
    f, h, w = 4, 6, 8
    mask = butterworth_lowpass(f, h, w, order=4, spatial=0.25, temporal=0.5)
    for t, y, x in [(0, 0, 0), (2, 3, 4), (3, 5, 1), (1, 2, 7)]:
        d2 = ((0.25 / 0.5) * (2 * t / f - 1)) ** 2 + (2 * y / h - 1) ** 2 + (2 * x / w - 1) ** 2
        assert mask[t, y, x].item() == pytest.approx(1 / (1 + (d2 / 0.25**2) ** 4), rel=1e-6)
    assert mask[2, 3, 4].item() == 1.0  # the centre of the shifted spectrum: the lowest frequency passes whole
    assert torch.equal(butterworth_lowpass(2, 2, 2, spatial=0), torch.zeros(2, 2, 2))


def test_comparator_options_parse_print_and_refuse_bad_values():
    v = parse_variant("down:IV-IV@freeu=1.2/1.4/0.9/0.2,freeinit=3").variant
    assert (v.freeu, v.freeinit) == ((1.2, 1.4, 0.9, 0.2), 3) and parse_variant(v.pattern()).variant == v
    assert parse_variant("standard@freeinit=2").variant.pattern() == "standard@freeinit=2"
    n = parse_variant("down:IV-IV@freenoise=24").variant
    assert n.freenoise == (24, 4) and n.pattern() == "down:IV-IV@freenoise=24/4"
    assert parse_variant(n.pattern()).variant == n
    e = parse_variant("standard@elevator=0.1/0.3/0.5/0.7").variant
    assert e.elevator == (0.1, 0.3, 0.5, 0.7) and parse_variant(e.pattern()).variant == e
    c = parse_variant("IV-IV@cfg=2..4").variant
    assert c.cfg.text() == "2..4" and parse_variant(c.pattern()).variant == c
    for bad, msg in [("standard@freeu=1/2", "four numbers"), ("standard@freeinit=0", "from 1 to 10"),
                     ("standard@freeu=a/b/c/d", "four numbers"), ("standard@cfg=0.5..0.2", "fractions need"),
                     ("standard@pag=0", "scale > 0"), ("standard@pag=3,cfg=0.0..0.5", "does not combine"),
                     ("standard@freenoise=16/17", "no longer than"), ("standard@freenoise=x", "window length"),
                     ("standard@elevator=0.5/0.3", "increasing fractions"), ("standard@elevator=1.0", "in \\[0, 1\\)"),
                     ("IV-IV@elevator=0.5", "no zigzag letters"), ("standard@elevator=0.5,pag=3", "no zigzag")]:
        with pytest.raises(ValueError, match=msg):
            parse_variant(bad)


@pytest.mark.heavy
def test_guidance_on_part_of_the_schedule_equals_diffusers_dynamic_cfg(ad_backbone, ad_pipe, small):
    """diffusers' documented dynamic classifier-free guidance: a step-end callback turns guidance off after 40 % of
    the steps (the pipeline then runs the UNet on the prompt embeddings alone), against the `cfg_interval` preset."""
    ours = _ours(ad_backbone, small, seed=5, sampler="cfg_interval")
    stop = int(small["steps"] * 0.4)

    def callback(pipe, i, t, kwargs):
        if i == stop:  # after step `stop`: guidance off from the next step on
            pipe._guidance_scale = 1.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs

    ref = ad_pipe(prompt=PROMPT, num_frames=small["frames"], height=small["height"], width=small["width"],
                  num_inference_steps=small["steps"], guidance_scale=7.5, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(5), callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["prompt_embeds"]).frames
    assert torch.equal(ours.latents, ref)
    assert not torch.equal(ref, _theirs(ad_pipe, small, seed=5))  # guidance mattered on the later steps
    guided = stop + 1
    assert ours.calls == {"I": 0, "V": guided, "V_cond": small["steps"] - guided}
    assert ours.nfe == 2 * guided + (small["steps"] - guided)
    whole = _ours(ad_backbone, small, seed=5, sampler="standard")
    assert ours.flops == pytest.approx(whole.flops - (small["steps"] - guided) * (whole.flops - _decode(ad_backbone,
                                                                                                          small))
                                       / small["steps"] / 2, rel=1e-9)
    # guidance on every step is plain standard, bit for bit
    every = _ours(ad_backbone, small, seed=5, sampler="standard", variant="standard@cfg=0.0..1.0")
    assert torch.equal(every.latents, whole.latents) and every.calls == whole.calls


def _decode(backbone, small) -> float:
    from pipelines.cost import backbone_costs

    return backbone_costs(backbone, small["frames"], small["height"], small["width"], 8).decode


@pytest.mark.heavy
def test_pag_equals_diffusers_animatediff_pag_pipeline(ad_backbone, ad_pipe, small):
    from diffusers import AnimateDiffPAGPipeline

    pag = AnimateDiffPAGPipeline(vae=ad_pipe.vae, text_encoder=ad_pipe.text_encoder, tokenizer=ad_pipe.tokenizer,
                                 unet=ad_pipe.unet, motion_adapter=ad_pipe.motion_adapter, scheduler=ad_pipe.scheduler)
    pag.set_progress_bar_config(disable=True)
    ours = _ours(ad_backbone, small, seed=2, sampler="pag")
    ref = pag(prompt=PROMPT, num_frames=small["frames"], height=small["height"], width=small["width"],
              num_inference_steps=small["steps"], guidance_scale=7.5, pag_scale=3.0, output_type="latent",
              generator=torch.Generator("cpu").manual_seed(2)).frames
    assert torch.equal(ours.latents, ref)  # the same processors on the same layers, from the same noise
    assert not torch.allclose(ref, _theirs(ad_pipe, small, seed=2), atol=1e-3)  # PAG changed the result
    assert ours.calls == {"I": 0, "V": 0, "V_pag": small["steps"]} and ours.nfe == 3 * small["steps"]
    assert len(ad_backbone.pag_layers()) >= 1
    # the processors are restored: plain sampling after a PAG batch is diffusers' plain pipeline again
    assert torch.equal(_ours(ad_backbone, small, seed=2, sampler="standard").latents, _theirs(ad_pipe, small, seed=2))


@pytest.mark.heavy
@pytest.mark.parametrize("frames", [40, 38])  # 38: the last window is cut by the video's end (diffusers' own case)
def test_freenoise_equals_diffusers_animatediff_pipeline_with_enable_free_noise(ad_backbone, ad_pipe, frames):
    """Rows longer than the tiny motion adapter's 32 frames: FreeNoise's windows of 16 every 4, against
    `AnimateDiffPipeline.enable_free_noise` (its defaults) from the same seed."""
    long = dict(steps=3, frames=frames, height=32, width=32)
    assert ad_backbone.max_frames == 32
    blocks = len(ad_backbone.free_noise_blocks())
    ours = _ours(ad_backbone, long, seed=4, sampler="freenoise")
    ad_pipe.enable_free_noise(context_length=16, context_stride=4)
    try:
        ref = _theirs(ad_pipe, long, seed=4)
    finally:
        ad_pipe.disable_free_noise()
    assert torch.equal(ours.latents, ref)  # the same windows, weights, shuffled noise and per-frame text
    assert ours.calls == {"I": 0, "V": long["steps"]}
    # the noise was rescheduled (frames 16..19 are frames 0..3 shuffled), so the equality above needs it
    g = torch.Generator("cpu").manual_seed(4)
    noise = torch.randn((1, 4, frames, 4, 4), generator=g)
    shuffled = shuffle_noise(noise, [g], 16, 4)
    assert torch.equal(shuffled[:, :, :16], noise[:, :, :16]) and not torch.equal(shuffled, noise)
    assert sorted(shuffled[0, 0, 16:20, 0, 0].tolist()) == sorted(noise[0, 0, 0:4, 0, 0].tolist())
    # the motion modules are back after the batch; plain sampling past the frame limit is refused
    assert len(ad_backbone.free_noise_blocks()) == blocks > 0
    # a row no longer than the window is sampled as without FreeNoise, bit for bit
    short = dict(steps=3, frames=8, height=32, width=32)
    assert torch.equal(_ours(ad_backbone, short, seed=4, sampler="freenoise").latents,
                       _ours(ad_backbone, short, seed=4, sampler="standard").latents)
    with pytest.raises(ValueError, match="at most 32 frames.*freenoise"):
        resolve_params(dict(prompt=PROMPT, sampler="standard", **long), structure=ad_backbone.structure)


def _videoelevator_reference(ad_pipe, image_unet, image_tok, image_enc, seed: int, steps: int, frames: int, size: int,
                             fractions=(0.1, 0.3, 0.5, 0.7)) -> torch.Tensor:
    """VideoElevator written from the authors' pipeline (github.com/YBYBZhang/VideoElevator) with diffusers' parts:
    the image UNet with diffusers' own Text2Video-Zero cross-frame processor (each frame's keys and values from its
    video's first frame), DDIMScheduler.step for the image and video model's moves and its pred_original_sample,
    the DDPM forward closed form for the re-noising, the DDIM inversion (ε at the level each move goes to) and the
    PnP correction in their formulas; the project's choices where docs/lab.md states them (refining steps 0.1/0.3/
    0.5/0.7 of the run, 0.16 of the steps per refinement, Gaussian low-pass 1.0/0.5 skipped on the last refinement,
    mixed prior with alpha 1, inversion and correction on the conditional ε)."""
    import math

    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
        CrossFrameAttnProcessor2_0,
    )

    from tests.reference import encode

    sched = DDIMScheduler.from_config(ad_pipe.scheduler.config)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    ac = sched.alphas_cumprod

    def level(k):
        return ac[ts[k]] if k < steps else sched.final_alpha_cumprod

    def after(k):  # where DDIMScheduler.step from step k lands: t_k - 1000 // steps
        prev = ts[k] - 1000 // steps
        return ac[prev] if prev >= 0 else sched.final_alpha_cumprod

    g = torch.Generator("cpu").manual_seed(seed)
    shape = (1, 4, frames, size // 8, size // 8)
    x = torch.randn(shape, generator=g)
    x = (torch.randn((1, 4, 1, size // 8, size // 8), generator=g) + x) / math.sqrt(2)
    emb_i = encode(image_tok, image_enc, ["", PROMPT])  # negatives first
    emb_v = encode(ad_pipe.tokenizer, ad_pipe.text_encoder, ["", PROMPT])
    saved = image_unet.attn_processors

    def image(z, t, guided):
        flat = z[0].permute(1, 0, 2, 3)  # (F, C, h, w)
        image_unet.set_attn_processor(CrossFrameAttnProcessor2_0(batch_size=2 if guided else 1))
        if guided:
            text = emb_i.repeat_interleave(frames, 0)
            u, c = image_unet(torch.cat([flat, flat]), t, encoder_hidden_states=text).sample.chunk(2)
            e = u + 7.5 * (c - u)
        else:
            e = image_unet(flat, t, encoder_hidden_states=emb_i[1:].repeat_interleave(frames, 0)).sample
        return e.permute(1, 0, 2, 3).unsqueeze(0)

    def video(z, t):
        u, c = ad_pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=emb_v.repeat_interleave(frames, 0)
                            ).sample.chunk(2)
        return u + 7.5 * (c - u)

    def ddim(z, e, a, b):
        return b**0.5 * (z - (1 - a) ** 0.5 * e) / a**0.5 + (1 - b) ** 0.5 * e

    f = 2 * torch.arange(frames, dtype=torch.float64) / frames - 1
    s = 2 * torch.arange(size // 8, dtype=torch.float64) / (size // 8) - 1
    mask = torch.exp(-(f[:, None, None] ** 2) / (2 * 0.5**2) - (s[None, :, None] ** 2 + s[None, None, :] ** 2) / 2)
    refine = sorted({min(steps - 1, round(q * steps)) for q in fractions})
    sub = max(1, round(0.16 * steps))
    inv = {}
    try:
        with torch.inference_mode():
            for i, t in enumerate(ts):
                e = image(x, t, True)
                out = sched.step(e, t, x)
                x0, nxt = out.pred_original_sample, out.prev_sample
                if i in refine:
                    if i != refine[-1]:
                        spec = torch.fft.fftshift(torch.fft.fftn(x0, dim=(-3, -2, -1)), dim=(-3, -2, -1)) * mask.float()
                        x0 = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=(-3, -2, -1)), dim=(-3, -2, -1)).real
                    z = level(i) ** 0.5 * x0 + (1 - level(i)) ** 0.5 * torch.randn(shape, generator=g)
                    for k in range(i, min(i + sub, steps)):
                        out = sched.step(video(z, ts[k]), ts[k], z)
                        z, refined = out.prev_sample, out.pred_original_sample
                    y, inv = refined, {steps: refined}
                    for j in range(steps - 1, i, -1):
                        y = ddim(y, image(y, ts[j], False), level(j + 1), level(j))
                        inv[j] = y
                    nxt = y
                elif i in inv and i + 1 in inv:
                    nxt = nxt + inv[i + 1] - ddim(inv[i], image(inv[i], t, False), level(i), after(i))
                x = nxt
    finally:
        image_unet.set_attn_processor(saved)
    return x


@pytest.mark.heavy
def test_videoelevator_equals_a_reference_loop_over_diffusers_parts(ad_backbone, ad_pipe):
    size, frames, steps = 32, 4, 10
    ours = _ours(ad_backbone, dict(steps=steps, frames=frames, height=size, width=size), seed=6,
                 sampler="videoelevator")
    ref = _videoelevator_reference(ad_pipe, ad_backbone.image_unet, ad_backbone.image_tokenizer,
                                   ad_backbone.image_text_encoder, 6, steps, frames, size)
    assert ((ours.latents - ref).norm() / ref.norm()).item() < 1e-4
    # 4 refinements at steps 1, 3, 5, 7 of 10, 2 video-model steps each; inversions 8+6+4+2, corrections at 2,4,6,8,9
    assert ours.calls == {"I": 10, "V": 8, "I_cond": 25}
    p = resolve_params(dict(prompt=PROMPT, sampler="videoelevator", steps=steps, frames=frames, height=size,
                            width=size))
    assert build_plan(ad_backbone, [p]).calls() == ours.calls  # what the job counts before sampling
    standard = _ours(ad_backbone, dict(steps=steps, frames=frames, height=size, width=size), seed=6)
    assert not torch.allclose(standard.latents, ours.latents, atol=1e-2)
    # the image UNet's own processors are back after the batch
    assert not any("FirstFrame" in type(p).__name__ for p in ad_backbone.image_unet.attn_processors.values())


def test_videoelevator_schedule_and_calls_at_the_authors_50_steps():
    """[45, 35, 25, 15] steps left of 50 are steps 5, 15, 25, 35; 8 video-model steps each; the inversions climb
    44 + 34 + 24 + 14 levels; a correction on each step after step 5 but the three later refining steps."""
    from pipelines.grammar import Elevation

    e = Elevation.of((0.1, 0.3, 0.5, 0.7), 50)
    assert (e.refine, e.sub) == ((5, 15, 25, 35), 8)
    assert e.calls(50) == {"I": 50, "V": 32, "I_cond": 116 + 41}
    assert Elevation.of((0.1,), 6) == Elevation((1,), 1)  # a short run still refines, with one video-model step


def test_videoelevator_lowpass_is_the_gaussian_formula():
    import math

    from pipelines.videoelevator import gaussian_lowpass, lowpass

    mask = gaussian_lowpass(4, 6, 8, spatial=1.0, temporal=0.5)
    for t, y, x in [(0, 0, 0), (2, 3, 4), (3, 5, 1)]:
        ft, fy, fx = 2 * t / 4 - 1, 2 * y / 6 - 1, 2 * x / 8 - 1
        assert mask[t, y, x].item() == pytest.approx(math.exp(-ft**2 / 0.5 - (fy**2 + fx**2) / 2), rel=1e-6)
    # a video constant over time and space is all DC: it passes whole; alternating frames (the highest temporal
    # frequency, f_t = -1) are damped by exp(-2)
    flat = torch.ones(1, 1, 4, 6, 8)
    assert torch.allclose(lowpass(flat, mask), flat, atol=1e-6)
    flicker = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 4, 1, 1).expand(1, 1, 4, 6, 8)
    assert torch.allclose(lowpass(flicker, mask), flicker * math.exp(-2), atol=1e-6)


@pytest.mark.heavy
def test_first_frame_attention_equals_diffusers_cross_frame_processor(ad_backbone):
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
        CrossFrameAttnProcessor2_0,
    )

    unet = ad_backbone.image_unet
    x = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # 2 videos (a CFG pair) of 4 frames
    text = torch.randn(8, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    saved = unet.attn_processors
    with torch.inference_mode():
        plain = unet(x, 500, encoder_hidden_states=text).sample
        with ad_backbone.first_frame_attention(4):
            ours = unet(x, 500, encoder_hidden_states=text).sample
        unet.set_attn_processor(CrossFrameAttnProcessor2_0(batch_size=2))
        try:
            theirs = unet(x, 500, encoder_hidden_states=text).sample
        finally:
            unet.set_attn_processor(saved)
    assert torch.equal(ours, theirs) and not torch.allclose(ours, plain, atol=1e-4)
