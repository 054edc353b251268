"""Shared fixtures: tiny random models built offline once per session, and loaded backbones."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


@pytest.fixture(scope="session")
def tiny_ad_dir(tmp_path_factory) -> str:
    from pipelines.tiny import build_animatediff

    return build_animatediff(str(tmp_path_factory.mktemp("tiny") / "animatediff"))


@pytest.fixture(scope="session")
def ad_backbone(tiny_ad_dir):
    from pipelines.backbones import load_backbone
    from pipelines.config import ModelSpec

    return load_backbone(ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="float32"))


@pytest.fixture
def small():
    """Small sizes for tiny-model runs (fast on 2 CPU cores)."""
    return dict(steps=6, frames=8, height=64, width=64)


def rel(a, b) -> float:
    """Relative L2 error of a against the reference b."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_backbone_fixtures(backbone: str, folder_name: str):
    """(folder fixture, loaded-backbone fixture) for a tiny model set built once per test module; assign the
    first to a module global called `folder_name`."""

    @pytest.fixture(scope="module")
    def folder(tmp_path_factory):
        from pipelines.tiny import BUILDERS

        return BUILDERS[backbone](str(tmp_path_factory.mktemp("tiny") / backbone))

    @pytest.fixture(scope="module")
    def loaded(request):
        from pipelines.backbones import load_backbone
        from pipelines.config import ModelSpec

        path = request.getfixturevalue(folder_name)
        return load_backbone(ModelSpec.from_model_dir(backbone, path, device="cpu", dtype="float32"))

    return folder, loaded
