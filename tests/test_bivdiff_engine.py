"""BIVDiff stages 2-3 on the shared engine (docs/algorithms.md §8): grids, Mixed Inversion, the
zero-weight branch, conditioning, the latent-space guard, frame-joint GroupNorm. Golden numbers come from closed
forms, hand-written loops over the literal official pairs, or diffusers' own modules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import presets
from pipelines.bivdiff.config import resolve_bivdiff_params
from pipelines.bivdiff.program import (
    LatentSpace,
    State,
    bivdiff_sample,
    inversion_moves,
    mix,
    mixed_inversion,
    smoothing_grid,
    smoothing_moves,
)
from pipelines.fixtures.models import SD15_SCHEDULER
from pipelines.schedule import AlphaTable

SPACE = LatentSpace(4, 8, 0.18215)


@pytest.fixture(scope="module")
def table() -> AlphaTable:
    return AlphaTable.from_scheduler_config(SD15_SCHEDULER)


def closed_form_alphas() -> np.ndarray:
    """ᾱ_t of SD's scaled_linear schedule: β = linspace(√0.00085, √0.012, 1000)², ᾱ_t = Π(1 − β_i)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


class Counting:
    """A denoiser that records its calls; `eps(x, t)` gives the value."""

    def __init__(self, eps, forbid: bool = False):
        self.eps, self.forbid, self.calls = eps, forbid, []

    def __call__(self, x, t, w):
        if self.forbid:
            raise AssertionError("a zero-weight branch was computed")
        self.calls.append(t)
        return self.eps(x, t)


def test_grids_compat_and_clean(table):
    """docs/algorithms.md §8, the two inversion grids: compat 1,21,…,981 -> 21,…,981,998; clean 0 -> 1 -> … -> 981;
    denoise 981…1 ending at ᾱ_0."""
    compat = inversion_moves(table, 50, "I", compat=True)
    assert [m.src for m in compat] == list(range(1, 982, 20))
    assert [m.dst for m in compat] == [*range(21, 982, 20), 998]
    clean = inversion_moves(table, 50, "I", compat=False)
    assert [m.src for m in clean] == [0, *range(1, 962, 20)] and [m.dst for m in clean] == list(range(1, 982, 20))
    assert [m.timestep for m in clean] == [m.src for m in clean]  # ε evaluated at the 'from' time
    down = smoothing_moves(table, 50, torch.tensor([7.5]))
    assert [m.timestep for m in down] == list(range(981, 0, -20)) == smoothing_grid(50)
    ref = closed_form_alphas()
    assert float(down[-1].a_to) == pytest.approx(ref[0], rel=1e-6)  # set_alpha_to_one=false: final ᾱ = ᾱ_0
    for m in compat + clean + down:
        assert float(m.a_from) == pytest.approx(ref[m.src], rel=1e-5)
    assert float(compat[-1].a_to) == pytest.approx(ref[998], rel=1e-5)
    assert float(clean[-1].a_to) == pytest.approx(ref[981], rel=1e-5)
    assert float(clean[-1].a_to) ** 0.5 == pytest.approx(0.0760,
                                                         abs=5e-5)  # docs/algorithms.md §8: √ᾱ_981, given to 4 places
    assert float(compat[-1].a_to) ** 0.5 == pytest.approx(0.0687, abs=5e-5)  # √ᾱ_998


def test_compat_inversion_matches_literal_official_pairs(table):
    """The compat chain equals a loop over the spec's literal (e_k, min(998, e_k + 20)) pairs in float64."""
    torch.manual_seed(0)
    z0 = torch.randn(1, 4, 3, 4, 4)
    eps = lambda x, t: torch.sin(x * 0.7 + t / 300.0)  # noqa: E731 - a smooth toy ε-model
    models = {"I": Counting(eps)}
    out = mixed_inversion(models, State(z0, -1, SPACE), 1.0, inversion_moves(table, 50, "I", compat=True), [])[0].x
    ref, a = z0.double(), torch.from_numpy(closed_form_alphas())
    for e in range(1, 982, 20):
        n = min(998, e + 20)
        ep = eps(ref, e)
        ref = a[n].sqrt() * (ref - (1 - a[e]).sqrt() * ep) / a[e].sqrt() + (1 - a[n]).sqrt() * ep
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert models["I"].calls == list(range(1, 982, 20))


def test_inverse_consistency_constant_eps_is_exact(table):
    """docs/algorithms.md §1 (DDIM move): with a constant ε, inverting then denoising over the same grid returns the
    input."""
    torch.manual_seed(1)
    z0, c = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    const = Counting(lambda x, t: c)
    models = {"I": const, "U": const, "V": const}
    out, calls = bivdiff_sample(models, State(z0, -1, SPACE), 1.0, table=table, steps=10, guidance=torch.ones(2),
                                compat=False)
    assert torch.allclose(out, z0, atol=1e-4)
    assert calls == {"I": 10, "V": 10}


def test_inverse_consistency_tiny_unet_first_order(table):
    """docs/algorithms.md §1 (DDIM move): on a 2-step grid, inverting 1 -> 501 with a tiny random UNet then denoising
    501 -> 1 misses the input by exactly the first-order term (c/r)·(ε(x0, 1) − ε(x1, 501)), r = √(ᾱ_501/ᾱ_1), c =
    √(1−ᾱ_501) − r√(1−ᾱ_1)."""
    from pipelines.backbones.common import framewise_eps
    from pipelines.bivdiff.program import run_moves
    from pipelines.fixtures.models import _unet

    unet = _unet(3, cross_dim=16).eval()
    f = framewise_eps(unet, torch.randn(3, 77, 16), torch.float32)
    models = {"I": Counting(f), "V": Counting(f)}
    torch.manual_seed(2)
    x0 = torch.randn(1, 4, 3, 8, 8)
    up = inversion_moves(table, 2, "I", compat=False)[1:]
    down = smoothing_moves(table, 2, torch.ones(1))[:1]
    assert [(m.src, m.dst) for m in up + down] == [(1, 501), (501, 1)]
    with torch.inference_mode():
        x1 = run_moves(models, State(x0, 1, SPACE), up).x
        back = run_moves(models, State(x1, 501, SPACE), down).x
        a = closed_form_alphas()
        r = (a[501] / a[1]) ** 0.5
        c = (1 - a[501]) ** 0.5 - r * (1 - a[1]) ** 0.5
        predicted = (c / r) * (f(x0, 1).double() - f(x1, 501).double())
    assert models["I"].calls == [1] and models["V"].calls == [501]
    assert ((back.double() - x0.double()) - predicted).abs().max() < 1e-4 * predicted.abs().max() + 1e-5
    assert predicted.abs().max() > 1e-2  # a real (non-zero) first-order error was checked


def test_alpha_one_zero_half_and_zero_weight_branch_not_run(table):
    """docs/algorithms.md §8 item 2: α = 1 is the image chain bit for bit, α = 0 the video chain; the zero-weight branch
    never runs."""
    torch.manual_seed(3)
    z0 = State(torch.randn(1, 4, 2, 4, 4), -1, SPACE)
    img = lambda x, t: torch.tanh(x + 0.1)  # noqa: E731
    vid = lambda x, t: torch.cos(x) * 0.5  # noqa: E731
    up_i, up_v = inversion_moves(table, 10, "I", compat=True), inversion_moves(table, 10, "U", compat=True)
    chain_i = mixed_inversion({"I": Counting(img)}, z0, 1.0, up_i, [])[0].x
    chain_v = mixed_inversion({"U": Counting(vid)}, z0, 0.0, [], up_v)[0].x
    z1, c1 = mixed_inversion({"I": Counting(img), "U": Counting(vid, forbid=True)}, z0, 1.0, up_i, up_v)
    z0_, c0 = mixed_inversion({"I": Counting(img, forbid=True), "U": Counting(vid)}, z0, 0.0, up_i, up_v)
    assert torch.equal(z1.x, chain_i) and torch.equal(z0_.x, chain_v)
    assert c1 == {"I": 10, "V": 0} and c0 == {"I": 0, "V": 10}
    half, _ = mixed_inversion({"I": Counting(img), "U": Counting(vid)}, z0, 0.5, up_i, up_v)
    assert torch.allclose(half.x, (chain_i + chain_v) / 2, atol=1e-6)
    per_row = State(torch.cat([z0.x, z0.x]), -1, SPACE)  # per-row α: row 0 image chain, row 1 video chain
    both, calls = mixed_inversion({"I": Counting(img), "U": Counting(vid)}, per_row, torch.tensor([1.0, 0.0]), up_i,
                                  up_v)
    assert torch.allclose(both.x[0], chain_i[0]) and torch.allclose(both.x[1], chain_v[0])
    with pytest.raises(ValueError, match="alpha"):
        mixed_inversion({}, z0, 1.5, up_i, up_v)


def test_latent_space_guard():
    """docs/algorithms.md §8 (latent spaces): mixing across latent spaces, shapes or levels is refused; the space is
    read from the VAE config."""
    x = torch.zeros(1, 4, 2, 4, 4)
    sd = LatentSpace.from_vae_config({"latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
                                      "scaling_factor": 0.18215})
    assert sd == SPACE
    sdxl = LatentSpace.from_vae_config({"latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
                                        "scaling_factor": 0.13025})
    with pytest.raises(ValueError, match="different latent spaces"):
        mix([(State(x, 981, sd), 0.5), (State(x, 981, sdxl), 0.5)])
    with pytest.raises(ValueError, match="shapes"):
        mix([(State(x, 981, sd), 0.5), (State(torch.zeros(1, 4, 3, 4, 4), 981, sd), 0.5)])
    with pytest.raises(ValueError, match="noise levels"):
        mix([(State(x, 981, sd), 0.5), (State(x, 998, sd), 0.5)])


def test_smoothing_equals_diffusers_ddim_loop(table):
    """Stage 3 against diffusers' DDIMScheduler (SD config: leading, offset 1, no clipping) stepping the same CFG ε."""
    from diffusers import DDIMScheduler

    torch.manual_seed(4)
    z = torch.randn(1, 4, 2, 4, 4)
    eps_u = lambda x, t: torch.tanh(x) * 0.3  # noqa: E731
    eps_c = lambda x, t: torch.sin(x + t / 500)  # noqa: E731

    class CFG:
        def __call__(self, x, t, w):
            return eps_u(x, t) + w.view(-1, 1, 1, 1, 1) * (eps_c(x, t) - eps_u(x, t))

    from pipelines.bivdiff.program import run_moves

    ours = run_moves({"V": CFG()}, State(z, 981, SPACE), smoothing_moves(table, 25, torch.tensor([7.5]))).x
    sched = DDIMScheduler.from_config({**SD15_SCHEDULER, "clip_sample": False})
    sched.set_timesteps(25)
    ref = z.clone()
    for t in sched.timesteps:
        e = eps_u(ref, int(t)) + 7.5 * (eps_c(ref, int(t)) - eps_u(ref, int(t)))
        ref = sched.step(e, t, ref).prev_sample
    assert [int(t) for t in sched.timesteps] == smoothing_grid(25)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_frame_joint_groupnorm_equals_5d_groupnorm():
    """docs/algorithms.md §8 (frame-joint GroupNorm): the wrapper on folded frames equals torch's GroupNorm applied to
    the 5-D (B, C, F, h, w) tensor, which is what the official inflated UNet does; identical frames reduce it to
    per-frame GroupNorm."""
    from pipelines.backbones.common import FrameJointGroupNorm, framewise_eps
    from pipelines.fixtures.models import _unet

    gn = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x5 = torch.randn(2, 8, 3, 5, 5)
    folded = x5.permute(0, 2, 1, 3, 4).reshape(6, 8, 5, 5)
    joint = FrameJointGroupNorm(gn)
    joint.frames = 3
    ref = gn(x5).permute(0, 2, 1, 3, 4).reshape(6, 8, 5, 5)
    assert torch.allclose(joint(folded), ref, atol=1e-5)
    assert not torch.allclose(gn(folded), ref, atol=1e-3)

    unet = _unet(4, cross_dim=16).eval()
    emb = torch.randn(1, 77, 16).repeat(3, 1, 1)  # one text for the 3 frames
    with torch.inference_mode():
        same = torch.randn(1, 4, 1, 8, 8).repeat(1, 1, 3, 1, 1)
        plain, pooled = (framewise_eps(unet, emb, torch.float32),
                         framewise_eps(unet, emb, torch.float32, joint_norm=True))
        assert torch.allclose(plain(same, 500), pooled(same, 500), atol=1e-5)
        varied = torch.randn(1, 4, 3, 8, 8)
        assert (plain(varied, 500) - pooled(varied, 500)).abs().max() > 1e-3
        assert torch.equal(plain(varied, 500), framewise_eps(unet, emb, torch.float32)(varied, 500))  # wrappers idle


def test_task_table_and_inversion_conditioning():
    """Per-task α and prompts of docs/algorithms.md §8; compat inverts under the negative prompt (the NEG tags for
    ControlNet/IP2P, '' for inpainting/outpainting), clean under the explicit inversion prompt whatever the CFG."""
    alphas = {t: presets.BIVDIFF_TASKS[t].alpha for t in presets.BIVDIFF_TASKS}
    assert alphas["controlnet-canny"] == alphas["instruct-pix2pix"] == 1.0
    assert alphas["inpaint"] == alphas["outpaint-horizontal"] == 0.1
    rows = {"controlnet-canny": {"source_video": "v.mp4"}, "instruct-pix2pix": {"source_video": "v.mp4"},
            "inpaint": {"source_video": "v.mp4", "mask_video": "m.mp4"}, "outpaint-vertical": {"source_video": "v.mp4"},
            "external": {"source_video": "e.npy", "negative_prompt": "blurry"}}
    expect = {"controlnet-canny": presets.BIVDIFF_NEG, "instruct-pix2pix": presets.BIVDIFF_NEG, "inpaint": "",
              "outpaint-vertical": "", "external": "blurry"}
    for task, row in rows.items():
        for guidance in (7.5, 1.0):
            compat = resolve_bivdiff_params({"task": task, "prompt": "a cat", "sampler": "bivdiff_compat",
                                             "guidance": guidance, **row})
            clean = resolve_bivdiff_params({"task": task, "prompt": "a cat", "guidance": guidance, **row})
            assert compat.inversion_text() == expect[task]
            assert clean.inversion_text() == ""
    p = resolve_bivdiff_params({"task": "controlnet-canny", "prompt": "a bear", "source_video": "v.mp4"})
    assert p.stage1_prompts() == ("a bear" + presets.BIVDIFF_POS, presets.BIVDIFF_NEG)
    assert (p.seed, p.steps, p.frames, p.stride, p.height, p.width, p.guidance) == (42, 50, 8, 4, 512, 512, 7.5)
    ext = resolve_bivdiff_params({"task": "external", "idm_prompt": "x", "vdm_prompt": "a dog",
                                  "source_video": "e.npy"})
    assert ext.smoothing_prompts() == ("a dog", "") and ext.stride == 1  # prompts exactly as given


@pytest.mark.parametrize("row,match", [
    ({"task": "nope"}, "task: unknown"),
    ({"task": "inpaint", "source_video": "v.mp4"}, "mask_video: task 'inpaint' needs"),
    ({"task": "controlnet-canny"}, "source_video: task"),
    ({"task": "controlnet-canny", "source_video": "v", "mask_video": "m"},
     "mask_video: task 'controlnet-canny' does not use"),
    ({"task": "external", "source_video": "v", "alpha": 1.2}, "alpha: must lie in"),
    ({"task": "external", "source_video": "v", "alpha": float("nan")}, "alpha: must be a finite number"),
    ({"task": "external", "source_video": "v", "steps": 7}, "steps: the SD DDIM grid"),
    ({"task": "external", "source_video": "v", "height": 60}, "height: must be a multiple"),
    ({"task": "external", "source_video": "v", "sampler": "ivmixed"}, "sampler: BIVDiff rows take"),
    ({"task": "external", "source_video": "v", "noise": "random"}, "noise: must be one of"),
])
def test_bad_rows_name_the_parameter(row, match):
    with pytest.raises(ValueError, match=match):
        resolve_bivdiff_params(row)
