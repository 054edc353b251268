"""VideoCrafter2 backbone on tiny random models: the UNet's checkpoint layout and fps conditioning, `standard` against a
DPM-Solver++ loop written directly against diffusers' scheduler API, and `ivmixed_vc_v1` against a loop in the
official code's shape (docs/algorithms.md §5)."""
import os

import pytest
import torch

from pipelines.config import ModelSpec, resolve_params
from pipelines.generate import build_plan, generate

from .conftest import rel, tiny_backbone_fixtures
from .reference import encode

PROMPT = "Snow falling on a quiet street at night."


vc_dir, vc = tiny_backbone_fixtures("videocrafter2", "vc_dir")


@pytest.mark.heavy
def test_unet_layout_round_trip_and_fps(vc, vc_dir, tmp_path):
    from diffusers import UNet3DConditionModel

    from pipelines.backbones.videocrafter_unet import UNet3DVideoCrafterConditionModel as VC

    unet = vc.unet
    stock = UNet3DConditionModel(**{k: v for k, v in unet.config.items() if not k.startswith("_") and k != "fps_cond"})
    assert set(unet.state_dict()) - set(stock.state_dict()) == {f"fps_embedding.linear_{i}.{p}" for i in (1, 2)
                                                                for p in ("weight", "bias")}
    assert not set(stock.state_dict()) - set(unet.state_dict())
    again, info = VC.from_pretrained(os.path.join(vc_dir, "unet"), output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == []
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), unet.state_dict().values()))
    x, e = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 77, 32)
    with torch.inference_mode():
        a, b = unet(x, 500, e, 24).sample, unet(x, 500, e, 24).sample
        c, d = unet(x, 500, e, 8).sample, unet(x, 500, e, torch.tensor([24, 24])).sample
    assert torch.equal(a, b) and torch.equal(a, d) and (a - c).abs().max() > 1e-3
    # a stock UNet3D folder (no fps weights) is refused, never silently run without fps conditioning
    stock.save_pretrained(tmp_path / "stock")
    from pipelines.backbones.registry import load_backbone

    with pytest.raises(ValueError, match="VideoCrafter2 layout"):
        spec = ModelSpec.from_model_dir("videocrafter2", vc_dir, device="cpu")
        load_backbone(ModelSpec(**{**spec.__dict__, "unet": str(tmp_path / "stock")}))


def _dpm(vc_dir, n):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cfg = DDIMScheduler.load_config(os.path.join(vc_dir, "base"), subfolder="scheduler")
    sched = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="sde-dpmsolver++")
    sched.set_timesteps(n)
    return sched


def _loop(vc, vc_dir, params, official: bool, clean: bool = False):
    """Initial noise and SDE noise per the project contract (docs/algorithms.md §7); zigzag per docs/algorithms.md §5
    when `official`; `clean`: the same zigzag with the IDM on every step (no VDM stand-in), CFG +-4 (the clean
    `ivmixed` preset)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    n, f, fps = params.steps, params.frames, params.fps
    h, w = params.height // 8, params.width // 8
    sched = _dpm(vc_dir, n)
    ddim = DDIMScheduler.from_pretrained(os.path.join(vc_dir, "image_model"), subfolder="scheduler", clip_sample=False)
    inv = DDIMInverseScheduler.from_pretrained(os.path.join(vc_dir, "image_model"), subfolder="scheduler")
    ddim.set_timesteps(n)
    inv.set_timesteps(n)
    emb_v = encode(vc.tokenizer, vc.text_encoder, ["", params.prompt])
    emb_i = encode(vc.image_tokenizer, vc.image_text_encoder, ["", params.prompt]).repeat_interleave(f, 0)

    def vdm(x, t, g):
        u, c = vc.unet(torch.cat([x, x]), t, emb_v, fps).sample.chunk(2)
        return u + g * (c - u)

    def idm(x, t, g):
        flat = torch.cat([x, x]).permute(0, 2, 1, 3, 4).reshape(2 * f, 4, h, w)
        out = vc.image_unet(flat, t, encoder_hidden_states=emb_i).sample
        u, c = out.reshape(2, f, 4, h, w).permute(0, 2, 1, 3, 4).chunk(2)
        return u + g * (c - u)

    x = torch.randn((1, 4, f, h, w), generator=torch.Generator("cpu").manual_seed(params.seed))
    sde = torch.Generator("cpu").manual_seed(params.seed + 1)
    delta = 1000 // n
    with torch.inference_mode():
        for i, t in enumerate(sched.timesteps.tolist()):
            if official or clean:
                p, pp = max(0, t - delta), max(0, t - 2 * delta)
                first = vdm if i % 3 == 2 and not clean else idm  # zz = 3: the VDM stands in, with the IDM's CFG (+-4)
                x = ddim.step(first(x, t, 4.0), t, x).prev_sample
                x = ddim.step(vdm(x, p, 4.0), p, x).prev_sample
                x = inv.step(first(x, pp, -4.0), p, x).prev_sample
                x = inv.step(vdm(x, p, -4.0), t, x).prev_sample
            z = torch.randn((f, 4, h, w), generator=sde).permute(1, 0, 2, 3)[None]
            x = sched.step(vdm(x, t, 9.0), t, x, variance_noise=z).prev_sample  # the VC code's main CFG
    return x


@pytest.mark.heavy
def test_standard_equals_a_direct_dpm_solver_run(vc, vc_dir):
    p = resolve_params(dict(prompt=PROMPT, sampler="standard", seed=3, steps=6, frames=3, height=64, width=64),
                       backbone="videocrafter2")
    assert p.guidance == 9.0 and p.fps == 24
    ours = generate(vc, [p], decode=False)[0]
    assert rel(ours.latents, _loop(vc, vc_dir, p, official=False)) < 1e-4


@pytest.mark.heavy
def test_ivmixed_vc_v1_equals_the_official_loop(vc, vc_dir):
    p = resolve_params(dict(prompt=PROMPT, sampler="ivmixed_vc_v1", seed=5, steps=6, frames=3, height=64, width=64,
                            vdm_guidance="6,2,7"), backbone="videocrafter2")  # the code ignores CFG flags: +-4 stays
    ours = generate(vc, [p], decode=False)[0]
    assert rel(ours.latents, _loop(vc, vc_dir, p, official=True)) < 1e-4
    assert ours.calls == {"I": 8, "V": 22}


@pytest.mark.heavy
def test_ivmixed_clean_equals_an_independent_loop(vc, vc_dir):
    p = resolve_params(dict(prompt=PROMPT, sampler="ivmixed", seed=6, steps=6, frames=3, height=64, width=64),
                       backbone="videocrafter2")
    ours = generate(vc, [p], decode=False)[0]
    assert rel(ours.latents, _loop(vc, vc_dir, p, official=False, clean=True)) < 1e-4
    assert ours.calls == {"I": 12, "V": 18}


def test_paper_call_counts_for_50_steps(vc):
    p = resolve_params(dict(prompt=PROMPT, sampler="ivmixed_vc_v1", steps=50, frames=2, height=64, width=64),
                       backbone="videocrafter2")
    assert build_plan(vc, [p]).calls() == {"I": 68, "V": 182}  # docs/algorithms.md §2
    p = resolve_params(dict(prompt=PROMPT, sampler="ivmixed", steps=50, frames=2, height=64, width=64),
                       backbone="videocrafter2")
    assert build_plan(vc, [p]).calls() == {"I": 100, "V": 150}  # docs/sample.md: 250 (the DPM grid never reaches t = 0)


@pytest.mark.heavy
def test_batched_rows_keep_their_own_sde_noise(vc):
    rows = [resolve_params(dict(prompt=PROMPT, seed=s, steps=4, frames=2, height=64, width=64),
                           backbone="videocrafter2")
            for s in (1, 2)]
    together = generate(vc, rows, decode=False)
    for row, res in zip(rows, together):
        assert rel(res.latents, generate(vc, [row], decode=False)[0].latents) < 1e-4  # |latents| ~ 10 here


def _stock_twin(unet):
    """diffusers' own UNet3DConditionModel holding the VC UNet's weights except the fps MLP (independent of our
    class)."""
    from diffusers import UNet3DConditionModel

    stock = UNet3DConditionModel(**{k: v for k, v in unet.config.items() if not k.startswith("_") and k != "fps_cond"})
    stock.load_state_dict({k: v for k, v in unet.state_dict().items() if "fps_embedding" not in k}, strict=True)
    return stock.eval()


def _hand_fps_embedding(unet, fps: float) -> torch.Tensor:
    """MLP(sinusoid(fps)) written out (backbones doc: the VC code's `fps_embedding(timestep_embedding(fps))`):
    [cos, sin] of fps * 10000^(-i/half), then linear -> SiLU -> linear with the checkpoint's weights."""
    import math

    import torch.nn.functional as F

    sd = unet.state_dict()
    half = unet.config.block_out_channels[0] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = fps * freqs
    sin = torch.cat([torch.cos(args), torch.sin(args)])
    h = F.silu(F.linear(sin, sd["fps_embedding.linear_1.weight"], sd["fps_embedding.linear_1.bias"]))
    return F.linear(h, sd["fps_embedding.linear_2.weight"], sd["fps_embedding.linear_2.bias"])


@pytest.mark.heavy
def test_vc_unet_equals_stock_unet3d_plus_a_hand_computed_fps_embedding(vc):
    unet = vc.unet
    stock = _stock_twin(unet)
    x, e = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(2, 77, 32)
    added = _hand_fps_embedding(unet, 24.0)
    handle = stock.time_embedding.register_forward_hook(lambda _m, _i, out: out + added)
    try:
        with torch.inference_mode():
            ours, ref = unet(x, 500, e, 24).sample, stock(x, 500, encoder_hidden_states=e).sample
    finally:
        handle.remove()
    assert (ref - ours).abs().max() <= 1e-5 * ref.abs().max()
    # with the fps MLP's output layer zeroed the class is exactly diffusers' UNet3DConditionModel
    zeroed = type(unet).from_config(unet.config)
    zeroed.load_state_dict(unet.state_dict())
    with torch.no_grad():
        zeroed.fps_embedding.linear_2.weight.zero_()
        zeroed.fps_embedding.linear_2.bias.zero_()
    with torch.inference_mode():
        assert torch.equal(zeroed.eval()(x, 500, e, 24).sample, stock(x, 500, encoder_hidden_states=e).sample)
