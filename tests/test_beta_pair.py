"""A tiny model pair whose image and video models have different β schedules (every other tiny set shares one table,
so these behaviours could not fail there): the clean presets refuse it, the legacy AnimateDiff preset's inversions
read the IDM scheduler's table, and BIVDiff refuses a VDM with another ᾱ table. Tables are checked against the closed
form of diffusers' scaled_linear schedule, not against the project's tables."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipelines.config import ModelSpec, resolve_params

IDM_BETA_END = 0.02  # the video models keep SD's 0.012


def alphas_cumprod(beta_end: float, start: float = 0.00085, n: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2)


def with_beta_end(folder: str, beta_end: float) -> None:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["beta_end"] = beta_end
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from pipelines.backbones.registry import load_backbone
    from pipelines.fixtures.models import build_animatediff

    folder = build_animatediff(str(tmp_path_factory.mktemp("pair") / "ad"))
    with_beta_end(os.path.join(folder, "image_model"), IDM_BETA_END)
    return load_backbone(ModelSpec.from_model_dir("animatediff", folder, device="cpu", dtype="float32"))


@pytest.mark.heavy
def test_clean_preset_refuses_two_schedules(pair):
    from pipelines.generate import build_plan

    p = resolve_params({"prompt": "x", "sampler": "ivmixed", "steps": 4, "frames": 2, "height": 64, "width": 64})
    with pytest.raises(ValueError, match="different noise schedules"):
        build_plan(pair, [p])


def test_legacy_ad_preset_inverts_on_the_image_models_table(pair):
    from pipelines.generate import build_plan

    p = resolve_params({"prompt": "x", "sampler": "ivmixed_ad_v1", "steps": 4, "frames": 2, "height": 64, "width": 64})
    plan = build_plan(pair, [p])
    video, image = alphas_cumprod(0.012), alphas_cumprod(IDM_BETA_END)
    at = lambda table, level: table[level] if level >= 0 else table[0]  # noqa: E731 - set_alpha_to_one false
    ups = [m for s in plan.steps for m in s.zigzag if m.kind == "up"]
    downs = [m for s in plan.steps for m in s.zigzag if m.kind == "down"] + [s.main for s in plan.steps]
    assert ups and downs
    assert any(abs(at(image, m.dst) - at(video, m.dst)) > 1e-2 for m in ups)  # the two tables are told apart
    for m in ups:
        assert float(m.a_to) == pytest.approx(at(image, m.dst), rel=1e-6)
    for m in downs:
        assert float(m.a_to) == pytest.approx(at(video, m.dst), rel=1e-6)


@pytest.mark.heavy
def test_bivdiff_refuses_a_vdm_with_another_table(tmp_path):
    from pipelines.bivdiff.config import BivdiffSpec
    from pipelines.bivdiff.runner import BIVDiff
    from pipelines.fixtures.tiny import ensure_tiny

    folder = str(tmp_path / "bivdiff")
    shutil.copytree(ensure_tiny("bivdiff", str(tmp_path / "src")), folder)
    with_beta_end(os.path.join(folder, "video_model"), IDM_BETA_END)
    with pytest.raises(ValueError, match=r"video_model: its noise schedule \(ᾱ table\) differs"):
        BIVDiff(BivdiffSpec.from_model_dir(folder, device="cpu", dtype="float32"))
