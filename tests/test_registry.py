"""The backbone registry: a new backbone is one class registered by name, and every surface that names backbones sees
it (model specs and their defaults, row defaults, both CLIs' choices, BIVDiff's video model, the tiny fixtures)
without any other edit; unregistered, it is gone again."""
from __future__ import annotations

import pytest

from pipelines.backbones import registry
from pipelines.backbones.common import BackboneDefaults
from pipelines.backbones.modelscope import ModelScope
from pipelines.bivdiff import __main__ as bivdiff_cli
from pipelines.bivdiff.config import BivdiffSpec
from pipelines.config import ModelSpec, resolve_params
from pipelines.fixtures import tiny
from pipelines.sample import build_parser, list_backbones


def _build_fake(out_dir: str, seed: int = 0) -> str:
    return out_dir


class FakeScope(ModelScope):
    """A ModelScope-architecture backbone under its own name, with its own defaults and tiny builder."""

    name = "fakescope"
    defaults = BackboneDefaults(base="org/fake-video", motion_adapter=None, image_model="org/fake-image",
                                frames=6, height=96, width=160, fps=12, steps=7, guidance=5.5)
    main_solver = "sde-dpmpp2m"
    tiny = staticmethod(_build_fake)


def _choices(parser, dest: str) -> tuple:
    return tuple(next(a for a in parser._actions if a.dest == dest).choices)


@pytest.fixture
def fake():
    registry.register(FakeScope)
    try:
        yield FakeScope
    finally:
        registry.unregister(FakeScope.name)


def test_builtin_backbones_are_registered_by_their_class_names():
    assert list(registry.BACKBONES) == ["animatediff", "modelscope", "zeroscope", "videocrafter2", "vidrd"]
    for name, cls in registry.BACKBONES.items():
        assert cls.name == name and isinstance(cls.defaults, BackboneDefaults)
    assert registry.get("videocrafter2").main_solver == "sde-dpmpp2m"
    assert registry.get("animatediff").main_solver == "ddim"
    assert {n for n, c in registry.BACKBONES.items() if c.tiny} == {"animatediff", "modelscope", "videocrafter2"}


def test_a_registered_backbone_is_usable_by_name_everywhere(fake):
    spec = ModelSpec(backbone="fakescope")
    assert (spec.base, spec.image_model, spec.motion_adapter) == ("org/fake-video", "org/fake-image", None)
    p = resolve_params({"prompt": "a cat"}, backbone="fakescope")
    assert (p.frames, p.height, p.width, p.fps, p.steps, p.guidance) == (6, 96, 160, 12, 7, 5.5)
    assert "fakescope" in _choices(build_parser(), "backbone") and "fakescope" in list_backbones()
    assert "fakescope" in _choices(bivdiff_cli.build_parser(), "vdm")
    assert BivdiffSpec(vdm="fakescope").model_spec().base == "org/fake-video"
    assert tiny.builders()["fakescope"] is _build_fake
    assert registry.get("fakescope") is FakeScope


def test_an_unregistered_backbone_is_refused_with_the_choices():
    assert "fakescope" not in registry.BACKBONES
    with pytest.raises(ValueError, match=r"backbone: unknown 'fakescope'; choose one of \['animatediff'"):
        ModelSpec(backbone="fakescope")
    with pytest.raises(ValueError, match="BIVDiff's video model must be one of"):
        BivdiffSpec(vdm="fakescope")
    assert "fakescope" not in _choices(build_parser(), "backbone") and "fakescope" not in tiny.builders()


def test_registering_needs_a_name_and_defaults_and_refuses_a_second_class_under_one_name():
    class Nameless(ModelScope):
        name = None

    with pytest.raises(ValueError, match="needs a `name` and `defaults`"):
        registry.register(Nameless)

    class Impostor(ModelScope):
        name = "modelscope"

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Impostor)
    assert registry.get("modelscope") is ModelScope
