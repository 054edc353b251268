"""AnimateDiff backbone on tiny random models: golden references are diffusers' own pipeline and an
independent re-implementation of the official IV-Mixed loop written against diffusers' schedulers."""
import os

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from pipelines.config import resolve_params
from pipelines.generate import generate

from .reference import animatediff_ivmixed_loop

PROMPT = "Two horses race across a grassy field at sunset."


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()



@pytest.mark.heavy
@pytest.mark.parametrize("seed, guidance", [(0, 7.5), (23523, 3.0)])
def test_standard_equals_diffusers_animatediff_pipeline(ad_backbone, ad_pipe, small, seed, guidance):
    ours = generate(ad_backbone,
                    [resolve_params(dict(prompt=PROMPT, sampler="standard", seed=seed, guidance=guidance, **small))])[0]
    kw = dict(prompt=PROMPT, num_frames=small["frames"], height=small["height"], width=small["width"],
              num_inference_steps=small["steps"], guidance_scale=guidance)
    ref_latents = ad_pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").frames
    ref_frames = ad_pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").frames
    assert ours.latents.shape == ref_latents.shape == (1, 4, small["frames"], 8, 8)
    assert torch.equal(ours.latents, ref_latents)  # docs/testing.md "Notes on exactness": relative error 0
    ref_frames = torch.from_numpy(ref_frames[0])  # (F, H, W, 3) in [0, 1]
    assert ours.frames.shape == ref_frames.shape
    # decoded 4 frames per VAE call (decode_chunk) against diffusers' 16: float32 rounding of the batched convs only
    assert (ours.frames - ref_frames).abs().max().item() < 1e-6
    assert ours.calls == {"I": 0, "V": small["steps"]}


# ---------------------------------------------------------------------------------------------
# An independent loop in the official code's shape (docs/algorithms.md §2, "Timestep labels"): diffusers'
# DDIMScheduler.step and DDIMInverseScheduler.step called with the code's timestep arguments, raw UNet calls, CFG
# written out.


def _official_loop(bb, tiny_dir, params, *, legacy: bool, **guidance):
    """tests/reference.py's loop with the tiny set's scheduler configs."""
    return animatediff_ivmixed_loop(
        bb, DDIMScheduler.load_config(os.path.join(tiny_dir, "base"), subfolder="scheduler"),
        DDIMInverseScheduler.load_config(os.path.join(tiny_dir, "image_model"), subfolder="scheduler"),
        prompt=params.prompt, seed=params.seed, steps=params.steps, frames=params.frames, height=params.height,
        width=params.width, legacy=legacy, **guidance)


@pytest.mark.parametrize("sampler, legacy, extra", [
    ("ivmixed_ad_v1", True, {}),
    ("ivmixed_ad_v1", True, {"idm_guidance": "6,2,7", "vdm_guidance": "2,6,1/7"}),
    ("ivmixed", False, {}),
    ("ivmixed", False, {"idm_guidance": "6,2,7", "guidance": 5.0}),
])
@pytest.mark.heavy
def test_ivmixed_presets_equal_an_independent_official_style_loop(ad_backbone, tiny_ad_dir, small, sampler,
                                                                  legacy, extra):
    params = resolve_params(dict(prompt=PROMPT, sampler=sampler, seed=7, **small, **extra))
    ours = generate(ad_backbone, [params], decode=False)[0]
    ref = _official_loop(ad_backbone, tiny_ad_dir, params, legacy=legacy, **extra)
    assert rel(ours.latents, ref) < 1e-4
    n = small["steps"]
    assert ours.total_calls == (5 * n if legacy else n + 4 * (n - 1))


@pytest.mark.heavy
def test_ivmixed_differs_from_standard_from_the_same_noise(ad_backbone, small):
    rows = [resolve_params(dict(prompt=PROMPT, sampler=s, seed=11, **small)) for s in ("standard", "ivmixed")]
    std, iv = (generate(ad_backbone, [r], decode=False)[0] for r in rows)
    assert rel(iv.latents, std.latents) > 1e-2


@pytest.mark.heavy
def test_batched_rows_equal_rows_sampled_alone(ad_backbone, small):
    rows = [
        resolve_params(dict(prompt=PROMPT, seed=1, **small)),
        resolve_params(dict(prompt="A red kite over a beach", seed=2, guidance=4.0, idm_guidance="6,2,7", **small)),
        resolve_params(dict(prompt="Snow falling on a quiet street at night", negative_prompt="blurry", seed=3,
                            vdm_guidance="2,6", **small)),
    ]
    together = generate(ad_backbone, rows)
    for row, res in zip(rows, together):
        alone = generate(ad_backbone, [row])[0]
        # float32 rounding only (batched matmuls block differently): 1e-5 of the latents' scale (|x| up to ~20)
        assert (res.latents - alone.latents).abs().max().item() < 1e-5 * alone.latents.abs().max().item()
        assert (res.frames - alone.frames).abs().max().item() < 1e-4
        assert res.calls == alone.calls


@pytest.mark.heavy
def test_seed_fully_determines_the_initial_noise(ad_backbone, small):
    a = resolve_params(dict(prompt=PROMPT, seed=5, **small))
    b = resolve_params(dict(prompt=PROMPT, seed=6, **small))
    first = generate(ad_backbone, [a, b], decode=False)
    second = generate(ad_backbone, [b, a], decode=False)
    assert rel(first[0].latents, second[1].latents) < 1e-6  # float32 rounding of the batched matmuls at most
    assert rel(first[0].latents, first[1].latents) > 1e-2


def test_structurally_different_rows_cannot_share_a_batch(ad_backbone, small):
    rows = [resolve_params(dict(prompt=PROMPT, **small)), resolve_params(dict(prompt=PROMPT, **{**small, "frames": 4}))]
    with pytest.raises(ValueError, match="share"):
        generate(ad_backbone, rows)


def test_motion_modules_are_live(ad_backbone):
    """The tiny adapter's temporal layers are not zero: a change to frame 0 reaches frame 3 through the
    VDM, but never through the frame-wise IDM."""
    zeros = [n for n, p in ad_backbone.unet.named_parameters() if "motion_modules" in n and p.dim() > 1 and not p.any()]
    assert zeros == []
    x = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2 * 4, 77, 32)
    y = x.clone()
    y[:, :, 0] += 1.0
    with torch.inference_mode():
        v0, v1 = (ad_backbone.unet(z, 500, encoder_hidden_states=emb).sample for z in (x, y))
        fold = lambda z: z.permute(0, 2, 1, 3, 4).reshape(8, 4, 8, 8)  # noqa: E731
        i0, i1 = (ad_backbone.image_unet(fold(z), 500, encoder_hidden_states=emb).sample.reshape(2, 4, 4, 8, 8)
                  for z in (x, y))
    assert (v0[:, :, 3] - v1[:, :, 3]).abs().max() > 1e-3
    assert (i0[:, 3] - i1[:, 3]).abs().max() == 0


def test_frames_beyond_the_motion_adapter_are_refused(ad_backbone, small):
    with pytest.raises(ValueError, match="frames"):
        generate(ad_backbone, [resolve_params(dict(prompt=PROMPT, **{**small, "frames": 40}))])


@pytest.mark.heavy
def test_lora_is_fused_into_the_image_model_with_its_scaling(tiny_ad_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from pipelines.backbones.registry import load_backbone
    from pipelines.config import ModelSpec

    unet = UNet2DConditionModel.from_pretrained(os.path.join(tiny_ad_dir, "image_model"), subfolder="unet")
    base_weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian")
    unet.add_adapter(cfg)
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    lora_dir = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(str(lora_dir), unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=cfg.to_dict())
    sd = get_peft_model_state_dict(unet)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    delta = sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]

    def loaded_weight(scale):
        spec = ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", lora=str(lora_dir), lora_scale=scale)
        return load_backbone(spec).image_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight

    # W + scale * (alpha / r) * B A, with alpha / r = 0.5 from the adapter's own metadata
    torch.testing.assert_close(loaded_weight(0.8), base_weight + 0.8 * 0.5 * delta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_weight(0.0), base_weight, rtol=0, atol=1e-7)


@pytest.mark.heavy
def test_r_letter_noise_continues_each_rows_own_stream(ad_backbone, small):
    """docs/sample.md "Seeds and batching": R draws continue the row's seeded stream, so a row sampled in a batch (in
    either position) equals the row alone, and two seeds give different fresh noise."""
    rows = [resolve_params(dict(prompt=PROMPT, variant="RR-VV", seed=s, **small)) for s in (11, 12)]
    alone = [generate(ad_backbone, [r], decode=False)[0].latents for r in rows]
    together = generate(ad_backbone, rows, decode=False)
    swapped = generate(ad_backbone, rows[::-1], decode=False)
    for i in range(2):
        assert rel(together[i].latents, alone[i]) < 1e-5 and rel(swapped[1 - i].latents, alone[i]) < 1e-5
    # R letters call no model; with fresh noise the zigzag at t = 0 is no identity, so no step skips it
    assert together[0].calls == {"I": 0, "V": 3 * small["steps"]}
    assert rel(alone[0], alone[1]) > 1e-2


def test_dtype_auto_is_float32_on_a_cpu():
    from pipelines.backbones.common import resolve_placement

    assert resolve_placement("auto", "auto") == (torch.device("cpu"), torch.float32)  # no GPU here
    with pytest.raises(ValueError, match="float16 convolutions are not supported on cpu"):
        resolve_placement("cpu", "float16")
