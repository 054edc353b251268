"""Closed-form Gaussian toys: exact ε is known, so sampler outputs and the first-order analysis of
docs/algorithms.md §2 (a denoise/invert round trip acts as extra guidance) can be checked against formulas."""
import math

import pytest
import torch

from pipelines.grammar import compile_plan, parse_variant
from pipelines.sampling import sample_plan
from pipelines.schedule import AlphaTable, CFGRamp, timesteps

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            set_alpha_to_one=False, steps_offset=1, clip_sample=False)
TABLE = AlphaTable.from_scheduler_config(SD15)
ALPHAS = TABLE.alphas_cumprod.double()


def exact_eps(mu: float, s: float):
    """Data N(mu, s^2): x_t ~ N(√ᾱ mu, ᾱ s² + 1 - ᾱ) and E[ε | x_t] = √(1-ᾱ) (x_t - √ᾱ mu) / (ᾱ s² + 1 - ᾱ)."""
    def eps(x, t):
        a = ALPHAS[t].to(x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
    return eps


def cfg_model(cond, uncond):
    def model(x, t, w):
        u = uncond(x, t)
        return u + w.to(x).view(-1, *[1] * (x.ndim - 1)) * (cond(x, t) - u)
    return model


def run(pattern, models, x, n=50, guidance=1.0, w=4.0, spacing="linspace"):
    v = parse_variant(pattern)
    plan = compile_plan(v.variant, timesteps=timesteps(n, spacing, steps_offset=1), down_table=TABLE, up_table=TABLE,
                        guidance=[guidance], idm_guidance=[CFGRamp(w, w)], vdm_guidance=[CFGRamp(w, w)])
    return sample_plan(models, x, plan)[0]


def _gaussian_run(pattern, n, mu=1.5, s=0.5):
    """Start from the exact time-T marginal; return (mean, std) of the output and the exact targets at ᾱ_0."""
    eps = exact_eps(mu, s)
    model = cfg_model(eps, eps)
    t0 = timesteps(n, "leading", steps_offset=1)[0]
    a = ALPHAS[t0]
    z = torch.randn(1, 1, 1, 400, 500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = run(pattern, {"I": model, "V": model}, a.sqrt() * mu + (a * s * s + 1 - a).sqrt() * z, n=n, spacing="leading")
    a0 = ALPHAS[0]
    return out.mean().item(), out.std().item(), (a0.sqrt() * mu).item(), (a0 * s * s + 1 - a0).sqrt().item()


@pytest.mark.heavy
def test_ddim_samples_of_a_gaussian_have_the_right_mean_and_std():
    """Exact ε, consistent grid: DDIM transports the time-T marginal to N(mu, s^2) (seen at level ᾱ_0)."""
    mean, std, mean_ref, std_ref = _gaussian_run("standard", 200)
    assert mean == pytest.approx(mean_ref, abs=0.003)
    assert std == pytest.approx(std_ref, rel=0.015)


@pytest.mark.heavy
@pytest.mark.parametrize("pattern", ["standard", "IV-IV", "up:IV-IV", "II-II"])
def test_gaussian_mean_is_exact_and_std_error_shrinks_with_steps(pattern):
    """With cond = uncond the zigzag's guidance terms vanish; what remains is the O(h²)-per-step
    inversion error (ε taken at the lower level, docs/algorithms.md §1), so the std bias must fall as N grows while
    the mean stays right. Measured: IV-IV std 0.395 at N=50, 0.471 at N=200 (target 0.501)."""
    m50, s50, mean_ref, std_ref = _gaussian_run(pattern, 50)
    m200, s200, _, _ = _gaussian_run(pattern, 200)
    assert m50 == pytest.approx(mean_ref, abs=0.003) and m200 == pytest.approx(mean_ref, abs=0.003)
    assert abs(s200 - std_ref) < 0.5 * abs(s50 - std_ref)
    assert s50 < std_ref and s200 < std_ref  # DDIM and its zigzags shrink variance, never inflate it


def test_guidance_moves_the_mean_toward_the_condition():
    eps_c, eps_u = exact_eps(1.0, 0.5), exact_eps(-1.0, 0.5)
    model = cfg_model(eps_c, eps_u)
    x = torch.randn(1, 1, 1, 50, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = run("standard", {"I": model, "V": model}, x, guidance=1.0).mean().item()
    ivmix = run("IV-IV", {"I": model, "V": model}, x, guidance=1.0, w=1.0).mean().item()
    # every DDIM step is affine and the same for each element, so the output mean is the sampler run on the input's
    # mean: diffusers' DDIMScheduler on that one number, with the exact ε of N(1, 0.5²), is the reference
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD15, timestep_spacing="linspace")
    sched.set_timesteps(50)
    ab = sched.alphas_cumprod.double()
    m = torch.full((1,), x.mean().item(), dtype=torch.float64)
    for t in sched.timesteps.tolist():
        a = ab[t]
        m = sched.step((1 - a).sqrt() * (m - a.sqrt()) / (a * 0.25 + 1 - a), t, m).prev_sample
    assert plain == pytest.approx(m.item(), abs=1e-6)  # 0.963: the linspace label shift (docs/testing.md) lowers it
    assert ivmix > plain + 0.1  # docs/algorithms.md §2: the round trips add guidance beyond the main step's


def _scaled(x, t):
    return x / ALPHAS[t].sqrt() if t >= 0 else x / ALPHAS[0].sqrt()


def _sigma_bar(t):
    a = ALPHAS[max(t, 0)]
    return ((1 - a) / a).sqrt().item()


def _one_zigzag(pattern, models, x, t, n):
    v = parse_variant(pattern).variant
    ts = [t] * n  # the grid length sets Δ = 1000 // n; only the first step is used
    plan = compile_plan(v, timesteps=ts, down_table=TABLE, up_table=TABLE, guidance=[1.0],
                        idm_guidance=[CFGRamp(3.0, 3.0)], vdm_guidance=[CFGRamp(2.0, 2.0)])
    from pipelines.sampling import apply_move

    for mv in plan.steps[0].zigzag:
        x = apply_move(models, x, mv)
    return x


@pytest.mark.parametrize("t", [700, 400])
def test_round_trip_acts_as_extra_guidance_to_first_order(t):
    """docs/algorithms.md §2 (the guidance gap): down with ε^back then up with ε^go displaces x̄ by h(ε^go - ε^back) +
    O(h²); crossed IV-IV: h1(ε_V^go - ε_I^back) + h2(ε_I^go - ε_V^back) + O(h²). The residual must shrink like h²."""
    vdm = cfg_model(exact_eps(1.0, 0.6), exact_eps(-0.5, 0.8))
    idm = cfg_model(exact_eps(0.7, 0.4), exact_eps(0.2, 1.1))
    x = torch.randn(1, 1, 1, 16, 16, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    errors = {}
    for n in (20, 80, 320):  # Δ = 50, 12, 3
        d = 1000 // n
        p, pp = t - d, t - 2 * d
        h1, h2 = _sigma_bar(t) - _sigma_bar(p), _sigma_bar(p) - _sigma_bar(pp)
        one = torch.ones(1, dtype=torch.float64)
        e = lambda m, w: m(x, t, w * one)  # noqa: E731  ε at the start point
        out = _one_zigzag("IV-IV", {"I": idm, "V": vdm}, x, t, n)
        got = _scaled(out, t) - _scaled(x, t)
        pred = h1 * (e(vdm, -2.0) - e(idm, 3.0)) + h2 * (e(idm, -3.0) - e(vdm, 2.0))
        errors[n] = ((got - pred).norm() / pred.norm()).item()
        assert pred.norm() > 0
    # relative residual is O(h): it falls ~4x for each 4x finer Δ
    assert errors[80] < errors[20] / 2.5 and errors[320] < errors[80] / 2.5
    assert errors[320] < 0.05


def test_same_model_round_trip_with_equal_scales_is_nearly_identity():
    """docs/algorithms.md §2: with w_go = w_back the trip is ≈ identity (wasted compute); the code's -w makes it a
    push."""
    m = cfg_model(exact_eps(1.0, 0.6), exact_eps(-0.5, 0.8))
    x = torch.randn(1, 1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    same = _one_zigzag("V-V@w_go_V=2,w_back_V=2", {"V": m}, x, 500, 50)
    gap = _one_zigzag("V-V", {"V": m}, x, 500, 50)
    d_same = (same - x).norm().item()
    d_gap = (gap - x).norm().item()
    assert d_same < d_gap / 20
    assert math.isfinite(d_gap) and d_gap > 0
