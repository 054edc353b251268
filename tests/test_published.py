"""The published architectures, built on the `meta` device from the configurations shipped in pipelines/model_configs:
parameter and tensor counts equal the published ones (or a closed-form count from the published shapes), and every
backbone x preset builds its ᾱ tables and timestep grid from its default models' real scheduler configs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipelines import presets
from pipelines.backbones import registry
from pipelines.fixtures.published import CONFIGS, DEFAULT_MODELS, LAYOUTS, count
from pipelines.generate import main_grid, move_tables

SD_UNET = 859_520_964  # SD-1.5 UNet2DConditionModel, as published (model card / diffusers docs)
VC2_UNET, VC2_TENSORS = 1_413_284_420, 1_484  # adamdad/videocrafterv2_diffusers (issue 12)
FPS_MLP = (320 * 1280 + 1280) + (1280 * 1280 + 1280)  # fps_embedding.linear_1 / linear_2 (320 -> 1280 -> 1280)
SD_VAE = 83_653_863  # AutoencoderKL of SD-1.x


def clip_text_params(vocab: int, positions: int, hidden: int, mlp: int, layers: int) -> int:
    """Closed form of a CLIP text transformer: embeddings, per layer 2 LayerNorms + q/k/v/out + 2-layer MLP, final
    LN."""
    layer = 2 * 2 * hidden + 4 * (hidden * hidden + hidden) + (hidden * mlp + mlp) + (mlp * hidden + hidden)
    return vocab * hidden + positions * hidden + layers * layer + 2 * hidden


def built(name: str):
    return DEFAULT_MODELS[name].build("meta")


@pytest.mark.parametrize("name", ["sd15.unet", "rv51.unet", "rv60.unet"])
def test_sd_unets_have_the_published_parameter_count(name):
    assert count(built(name))[0] == SD_UNET


def test_task_unets_widen_only_conv_in():
    # InstructPix2Pix: 8 input channels, inpainting: 9 — the extra input channels of the 3x3 conv_in (320 outputs)
    assert count(built("ip2p.unet"))[0] == SD_UNET + 4 * 320 * 9
    assert count(built("inpainting.unet"))[0] == SD_UNET + 5 * 320 * 9


@pytest.mark.heavy
def test_videocrafter2_unet_is_the_stock_unet3d_plus_four_fps_tensors():
    vc2, ms = built("vc2.unet"), built("ms.unet")
    assert count(vc2) == (VC2_UNET, VC2_TENSORS)
    assert count(ms) == (VC2_UNET - FPS_MLP, VC2_TENSORS - 4)
    assert set(vc2.state_dict()) - set(ms.state_dict()) == {
        "fps_embedding.linear_1.weight", "fps_embedding.linear_1.bias",
        "fps_embedding.linear_2.weight", "fps_embedding.linear_2.bias"}
    assert count(built("zeroscope.unet")) == count(ms)  # ZeroScope v2 fine-tunes the ModelScope architecture


@pytest.mark.parametrize("name", ["sd15.vae", "rv51.vae", "ms.vae", "sd_vae_ft_mse"])
def test_vaes_are_the_sd_vae(name):
    assert count(built(name))[0] == SD_VAE


def test_text_encoders_match_the_closed_form_of_their_published_shapes():
    assert count(built("sd15.text_encoder"))[0] == clip_text_params(49408, 77, 768, 3072, 12) == 123_060_480
    # ModelScope: OpenCLIP ViT-H text tower with its last layer dropped (23 layers, 1024 wide)
    assert count(built("ms.text_encoder"))[0] == clip_text_params(49408, 77, 1024, 4096, 23)


@pytest.mark.heavy
def test_motion_adapter_keys_line_up_with_the_base_unet():
    """The direct (no float32 copy) motion-UNet build applies at full size: base UNet keys + the adapter's motion keys
    are exactly UNetMotionModel's keys, for both published adapters."""
    from diffusers import UNetMotionModel

    unet = built("rv51.unet")
    for name in ("motion_adapter.v1-5-3", "motion_adapter.v1-5-2"):
        adapter = built(name)
        with torch.device("meta"):
            model = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
        motion = {k for k in adapter.state_dict() if ".motion_modules." in k}
        assert set(model.state_dict()) == set(unet.state_dict()) | motion
        assert model.config.motion_max_seq_length == 32


def test_every_shipped_config_is_listed_in_the_readme():
    with open(os.path.join(CONFIGS, "README.md")) as f:
        readme = f.read()
    for repo in sorted(os.listdir(CONFIGS)):
        if os.path.isdir(os.path.join(CONFIGS, repo)):
            assert f"`{repo.replace('--', '/')}`" in readme, repo


# -- schedules: every backbone x preset from the real scheduler configs -------------------------------------------

def scaled_linear_alphas_cumprod(start=0.00085, end=0.012, n=1000) -> np.ndarray:
    betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def backbone_on_meta(name: str):
    """The backbone class built through its constructor from meta-device models and the published scheduler configs,
    read with diffusers' own loader from the shipped folders (a folder reads like a hub repository)."""
    from diffusers import DDIMScheduler, UNetMotionModel

    folder = lambda repo: os.path.join(CONFIGS, repo.replace("/", "--"))  # noqa: E731
    d = registry.defaults(name)
    layout = LAYOUTS[name]
    if name == "animatediff":
        with torch.device("meta"):
            unet = UNetMotionModel.from_unet2d(built("rv51.unet"), built("motion_adapter.v1-5-3"), load_weights=False)
    else:
        unet = built("vc2.unet" if name == "videocrafter2" else "ms.unet")
    cls = registry.get(name)
    return cls(tokenizer=None, text_encoder=None, vae=built("sd15.vae"), unet=unet,
               scheduler_config=DDIMScheduler.load_config(folder(d.base), subfolder="scheduler"),
               image_unet=layout["image_model"][1]["unet"].build("meta"),
               image_scheduler_config=DDIMScheduler.load_config(folder(d.image_model), subfolder="scheduler"),
               device=torch.device("cpu"), dtype=torch.float16)


CASES = [(b, p) for b in ("animatediff", "modelscope", "videocrafter2") for p, preset in presets.PRESETS.items()
         if not preset.backbones or b in preset.backbones]


@pytest.mark.heavy
@pytest.mark.parametrize("backbone,preset", CASES)
def test_every_backbone_and_preset_builds_from_the_published_scheduler_configs(backbone, preset):
    bb = backbone_on_meta(backbone)
    p = presets.PRESETS[preset]
    down, up = move_tables(bb, p)
    truth = scaled_linear_alphas_cumprod()
    for table in (down, up):
        np.testing.assert_allclose(table.alphas_cumprod.double().numpy(), truth, rtol=2e-6)
        assert float(table.below_zero) == pytest.approx(truth[0], rel=1e-6)  # set_alpha_to_one false everywhere
    grid = main_grid(bb, p, 50)
    if registry.get(backbone).main_solver == "ddim":
        assert grid == [int(t) for t in np.linspace(0, 999, 50).round()[::-1]]  # linspace, as the AD/MS code
    else:  # DPM-Solver++ over the zeroscope config: diffusers' default linspace grid of 51 points, last dropped
        assert grid == [int(t) for t in np.linspace(0, 999, 51).round()[::-1][:-1]]


def test_the_animatediff_default_base_names_a_deis_scheduler():
    with open(os.path.join(CONFIGS, "SG161222--Realistic_Vision_V5.1_noVAE", "scheduler",
                           "scheduler_config.json")) as f:
        cfg = json.load(f)
    assert cfg["_class_name"] == "DEISMultistepScheduler" and "timestep_spacing" not in cfg  # the case that must work


@pytest.mark.heavy
def test_schedules_that_differ_only_in_set_alpha_to_one_share_the_video_models_table(caplog):
    bb = backbone_on_meta("animatediff")
    bb.image_scheduler_config = {**bb.image_scheduler_config, "set_alpha_to_one": True,
                                 "_class_name": "EulerDiscreteScheduler"}
    with caplog.at_level("INFO"):
        down, up = move_tables(bb, presets.PRESETS["ivmixed"])
    assert down is up and float(down.below_zero) == pytest.approx(scaled_linear_alphas_cumprod()[0])
    assert "set_alpha_to_one" in caplog.text
    bb.image_scheduler_config = {**bb.image_scheduler_config, "beta_end": 0.02}
    with pytest.raises(ValueError, match="different noise schedules"):
        move_tables(bb, presets.PRESETS["ivmixed"])


def test_the_clip_scorer_is_vit_b32():
    assert count(built("clip_scorer"))[0] == 151_277_313  # openai/clip-vit-base-patch32
