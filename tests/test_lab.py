"""The comparators of the sampler lab (docs/lab.md) on the tiny AnimateDiff set, each against diffusers' own
implementation from the same noise: FreeU (`AnimateDiffPipeline.enable_freeu`), FreeInit
(`AnimateDiffPipeline.enable_free_init`), guidance on part of the schedule (the documented dynamic-CFG callback) and
PAG (`AnimateDiffPAGPipeline`); FreeU composed with IV-Mixed; the FreeInit filter against a direct evaluation of its
formula; the options' grammar."""
import pytest
import torch

from pipelines.config import resolve_params
from pipelines.freeinit import butterworth_lowpass
from pipelines.generate import generate
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
    c = parse_variant("IV-IV@cfg=2..4").variant
    assert c.cfg.text() == "2..4" and parse_variant(c.pattern()).variant == c
    for bad, msg in [("standard@freeu=1/2", "four numbers"), ("standard@freeinit=0", "from 1 to 10"),
                     ("standard@freeu=a/b/c/d", "four numbers"), ("standard@cfg=0.5..0.2", "fractions need"),
                     ("standard@pag=0", "scale > 0"), ("standard@pag=3,cfg=0.0..0.5", "does not combine")]:
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
