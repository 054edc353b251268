"""Fewer model calls and their cost (docs/algorithms.md §10): reuse variants wired as stated (a denoiser whose ε does
not depend on its input gives every reuse variant exactly the full variant's video; exact reuse never changes a
number), call counts against the closed form, and FLOPs against torch's counter run on diffusers' own models built
from the published configurations (independent of pipelines/cost.py)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pipelines.grammar import FULL_RUN, Interval, compile_plan, parse_variant
from pipelines.sampling import CFGDenoiser, sample_plan
from pipelines.schedule import AlphaTable, CFGRamp, timesteps

from .jobutil import ROOT

N = 10
TABLE = AlphaTable(torch.linspace(0.9991, 0.0047, 1000), torch.tensor(1.0))


def plan_of(pattern: str, interval=FULL_RUN, keep_noop: bool = False, rows: int = 2):
    v = parse_variant(pattern).variant
    return compile_plan(v, timesteps=timesteps(N), down_table=TABLE, up_table=TABLE, guidance=[7.5, 3.0][:rows],
                        idm_guidance=[CFGRamp(4, 4), CFGRamp(6, 2, 7)][:rows],
                        vdm_guidance=[CFGRamp(4, 4), CFGRamp(2, 2)][:rows], interval=interval, keep_noop=keep_noop)


class Counted(CFGDenoiser):
    """A CFG denoiser over `eps_fn` that counts its calls."""

    def __init__(self, eps_fn):
        super().__init__(eps_fn)
        self.n = 0

    def pair(self, x, t):
        self.n += 1
        return super().pair(x, t)


def constant(seed: int):
    """ε that depends on the timestep and the CFG half, never on the input."""
    def eps(x2, t):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        u, c = torch.randn((2, *x2.shape[1:]), generator=g, dtype=x2.dtype)
        half = x2.shape[0] // 2
        return torch.cat([u.expand(half, *u.shape), c.expand(half, *c.shape)])
    return eps


def nonlinear(seed: int):
    """ε that depends on the input (a fixed random map through tanh), per half."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)

    def eps(x2, t):
        half = x2.shape[0] // 2
        y = torch.einsum("bc...,cd->bd...", x2, a) * (1 + t / 1000)
        y[half:] = y[half:] + torch.einsum("bc...,cd->bd...", x2[half:], b)
        return torch.tanh(y)
    return eps


def run(plan, make):
    models = {"I": Counted(make(1)), "V": Counted(make(2))}
    x0 = torch.randn((2, 4, 3, 5, 5), generator=torch.Generator().manual_seed(7))
    x, calls = sample_plan(models, x0, plan)
    return x, calls, {k: m.n for k, m in models.items()}


@pytest.mark.parametrize("pattern", ["down:IV-IV", "up:IV-IV", "down:VV-II", "down:IV-VI", "down:RV-IV"])
def test_with_an_input_free_eps_every_reuse_variant_is_the_full_variant(pattern):
    from pipelines.sampling import RowNoise

    full = plan_of(pattern)
    for reuse in ("exact", "V"):
        sep = "," if "@" in pattern else "@"
        noise_a, noise_b = RowNoise([1, 2]), RowNoise([1, 2])
        models_a = {"I": Counted(constant(1)), "V": Counted(constant(2))}
        models_b = {"I": Counted(constant(1)), "V": Counted(constant(2))}
        x0 = torch.randn((2, 4, 3, 5, 5), generator=torch.Generator().manual_seed(7))
        xa, _ = sample_plan(models_a, x0, full, noise=noise_a)
        reused = plan_of(f"{pattern}{sep}reuse={reuse}")
        xb, calls = sample_plan(models_b, x0, reused, noise=noise_b)
        assert torch.equal(xa, xb), (pattern, reuse)
        assert calls == reused.calls() or reuse == "exact"
        assert {k: m.n for k, m in models_b.items()} == calls


def test_exact_reuse_never_changes_a_number_and_saves_the_repeated_calls():
    # the kept t = 0 zigzag: with ᾱ_0 = 1 = ᾱ below zero its moves are exact identities (x0 = x, x' = x0), so its
    # calls repeat inputs bit for bit (elsewhere DDIM's rounding makes even an identity move change the last bits)
    alphas = TABLE.alphas_cumprod.clone()
    alphas[0] = 1.0
    table = AlphaTable(alphas, torch.tensor(1.0))
    v_full, v_exact = parse_variant("down:IV-IV").variant, parse_variant("down:IV-IV@reuse=exact").variant
    kw = dict(timesteps=timesteps(N), down_table=table, up_table=table, guidance=[7.5, 3.0],
              idm_guidance=[CFGRamp(4, 4)] * 2, vdm_guidance=[CFGRamp(4, 4)] * 2, keep_noop=True)
    xa, ca, na = run(compile_plan(v_full, **kw), nonlinear)
    xb, cb, nb = run(compile_plan(v_exact, **kw), nonlinear)
    assert torch.equal(xa, xb)
    assert ca == {"I": 2 * N, "V": 3 * N} and na == ca
    # at t = 0 the IDM's second call (invert 0 -> 0) and the VDM's second and main calls see the first calls' inputs
    assert cb == {"I": 2 * N - 1, "V": 3 * N - 2} and nb == cb


def test_reuse_V_with_an_input_dependent_eps_differs_and_counts_as_the_closed_form():
    full, fast = plan_of("down:IV-IV"), plan_of("down:IV-IV@reuse=V")
    xa, ca, _ = run(full, nonlinear)
    xb, cb, nb = run(fast, nonlinear)
    assert not torch.equal(xa, xb)  # an approximation: the shared call sees another input
    k = N  # active steps (below_zero = 1: no identity step is dropped)
    assert ca == {"I": 2 * k, "V": N + 2 * k}
    # one video-model call per step is shared, and at t = 0 the main call too (every V call sits at level 0)
    assert cb == nb == {"I": 2 * k, "V": N + k - 1} == fast.calls()
    half = plan_of("down:IV-IV@reuse=V", interval=Interval.parse("0.0..0.4"))
    assert half.calls() == {"I": 8, "V": N + 4}


def test_reuse_needs_pairs_and_reads_back_from_its_pattern():
    v = parse_variant("down:IV-IV@reuse=V").variant
    assert v.reuse == "V" and parse_variant(v.pattern()).variant == v
    with pytest.raises(ValueError, match="reuse must be off or exact or V"):
        parse_variant("down:IV-IV@reuse=deep")
    with pytest.raises(ValueError, match="give no ε pair"):
        sample_plan({"I": lambda x, t, w: x, "V": lambda x, t, w: x}, torch.zeros(1, 4, 2, 3, 3),
                    plan_of("down:IV-IV@reuse=V", rows=1))


# ---- FLOPs: the CLI's numbers against torch's counter on diffusers' models from the published configs ------------
def _config(repo: str, sub: str | None = None) -> dict:
    with open(os.path.join(ROOT, "pipelines", "model_configs", repo.replace("/", "--"), sub or "", "config.json")) as f:
        return json.load(f)


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as c, torch.no_grad():
        fn()
    return float(c.get_total_flops())


@pytest.mark.heavy
def test_list_presets_tflop_is_the_published_architectures_count_and_fast_is_at_most_2x(capsys):
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from pipelines import sample

    rv51, sd15 = "SG161222/Realistic_Vision_V5.1_noVAE", "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with torch.device("meta"):
        base = UNet2DConditionModel.from_config(_config(rv51, "unet"))
        adapter = MotionAdapter.from_config(_config("guoyww/animatediff-motion-adapter-v1-5-3"))
        vdm = UNetMotionModel.from_unet2d(base, adapter, load_weights=False)
        idm = UNet2DConditionModel.from_config(_config(sd15, "unet"))
        vae = AutoencoderKL.from_config(_config(rv51, "vae"))
        f, h = 16, 64  # AnimateDiff's defaults: 16 x 512 x 512, latents 64 x 64
        v = _flops(lambda: vdm(torch.empty(2, 4, f, h, h), 500, encoder_hidden_states=torch.empty(2 * f, 77, 768)))
        i = _flops(lambda: idm(torch.empty(2 * f, 4, h, h), 500, encoder_hidden_states=torch.empty(2 * f, 77, 768)))
        d = _flops(lambda: vae.decode(torch.empty(f, 4, h, h)))
    assert sample.main(["--list-presets", "--backbone", "animatediff", "--json"]) == 0
    got = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    # calls: N + 4K (K = 49: the t = 0 zigzag dropped; 50 when kept), and reuse=V on 20 active steps: N + 3K
    expected = {"standard": {"I": 0, "V": 50}, "ivmixed": {"I": 98, "V": 148}, "ivmixed_ad_v1": {"I": 100, "V": 150},
                "ivmixed_fast": {"I": 40, "V": 70},
                # the lab's comparators (docs/lab.md): FreeU costs standard's calls (its FFT on skip features is not a
                # model call), FreeInit 3 full runs, FreeU inside IV-Mixed IV-Mixed's
                "freeu": {"I": 0, "V": 50}, "freeinit": {"I": 0, "V": 150}, "ivmixed_freeu": {"I": 98, "V": 148},
                # guidance on the first 40 %: 20 CFG pairs, then 30 calls on the prompt alone at half a pair's cost
                "cfg_interval": {"I": 0, "V": 20, "V_cond": 30},
                # PAG: each call the batch three times, 1.5 pairs' cost
                "pag": {"I": 0, "V_pag": 50},
                # FreeNoise: standard's calls (the FLOP count is the plain motion module's, docs/lab.md)
                "freenoise": {"I": 0, "V": 50},
                # VideoElevator at 50 steps: 50 image-model pairs, 4 x 8 video-model pairs, and on the prompt alone
                # 44 + 34 + 24 + 14 inversion calls and 41 corrections (steps 6-49 but 15, 25, 35)
                "videoelevator": {"I": 50, "V": 32, "I_cond": 157}}
    assert set(got) == set(expected)
    for name, calls in expected.items():
        assert got[name]["calls"] == sum(calls.values())
        image = calls["I"] + calls.get("I_cond", 0) / 2
        flops = image * i + (calls.get("V", 0) + calls.get("V_cond", 0) / 2 + 1.5 * calls.get("V_pag", 0)) * v + d
        assert got[name]["tflop"] == pytest.approx(flops / 1e12, abs=0.06), name
    assert got["ivmixed_fast"]["tflop"] <= 2.0 * got["standard"]["tflop"]
    assert got["ivmixed"]["tflop"] == pytest.approx(7791.1, abs=0.1)  # the figure docs/algorithms.md §10 states
