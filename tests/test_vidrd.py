"""VidRD, BIVDiff's default video model: the converter on a tiny checkpoint written in the published `ModelT2V.pth`
layout (spatial keys from diffusers' own SD UNet, temporal keys by the official module names), the converted UNet
against diffusers' UNet2DConditionModel with one frame, the temporal layers, eval mode, and the BIVDiff guards."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipelines.bivdiff.config import BivdiffSpec, resolve_bivdiff_params

CFG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
           cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
TEMP_CONV = (0, 3, 4, 7, 8, 11, 12, 15)  # GroupNorm and Conv3d positions of 4 x [GroupNorm, SiLU, Dropout, Conv3d]


def official_temporal_shapes(cfg: dict) -> dict[str, tuple]:
    """The temporal parameters the official VidRD UNet adds to SD's (add_temp_conv, add_temp_embed), by module name:
    a temporal conv layer after every resnet, a temporal attention (temp_norm, temp_attn) in every transformer block."""
    ch, out = cfg["block_out_channels"], {}

    def tconv(prefix: str, c: int) -> None:
        for i in TEMP_CONV:
            if i % 4 == 0:
                out[f"{prefix}.convs.{i}.weight"], out[f"{prefix}.convs.{i}.bias"] = (c,), (c,)
            else:
                out[f"{prefix}.convs.{i}.weight"], out[f"{prefix}.convs.{i}.bias"] = (c, c, 3, 1, 1), (c,)

    def tattn(prefix: str, c: int) -> None:
        p = f"{prefix}.transformer_blocks.0"
        out[f"{p}.temp_norm.weight"] = out[f"{p}.temp_norm.bias"] = (c,)
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            out[f"{p}.temp_attn.{name}.weight"] = (c, c)
        out[f"{p}.temp_attn.to_out.0.bias"] = (c,)

    n = cfg["layers_per_block"]
    for b, kind in enumerate(cfg["down_block_types"]):
        for j in range(n):
            tconv(f"down_blocks.{b}.temp_convs.{j}", ch[b])
            if kind.startswith("CrossAttn"):
                tattn(f"down_blocks.{b}.attentions.{j}", ch[b])
    for j in range(2):
        tconv(f"mid_block.temp_convs.{j}", ch[-1])
    tattn("mid_block.attentions.0", ch[-1])
    for b, kind in enumerate(cfg["up_block_types"]):
        c = ch[::-1][b]
        for j in range(n + 1):
            tconv(f"up_blocks.{b}.temp_convs.{j}", c)
            if kind.startswith("CrossAttn"):
                tattn(f"up_blocks.{b}.attentions.{j}", c)
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(SD-2.1-base-like folder, ModelT2V.pth in the published layout, its state_dict)."""
    from diffusers import UNet2DConditionModel

    from pipelines.fixtures.models import _vae, tiny_vidrd_base

    d = tmp_path_factory.mktemp("vidrd")
    base = str(d / "sd21")
    tiny_vidrd_base(base, _vae(1), seed=5)
    torch.manual_seed(11)
    spatial = UNet2DConditionModel(**CFG).state_dict()  # the official model loads SD's UNet weights under SD's names
    state = {f"unet.{k}": v.normal_(0, 0.05) for k, v in spatial.items()}
    g = torch.Generator().manual_seed(12)
    state.update({f"unet.{k}": torch.randn(s, generator=g) * 0.1 for k, s in official_temporal_shapes(CFG).items()})
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    for k, v in text.state_dict().items():  # the checkpoint's text encoder (transformers 4 naming), other weights
        state["text_encoder.text_model." + k.removeprefix("text_model.")] = torch.randn(v.shape, generator=g) * 0.05
    state["text_encoder.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    from diffusers import AutoencoderKL

    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    for k, v in AutoencoderKL.from_pretrained(base, subfolder="vae").state_dict().items():  # diffusers-0.1x VAE names
        for new, old in old_names.items():
            k = k.replace(new, old)
        state["vae." + k] = torch.randn(v.shape, generator=g) * 0.05
    state["clip.logit_scale"] = torch.tensor(4.6)
    ckpt = str(d / "ModelT2V.pth")
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    return base, ckpt, state


@pytest.mark.heavy
def test_converter_keeps_the_published_key_layout(official, tmp_path):
    from transformers import CLIPTextModel

    from pipelines.backbones.vidrd import convert
    from pipelines.backbones.vidrd_unet import VidRDUNet

    base, ckpt, state = official
    out = convert(ckpt, base, str(tmp_path / "vidrd"))
    unet = VidRDUNet.from_pretrained(out, subfolder="unet")
    ours = unet.state_dict()
    theirs = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
    assert set(ours) == set(theirs)  # parameter names = the checkpoint's keys
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    text = CLIPTextModel.from_pretrained(out, subfolder="text_encoder").state_dict()
    for k, v in state.items():
        if k.startswith("text_encoder.") and not k.endswith("position_ids"):
            name = k[len("text_encoder."):]
            name = name if name in text else name.removeprefix("text_model.")
            assert torch.equal(text[name], v), k
    assert unet.config.sample_size == 32 and unet.config.add_temp_conv and unet.config.add_temp_embed
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out, subfolder="vae").state_dict()
    assert any(".query." in k for k in state) and len(vae) == sum(k.startswith("vae.") for k in state)
    assert torch.equal(vae["encoder.mid_block.attentions.0.to_q.weight"],
                       state["vae.encoder.mid_block.attentions.0.query.weight"])
    assert sorted(os.listdir(out)) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae", "vidrd.json"]
    # a checkpoint with a wrong layout, or no UNet at all, is refused with the reason; nothing is left behind
    broken = dict(state)
    broken.pop("unet.mid_block.temp_convs.1.convs.15.weight")
    torch.save({"state_dict": broken}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing .*mid_block.temp_convs.1.convs.15.weight"):
        convert(str(tmp_path / "broken.pth"), base, str(tmp_path / "b"))
    torch.save({"state_dict": {"vae.x": torch.zeros(1)}}, tmp_path / "novae.pth")
    with pytest.raises(ValueError, match="no `unet"):
        convert(str(tmp_path / "novae.pth"), base, str(tmp_path / "c"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    r = subprocess.run([sys.executable, "-m", "pipelines.backbones.vidrd", "--checkpoint", str(tmp_path / "nope.pth"),
                        "--base", base, "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.heavy
def test_one_frame_is_sd21_and_frames_interact(official, tmp_path):
    """F = 1: the temporal layers are off and the UNet is diffusers' UNet2DConditionModel with the checkpoint's spatial
    weights; F > 1: frame 0's output depends on frame 1 (temporal conv/attention); eval mode is deterministic, train
    mode (the official code's: dropout on) is not."""
    from diffusers import UNet2DConditionModel

    from pipelines.backbones.vidrd import convert
    from pipelines.backbones.vidrd_unet import VidRDUNet

    base, ckpt, state = official
    unet = VidRDUNet.from_pretrained(convert(ckpt, base, str(tmp_path / "v")), subfolder="unet").eval()
    ref = UNet2DConditionModel(**CFG).eval()
    ref.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.") and "temp_" not in k})
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 1, 16, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    with torch.inference_mode():
        ours = unet(x, 421, text).sample
        theirs = ref(x[:, :, 0], 421, encoder_hidden_states=text).sample
        assert (ours[:, :, 0] - theirs).abs().max() < 1e-5
        v = torch.randn(1, 4, 3, 16, 16, generator=g)
        a = unet(v, 421, text[:1]).sample
        w = v.clone()
        w[:, :, 1] += 1.0
        assert (unet(w, 421, text[:1]).sample[:, :, 0] - a[:, :, 0]).abs().max() > 1e-3
        assert torch.equal(unet(v, 421, text[:1]).sample, a)
        unet.train()
        assert not torch.equal(unet(v, 421, text[:1]).sample, a)  # 0.1 dropout in every temporal conv layer


@pytest.mark.heavy
def test_bivdiff_with_vidrd_checks_text_space_and_schedule(tiny_bivdiff, tmp_path):
    """The VidRD worker reads text with its own encoder (width 24), runs in eval mode, and a VidRD folder whose VAE or
    noise schedule differs from the SD image model's is refused with the reason."""
    import json

    from pipelines.bivdiff.runner import BIVDiff

    spec = BivdiffSpec.from_model_dir(tiny_bivdiff, vdm="vidrd", device="cpu", dtype="float32")
    w = BIVDiff(spec)
    assert type(w.backbone).__name__ == "VidRD" and not w.backbone.unet.training
    assert (w.backbone.encode_text(["a dog"], "V").shape[-1] == 24
            and w.backbone.encode_text(["a dog"], "I").shape[-1] == 16)
    np.save(tmp_path / "e.npy", np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32))
    p = resolve_bivdiff_params({"task": "external", "source_video": str(tmp_path / "e.npy"), "vdm_prompt": "a dog",
                                "frames": 4, "height": 64, "width": 64, "steps": 5, "alpha": 0.5})
    r1, r2 = w.run(p, decode=False), w.run(p, decode=False)
    assert r1.calls == {"I": 5, "V": 10} and torch.equal(r1.latents, r2.latents)  # no dropout: repeatable

    for part, edit, match in (("vae", {"scaling_factor": 0.13025}, "latent space"),
                              ("scheduler", {"beta_end": 0.02}, "noise schedule")):
        other = tmp_path / f"vidrd_{part}"
        shutil.copytree(os.path.join(tiny_bivdiff, "vidrd"), other)
        path = other / part / ("config.json" if part == "vae" else "scheduler_config.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
        with pytest.raises(ValueError, match=match):
            BIVDiff(BivdiffSpec(vdm="vidrd", video_model=str(other), image_model=spec.image_model, device="cpu",
                                dtype="float32"))
    with pytest.raises(ValueError, match="not a converted VidRD folder.*pipelines.backbones.vidrd"):
        BIVDiff(BivdiffSpec(vdm="vidrd", video_model=os.path.join(tiny_bivdiff, "video_model"),
                            image_model=spec.image_model, device="cpu", dtype="float32"))


@pytest.mark.heavy
def test_vidrd_serves_iv_mixed_sampling_too(tiny_bivdiff, tmp_path):
    """The backbone behind `--backbone vidrd` of the single-video CLI: IV-Mixed with the SD IDM reading its own text."""
    from pipelines.video import read_mp4

    out = tmp_path / "iv.mp4"
    r = subprocess.run([sys.executable, "-m", "pipelines.sample", "--backbone", "vidrd", "--base",
                        os.path.join(tiny_bivdiff, "vidrd"), "--image-model", os.path.join(tiny_bivdiff, "image_model"),
                        "--prompt", "a dog", "--frames", "2", "--height", "64", "--width", "64", "--steps", "2",
                        "--device", "cpu", "--out", str(out), "-q"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IDM" in r.stdout and read_mp4(str(out))[0].shape == (2, 64, 64, 3)


@pytest.mark.heavy
def test_full_size_architecture_on_the_meta_device():
    """At SD-2.1-base's sizes (channels 320-1280, heads 5/10/20/20, text width 1024, linear projections) every spatial
    parameter has diffusers' UNet2DConditionModel name and shape (865,910,724 parameters); VidRD adds its temporal
    layers: 22 temporal conv layers with 4 dropouts each, and temporal attention in the 16 transformer blocks."""
    from diffusers import UNet2DConditionModel

    from pipelines.backbones.vidrd_unet import VidRDUNet

    cfg = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
               use_linear_projection=True, layers_per_block=2, sample_size=32)
    with torch.device("meta"):
        ours, sd = VidRDUNet(**cfg), UNet2DConditionModel(**cfg)
    a, b = ours.state_dict(), sd.state_dict()
    assert all(k in a and a[k].shape == b[k].shape for k in b)
    assert sum(p.numel() for p in sd.parameters()) == 865_910_724
    extra = set(a) - set(b)
    assert extra and all(".temp_convs." in k or ".temp_attn." in k or ".temp_norm." in k for k in extra)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in ours.modules()) == 88
    assert sum(".temp_attn.to_q." in k for k in a) == 16
