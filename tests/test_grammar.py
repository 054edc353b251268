"""The variant grammar (docs/algorithms.md §3): parsing, compilation to moves, call counts, interval and zz
semantics."""
import pytest
import torch

from pipelines.grammar import FULL_RUN, NAMED, Interval, compile_plan, parse_variant
from pipelines.sampling import RowNoise, sample_plan
from pipelines.schedule import AlphaTable, CFGRamp, timesteps

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            set_alpha_to_one=False, steps_offset=1, clip_sample=False)
TABLE = AlphaTable.from_scheduler_config(SD15)
A = TABLE.at


def plan_for(pattern, n=50, rows=1, idm=CFGRamp(4, 4), vdm=CFGRamp(4, 4), interval=FULL_RUN, zz=None, keep_noop=False,
             guidance=7.5):
    v = parse_variant(pattern)
    return compile_plan(v.variant, timesteps=timesteps(n, "linspace"), down_table=TABLE, up_table=TABLE,
                        guidance=[guidance] * rows, idm_guidance=[idm] * rows, vdm_guidance=[vdm] * rows,
                        interval=v.params.get("interval", interval), zz=v.params.get("zz", zz), keep_noop=keep_noop)


def sig(mv):
    return (mv.model, mv.timestep, float(mv.a_from), float(mv.a_to), None if mv.w is None else float(mv.w[0]))


@pytest.mark.parametrize("name", sorted(NAMED))
def test_every_named_variant_parses_compiles_and_runs(name):
    plan = plan_for(name, n=50)
    counts = {"I": 0, "V": 0}

    def fake(tag):
        def model(x, t, w):
            counts[tag] += 1
            return torch.zeros_like(x) + 0.1

        return model

    x, calls = sample_plan({"I": fake("I"), "V": fake("V")}, torch.randn(1, 4, 2, 4, 4), plan, noise=RowNoise([0]))
    assert calls == counts == plan.calls()
    assert torch.isfinite(x).all()


def test_down_iv_iv_is_the_self_consistent_chain():
    """docs/algorithms.md §2 (down-first): I t->p (+w), V p->pp (+w), I pp->p (-w), V p->t (-w), then V t->t-Δ with
    7.5."""
    step = plan_for("down:IV-IV").steps[1]
    t, p, pp = 979, 959, 939
    assert step.t == t
    assert [sig(m) for m in step.zigzag] == [
        ("I", t, float(A(t)), float(A(p)), 4.0),
        ("V", p, float(A(p)), float(A(pp)), 4.0),
        ("I", pp, float(A(pp)), float(A(p)), -4.0),
        ("V", p, float(A(p)), float(A(t)), -4.0),
    ]
    assert sig(step.main) == ("V", t, float(A(t)), float(A(p)), 7.5)


def test_legacy_ad_labels_swap_the_first_two_substeps():
    """docs/algorithms.md §2 (labels=legacy_ad): the IDM predicts at p and steps p->pp although the latent is at t; the
    VDM then t->p."""
    step = plan_for("down:IV-IV@labels=legacy_ad").steps[1]
    t, p, pp = 979, 959, 939
    assert [sig(m) for m in step.zigzag] == [
        ("I", p, float(A(p)), float(A(pp)), 4.0),
        ("V", t, float(A(t)), float(A(p)), 4.0),
        ("I", pp, float(A(pp)), float(A(p)), -4.0),
        ("V", p, float(A(p)), float(A(t)), -4.0),
    ]


def test_up_first_is_the_paper_figure_with_clamping():
    steps = plan_for("up:IV-IV").steps
    t = steps[2].t
    assert t == 958
    assert [sig(m) for m in steps[2].zigzag] == [
        ("I", 958, float(A(958)), float(A(978)), -4.0),
        ("V", 978, float(A(978)), float(A(998)), -4.0),
        ("I", 998, float(A(998)), float(A(978)), 4.0),
        ("V", 978, float(A(978)), float(A(958)), 4.0),
    ]
    assert steps[0].zigzag == ()  # at t=999 every level clamps to 999: an exact identity, skipped
    assert len(plan_for("up:IV-IV", keep_noop=True).steps[0].zigzag) == 4


def test_final_zigzag_at_t0_is_an_exact_noop_and_skipped():
    clean, legacy = plan_for("IV-IV"), plan_for("IV-IV", keep_noop=True)
    assert clean.steps[-1].t == 0 and clean.steps[-1].zigzag == ()
    assert all(m.is_identity() for m in legacy.steps[-1].zigzag) and len(legacy.steps[-1].zigzag) == 4
    # and running it does not change the latent beyond float rounding
    x = torch.randn(1, 4, 2, 4, 4, dtype=torch.float64)
    eps = lambda x, t, w: torch.randn_like(x)  # noqa: E731  any ε: identity moves ignore it
    from pipelines.sampling import apply_move

    y = x
    for mv in legacy.steps[-1].zigzag:
        y = apply_move({"I": eps, "V": eps}, y, mv)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pattern, interval, zz, keep, expect", [
    ("standard", FULL_RUN, None, False, {"I": 0, "V": 50}),
    ("IV-IV", FULL_RUN, None, True, {"I": 100, "V": 150}),  # docs/algorithms.md §2: 250 calls
    ("IV-IV", FULL_RUN, None, False, {"I": 98, "V": 148}),  # t=0 skipped: N + 4K with K=49
    ("IV-IV", Interval.parse("0.0..0.5"), None, False, {"I": 50, "V": 100}),  # K=25: 150 calls (docs/algorithms.md §2)
    ("IV-IV", Interval.parse("0..9"), None, False, {"I": 20, "V": 70}),
    ("IV-IV", FULL_RUN, 3, True, {"I": 68, "V": 182}),  # VC zz=3 (docs/algorithms.md §2)
    ("IV-IV", FULL_RUN, 1000, True, {"I": 100, "V": 150}),  # AD zz=1000 = always IDM
    ("RR-II", FULL_RUN, None, True, {"I": 100, "V": 50}),
    ("I-I", FULL_RUN, None, True, {"I": 100, "V": 50}),
])
def test_call_counts(pattern, interval, zz, keep, expect):
    plan = plan_for(pattern, interval=interval, zz=zz, keep_noop=keep)
    assert plan.calls() == expect
    k = sum(1 for s in plan.steps if s.zigzag)
    assert sum(expect.values()) == 50 + 2 * len(parse_variant(pattern).variant.front) * k - sum(
        1 for s in plan.steps for m in s.zigzag if m.model == "R")


def test_zz_substitution_and_its_cfg_schedule():
    idm, vdm = CFGRamp(6, 6), CFGRamp(2, 2)
    for sub_cfg, w_expected in (("V", 2.0), ("I", 6.0)):
        plan = plan_for(f"IV-IV@sub_every=3(cfg={sub_cfg})", idm=idm, vdm=vdm)
        for s in plan.steps[:-1]:
            models = [m.model for m in s.zigzag]
            if s.index % 3 == 2:
                assert models == ["V", "V", "V", "V"]
                assert float(s.zigzag[0].w[0]) == w_expected and float(s.zigzag[2].w[0]) == -w_expected
            else:
                assert models == ["I", "V", "I", "V"]
                assert float(s.zigzag[0].w[0]) == 6.0


def test_interval_selects_steps():
    plan = plan_for("IV-IV", interval=Interval.parse("0.0..0.5"), n=10)
    assert [bool(s.zigzag) for s in plan.steps] == [True] * 5 + [False] * 5
    plan = plan_for("IV-IV", interval=Interval.parse("2..4"), n=10)
    assert [bool(s.zigzag) for s in plan.steps] == [False, False, True, True, True] + [False] * 5


def test_cfg_ramps_are_per_row_and_per_model():
    v = parse_variant("IV-IV").variant
    plan = compile_plan(v, timesteps=timesteps(10), down_table=TABLE, up_table=TABLE, guidance=[7.5, 3.0],
                        idm_guidance=[CFGRamp(6, 2, 7), CFGRamp(4, 4)], vdm_guidance=[CFGRamp(2, 6, 7), CFGRamp(5, 5)])
    first, last = plan.steps[0], plan.steps[8]
    assert first.main.w.tolist() == [7.5, 3.0]
    assert (first.zigzag[0].w.tolist() == pytest.approx([6.0, 4.0])
            and first.zigzag[2].w.tolist() == pytest.approx([-6.0, -4.0]))
    assert first.zigzag[1].w.tolist() == pytest.approx([2.0, 5.0])
    assert last.zigzag[0].w[0] < 2.5 and last.zigzag[1].w[0] > 5.0


def test_explicit_signed_scales_override_the_default_gap():
    step = plan_for("V-V@w_go_V=0,w_back_V=5.5").steps[3]  # Z-Sampling's defaults (docs/algorithms.md §2)
    assert [float(m.w[0]) for m in step.zigzag] == [5.5, 0.0]


def test_r_letter_is_a_forward_jump():
    # up-first (figure): fresh noise t -> t+Δ, then the IDM denoises back to t
    noise_mv, den = plan_for("up:R-I", n=10).steps[3].zigzag
    assert noise_mv.model == "R" and noise_mv.kind == "noise" and noise_mv.timestep is None
    assert float(noise_mv.a_to) < float(noise_mv.a_from) and den.model == "I" and den.src == noise_mv.dst
    # down-first: the IDM denoises t -> t-Δ, then fresh noise returns to t
    den, noise_mv = plan_for("down:R-I", n=10).steps[3].zigzag
    assert den.model == "I" and noise_mv.model == "R" and noise_mv.src == den.dst and noise_mv.dst == den.src
    # the jump is q(x_to | x_from): sqrt(ratio) x + sqrt(1 - ratio) z
    from pipelines.sampling import apply_move

    x, z = torch.randn(1, 4, 1, 2, 2), torch.randn(1, 4, 1, 2, 2)
    ratio = noise_mv.a_to / noise_mv.a_from
    torch.testing.assert_close(apply_move({}, x, noise_mv, noise=lambda _: z),
                               ratio.sqrt() * x + (1 - ratio).sqrt() * z)


@pytest.mark.parametrize("pattern", ["IV-IV", "up:IV-IV", "down:VI-IV@labels=legacy_ad", "II-VV@main=I",
                                     "V-V@w_go_V=-karras(6,2,7),w_back_V=4", "IV-IV@resize=nearest64,sub_cfg=I"])
def test_canonical_pattern_round_trips(pattern):
    v = parse_variant(pattern).variant
    assert parse_variant(v.pattern()).variant == v


@pytest.mark.parametrize("pattern, message", [
    ("IX-IV", "unknown letter"),
    ("IV-I", "mismatched halves"),
    ("IV-IR", "front half"),
    ("IVIV", "front-back"),
    ("I-V-I", "front-back"),
    ("IV-IV@foo=1", "unknown option"),
    ("IV-IV@labels=weird", "labels"),
    ("up:IV-IV@labels=legacy_ad", "legacy_ad"),
    ("V-V@labels=legacy_ad", "legacy_ad"),
    ("IV-IV@interval=5..2", "interval"),
    ("IV-IV@interval=0.5..0.5", "interval"),
    ("IV-IV@sub_every=x", "sub_every"),
    ("IV-IV@w_go_I=nan", "finite"),
    ("IV-IV@main", "key=value"),
    ("IV-IV@w_go_I=karras(6,2,7", "unbalanced"),
])
def test_bad_variants_raise_value_error(pattern, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(pattern)


def test_bad_interval_and_zz_raise():
    with pytest.raises(ValueError, match="out of range"):
        plan_for("IV-IV", n=10, interval=Interval.parse("0..10"))
    with pytest.raises(ValueError, match="zz"):
        plan_for("IV-IV", n=10, zz=0)
    with pytest.raises(ValueError, match="interval"):
        Interval.parse("1.2..0.5")
    with pytest.raises(ValueError):
        Interval.parse("3")
