"""VidRD backbone (docs/algorithms.md §9): SD-2.1-base with VidRD's temporal layers (`vidrd_unet.VidRDUNet`), the text
encoder and VAE of `ModelT2V.pth` (SD-2 style, width 1024; SD-2.1-base's VAE only where the checkpoint has none), the
SD-2.1-base tokenizer and scheduler config; an SD-family IDM with its own text encoder. Always in eval mode (the
official code leaves its 0.1 dropouts on).

The published weights are one Lightning checkpoint; convert them once into a diffusers folder:

    python -m pipelines.backbones.vidrd --checkpoint ModelT2V.pth --base stabilityai/stable-diffusion-2-1-base --out DIR

and pass DIR as the video model (`--vdm vidrd --video-model DIR`, job config `bivdiff: {vdm: vidrd, video_model: DIR}`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

import torch

from .common import BackboneBase, BackboneDefaults, load_pretrained, resolve_placement

logger = logging.getLogger(__name__)

CONVERT = "python -m pipelines.backbones.vidrd --checkpoint ModelT2V.pth --base <SD-2.1-base> --out DIR"
# keys of the SD-2.1-base UNet config that carry over to VidRDUNet (the rest must keep SD's values, `_check_base`)
UNET_KEYS = ("in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "up_block_types",
             "block_out_channels", "layers_per_block", "downsample_padding", "norm_num_groups", "norm_eps",
             "cross_attention_dim", "attention_head_dim", "use_linear_projection", "upcast_attention")
FIXED = dict(act_fn="silu", center_input_sample=False, class_embed_type=None, num_class_embeds=None,
             dual_cross_attention=False, only_cross_attention=False, resnet_time_scale_shift="default",
             mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn")


class VidRD(BackboneBase):
    name = "vidrd"
    # BIVDiff's default VDM (docs/algorithms.md §9): SD-2.1-base + VidRD's temporal layers, text encoder from
    # ModelT2V.pth. `base` is the folder `python -m pipelines.backbones.vidrd` writes from ModelT2V.pth and this
    # SD-2.1-base folder; the SD-2.1-base folder alone has no temporal weights and is refused with that instruction.
    # Native size 256. Its tiny models are the BIVDiff set's vidrd/ (`python -m pipelines.fixtures.tiny bivdiff`).
    defaults = BackboneDefaults(
        base="stabilityai/stable-diffusion-2-1-base",
        motion_adapter=None,
        image_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        frames=8, height=256, width=256, fps=8,
    )
    repeated_blocks = ("Resnet", "Block", "TemporalConv")  # its own UNet's (pipelines/backbones/vidrd_unet.py)

    @classmethod
    def from_spec(cls, spec) -> "VidRD":
        device, dtype = resolve_placement(spec.device, spec.dtype)
        logger.info("loading VidRD: base=%s image_model=%s on %s/%s", spec.base, spec.image_model, device, dtype)
        from .vidrd_unet import VidRDUNet  # lazy: keeps diffusers out of row resolution

        config = VidRDUNet.load_config(spec.base, subfolder="unet")
        if config.get("_class_name") != VidRDUNet.__name__:
            raise ValueError(f"video_model: {spec.base!r} is not a converted VidRD folder (its UNet is "
                             f"{config.get('_class_name')}, without VidRD's temporal layers); convert ModelT2V.pth "
                             f"with `{CONVERT}` and pass DIR")
        unet, info = load_pretrained(VidRDUNet, spec.base, dtype, subfolder="unet", output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            raise ValueError(f"video_model: {spec.base!r} does not match the VidRD layout (missing "
                             f"{info['missing_keys'][:4]}, unexpected {info['unexpected_keys'][:4]})")
        return cls.assemble(spec, unet, dtype, device)  # eval(): dropout off (docs/algorithms.md §9)


# ---- converter -------------------------------------------------------------------------------------------------------
def _split(state: dict) -> dict[str, dict]:
    """{"unet": {...}, "text_encoder": {...}, "vae": {...}} from the checkpoint's prefixed keys (`clip.*` is
    dropped)."""
    out: dict[str, dict] = {"unet": {}, "text_encoder": {}, "vae": {}}
    for k, v in state.items():
        prefix, _, rest = k.partition(".")
        if prefix in out:
            out[prefix][rest] = v
    return out


def _text_keys(weights: dict, expected: set[str]) -> dict:
    """The checkpoint's text-encoder keys in this transformers version's naming: `position_ids` buffers dropped, the
    `text_model.` prefix added or removed to match the model (transformers 5 has none)."""
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    prefixed = any(k.startswith("text_model.") for k in expected)
    out = {}
    for k, v in weights.items():
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        out["text_model." + bare if prefixed else bare] = v
    return out


# the VAE attention names of the diffusers releases VidRD was trained with -> today's
_OLD_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _vae_keys(weights: dict) -> dict:
    out = {}
    for k, v in weights.items():
        for old, new in _OLD_VAE_ATTENTION.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def _check_base(config: dict, base: str) -> None:
    for key, value in FIXED.items():
        if key in config and config[key] != value and not (key == "mid_block_type" and config[key] is None):
            raise ValueError(f"base: {base!r} has UNet {key}={config[key]!r}; VidRD's architecture has {value!r}")


def load_checkpoint(path: str) -> dict:
    """The `state_dict` of a Lightning checkpoint (tensors only: `weights_only`, no code from the file runs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint: {path!r} does not exist") from None
    except Exception as err:  # noqa: BLE001 - pickles with objects, truncated files: one readable line
        raise ValueError(f"checkpoint: cannot read {path!r} as a tensor checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("unet.") for k in state):
        raise ValueError(f"checkpoint: {path!r} has no `unet.*` weights (expected ModelT2V.pth's Lightning layout)")
    return state


def convert(checkpoint: str, base: str, out: str, *, resolution: int = 256) -> str:
    """Write a diffusers folder (unet/ as VidRDUNet, text_encoder/ from the checkpoint, vae/ from the checkpoint when it
    has one, else the base's; tokenizer/ and scheduler/ from the base) to `out`, atomically (a temporary sibling folder
    renamed at the end). `resolution` only sets the UNet's nominal sample_size, as the official config."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .vidrd_unet import VidRDUNet  # lazy: keeps diffusers out of row resolution

    if os.path.exists(out):
        raise ValueError(f"out: {out!r} exists; give a new folder")
    parts = _split(load_checkpoint(checkpoint))
    base_unet = VidRDUNet.load_config(base, subfolder="unet")
    _check_base(base_unet, base)
    config = {k: base_unet[k] for k in UNET_KEYS if k in base_unet}
    unet = VidRDUNet(**config, sample_size=resolution // 8, add_temp_embed=True, add_temp_conv=True)
    report = unet.load_state_dict(parts["unet"], strict=False)
    if report.missing_keys or report.unexpected_keys:
        raise ValueError(f"checkpoint: its UNet does not match VidRD on the {base!r} architecture (missing "
                         f"{report.missing_keys[:4]} of {len(report.missing_keys)}, unexpected "
                         f"{report.unexpected_keys[:4]} of {len(report.unexpected_keys)})")
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(base, subfolder="text_encoder"))
    if parts["text_encoder"]:
        text_weights = _text_keys(parts["text_encoder"], set(text.state_dict()))
        report = text.load_state_dict(text_weights, strict=False)
        if report.missing_keys or report.unexpected_keys:
            raise ValueError(f"checkpoint: its text encoder does not match {base!r}'s (missing "
                             f"{report.missing_keys[:4]}, "
                             f"unexpected {report.unexpected_keys[:4]})")
    else:
        logger.warning("the checkpoint has no text encoder; using the base folder's")
        text = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    if parts["vae"]:  # BIVDiff decodes with the SD-1.5 VAE; this one serves `--backbone vidrd` sampling
        report = vae.load_state_dict(_vae_keys(parts["vae"]), strict=False)
        if report.missing_keys or report.unexpected_keys:
            raise ValueError(f"checkpoint: its VAE does not match {base!r}'s (missing {report.missing_keys[:4]}, "
                             f"unexpected {report.unexpected_keys[:4]})")
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(os.path.join(tmp, "unet"))
    text.save_pretrained(os.path.join(tmp, "text_encoder"))
    vae.save_pretrained(os.path.join(tmp, "vae"))
    CLIPTokenizer.from_pretrained(base, subfolder="tokenizer").save_pretrained(os.path.join(tmp, "tokenizer"))
    DDIMScheduler.from_config(DDIMScheduler.load_config(base, subfolder="scheduler")).save_pretrained(
        os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "vidrd.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint), "base": base, "resolution": resolution}, f, indent=1)
    os.replace(tmp, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines.backbones.vidrd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="VidRD's ModelT2V.pth (Lightning: state_dict with unet.*, ...)")
    ap.add_argument("--base", default="stabilityai/stable-diffusion-2-1-base",
                    help="SD-2.1-base pipeline (hub id or folder)")
    ap.add_argument("--out", required=True, help="new folder to write")
    ap.add_argument("--resolution", type=int, default=256,
                    help="nominal resolution (UNet sample_size x 8; default 256)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert(args.checkpoint, args.base, args.out, resolution=args.resolution)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
