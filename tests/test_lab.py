"""The comparators of the sampler lab (docs/lab.md) on the tiny AnimateDiff set, each against diffusers' own
implementation from the same noise: FreeU (`AnimateDiffPipeline.enable_freeu`) and FreeInit
(`AnimateDiffPipeline.enable_free_init`); FreeU composed with IV-Mixed; the FreeInit filter against a direct
evaluation of its formula."""
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
    rel = ((ours.latents - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel  # measured: bit-identical or float32 rounding of the FFT mix
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
    for bad, msg in [("standard@freeu=1/2", "four numbers"), ("standard@freeinit=0", "from 1 to 10"),
                     ("standard@freeu=a/b/c/d", "four numbers")]:
        with pytest.raises(ValueError, match=msg):
            parse_variant(bad)
