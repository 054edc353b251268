"""DDIM moves, timestep grids and CFG ramps against diffusers' schedulers and the spec's numbers."""
import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from pipelines.schedule import AlphaTable, CFGRamp, ddim_move, karras_ramp, timesteps

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            set_alpha_to_one=False, steps_offset=1, clip_sample=False)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 7, 25, 50, 999])
def test_timesteps_match_diffusers(spacing, n):
    sched = DDIMScheduler(**{**SD15, "timestep_spacing": spacing})
    sched.set_timesteps(n)
    assert timesteps(n, spacing, 1000, steps_offset=1) == sched.timesteps.tolist()


def test_linspace_grid_of_the_paper():
    ts = timesteps(50, "linspace")
    assert ts[:5] == [999, 979, 958, 938, 917] and ts[-4:] == [61, 41, 20, 0]  # docs/algorithms.md §1


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_alpha_table_is_diffusers_table(beta_schedule):
    cfg = {**SD15, "beta_schedule": beta_schedule}
    table = AlphaTable.from_scheduler_config(cfg)
    ref = DDIMScheduler(**cfg)
    assert torch.equal(table.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(table.at(-20), ref.final_alpha_cumprod) and torch.equal(table.at(-20), ref.alphas_cumprod[0])


def test_v_prediction_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        AlphaTable.from_scheduler_config({**SD15, "prediction_type": "v_prediction"})


@pytest.mark.parametrize("t", [999, 500, 20, 0])
def test_down_move_is_ddim_step(t):
    n = 50
    sched = DDIMScheduler(**SD15)
    sched.set_timesteps(n)
    table = AlphaTable.from_scheduler_config(SD15)
    g = torch.Generator().manual_seed(t)
    x, eps = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    ref = sched.step(eps, t, x, eta=0.0).prev_sample
    ours = ddim_move(x, eps, table.at(t), table.at(t - 1000 // n))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", [999, 500, 20, 0])
def test_up_move_is_ddim_inverse_step(target):
    n = 50
    inv = DDIMInverseScheduler(**{k: v for k, v in SD15.items() if k != "steps_offset"})
    inv.set_timesteps(n)
    table = AlphaTable.from_scheduler_config(SD15)
    g = torch.Generator().manual_seed(target + 1)
    x, eps = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 4, 2, 8, 8, generator=g)
    ref = inv.step(eps, target, x).prev_sample
    ours = ddim_move(x, eps, table.at(target - 1000 // n), table.at(target))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_denoise_then_invert_with_exact_noise_oracle_returns_to_start():
    """With the true ε of a sample, DDIM lands exactly on √ᾱ' x0 + √(1-ᾱ') ε and inversion comes back."""
    table = AlphaTable.from_scheduler_config(SD15)
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(1, 4, 4, 8, 8, generator=g, dtype=torch.float64),
               torch.randn(1, 4, 4, 8, 8, generator=g, dtype=torch.float64))
    for s, s2 in [(999, 979), (500, 480), (40, 20), (20, 0)]:
        a, a2 = table.at(s).double(), table.at(s2).double()
        xs = a.sqrt() * x0 + (1 - a).sqrt() * eps
        down = ddim_move(xs, eps, a, a2)
        torch.testing.assert_close(down, a2.sqrt() * x0 + (1 - a2).sqrt() * eps, rtol=0, atol=1e-10)
        torch.testing.assert_close(ddim_move(down, eps, a2, a), xs, rtol=0, atol=1e-10)


def test_karras_ramp_reproduces_spec_examples():
    r = karras_ramp(6, 2, 7, 50)
    assert r[0] == pytest.approx(6) and r[-1] == pytest.approx(2)
    assert [round(r[i], 2) for i in (10, 25, 40)] == [4.86, 3.50, 2.48]
    up = karras_ramp(2, 6, 7, 50)
    assert [round(up[i], 2) for i in (10, 25, 40)] == [2.54, 3.58, 4.97]
    flat = karras_ramp(6, 2, 1 / 7, 50)
    assert [round(flat[i], 2) for i in (10, 25, 40)] == [5.81, 5.42, 4.71]


def test_karras_ramp_spans_the_actual_number_of_steps():
    for n in (10, 25, 80):  # the official code's n is fixed at 50 (docs/algorithms.md §5); ours follows N
        r = karras_ramp(6, 2, 7, n)
        assert len(r) == n and r[0] == pytest.approx(6) and r[-1] == pytest.approx(2)
        assert all(a > b for a, b in zip(r, r[1:]))
    assert karras_ramp(4, 4, 7, 5) == [4.0] * 5 and karras_ramp(6, 2, 7, 1) == pytest.approx([6.0])


@pytest.mark.parametrize("text, expect", [
    ("4", (4, 4, 7, 1)), ("-4", (4, 4, 7, -1)), ("6,2,7", (6, 2, 7, 1)), ("6,2", (6, 2, 7, 1)),
    ("karras(6,2,1/7)", (6, 2, 1 / 7, 1)), ("-karras(2,6,7)", (2, 6, 7, -1)), (7.5, (7.5, 7.5, 7, 1)),
])
def test_cfg_ramp_parse(text, expect):
    r = CFGRamp.parse(text)
    assert (r.begin, r.end, r.rho, r.sign) == pytest.approx(expect)
    assert CFGRamp.parse(r.text()) == r


@pytest.mark.parametrize("bad", ["nan", "abc", "1,2,3,4", float("nan"), float("inf"), "6,-2", "karras(0,2,7)"])
def test_cfg_ramp_rejects(bad):
    with pytest.raises(ValueError):
        CFGRamp.parse(bad)


def test_steps_bounds():
    with pytest.raises(ValueError, match="steps"):
        timesteps(0)
    assert math.isclose(len(timesteps(1000)), 1000)
