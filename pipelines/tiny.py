"""Tiny randomly initialised model sets, built offline and saved in diffusers' folder layout.

    python -m pipelines.tiny animatediff DIR

writes DIR/base (a StableDiffusionPipeline folder: unet, vae, text_encoder, tokenizer, scheduler),
DIR/motion_adapter and DIR/image_model (a second pipeline folder with a different UNet and text
encoder). They load through the same `from_pretrained` code as real checkpoints. Nothing is
downloaded: the CLIP tokenizer is a byte-level BPE vocabulary written here.

    python -m pipelines.tiny animatediff DIR --full-size [--dtype float16]

writes random weights at the published sizes instead, in the published repositories' layouts (`pipelines/published.py`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile

import torch

logger = logging.getLogger(__name__)

BACKBONES = ("animatediff", "modelscope", "videocrafter2")  # plus "bivdiff" (its model set) and "clip" (a scorer)
HIDDEN = 32  # text hidden size = UNet cross-attention dim
BLOCKS = (32, 64)
_MERGES = ["t h", "th e</w>", "i n", "a n", "e r", "o n", "r e", "a t", "e n", "o r"]
# SD1.5's scheduler_config.json (PNDM) — real base folders ship this; the sampler converts it to DDIM
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(keep, codes))]


def build_tokenizer(path: str):
    """A CLIPTokenizer over a byte-level vocabulary with a handful of merges (ids < 600)."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in _MERGES]:
        vocab.setdefault(s, len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
        tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                            model_max_length=77, pad_token="<|endoftext|>")
        tok.save_pretrained(path)
    return tok


def _text_encoder(seed: int, hidden: int = HIDDEN):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=hidden)
    return CLIPTextModel(cfg)


def _unet(seed: int, cross_dim: int = HIDDEN, low_res_attention: bool = False, in_channels: int = 4):
    """low_res_attention: attention only in the half-resolution block (cheap at 64x64 latents on a CPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    down = ("DownBlock2D", "CrossAttnDownBlock2D") if low_res_attention else ("CrossAttnDownBlock2D", "DownBlock2D")
    up = ("CrossAttnUpBlock2D", "UpBlock2D") if low_res_attention else ("UpBlock2D", "CrossAttnUpBlock2D")
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=BLOCKS,
        down_block_types=down, up_block_types=up, cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=8,
    )


def _perturb_zeros(module: torch.nn.Module) -> torch.nn.Module:
    """diffusers zero-initialises temporal output projections; perturb them so the temporal path really acts."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.2)
            elif p.dim() == 1 and name.endswith("bias") and torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.02)
    return module


def _unet3d(seed: int, cross_dim: int = HIDDEN, groups: int = 8):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return _perturb_zeros(UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=BLOCKS,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=groups,
    ))


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # four blocks -> spatial factor 8, like the SD VAE
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)


def _motion_adapter(seed: int):
    """diffusers zero-initialises the temporal output projections; perturb them so motion really acts."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    return _perturb_zeros(MotionAdapter(block_out_channels=BLOCKS, motion_layers_per_block=1, motion_norm_num_groups=8,
                                        motion_num_attention_heads=4, motion_max_seq_length=32))


def _pipeline_folder(path: str, *, unet, vae, text_encoder, tokenizer) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    cfg_path = os.path.join(path, "scheduler", "scheduler_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["clip_sample"] = False  # SD1.5's file carries this DDIM key too
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def _build_aside(out_dir: str, kind: str, seed: int, fill, **facts) -> str:
    """Run fill(tmp) in a sibling temp folder, write tiny.json last, then rename it to out_dir (never half-built)."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tiny-{kind}-", dir=parent)
    try:
        fill(tmp)
        with open(os.path.join(tmp, "tiny.json"), "w") as f:
            json.dump({"model": kind, "seed": seed, **facts}, f)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s %s models to %s", "full-size" if facts.get("full_size") else "tiny", kind, out_dir)
    return out_dir


def build_animatediff(out_dir: str, seed: int = 0) -> str:
    """Write base/, motion_adapter/ and image_model/ under out_dir."""

    def fill(tmp: str) -> None:
        tok = build_tokenizer(os.path.join(tmp, "tokenizer"))
        vae = _vae(seed + 1)
        _pipeline_folder(os.path.join(tmp, "base"), unet=_unet(seed + 2), vae=vae, text_encoder=_text_encoder(seed + 3), tokenizer=tok)
        _motion_adapter(seed + 4).save_pretrained(os.path.join(tmp, "motion_adapter"))
        _pipeline_folder(os.path.join(tmp, "image_model"), unet=_unet(seed + 5), vae=vae, text_encoder=_text_encoder(seed + 6), tokenizer=tok)
        shutil.rmtree(os.path.join(tmp, "tokenizer"))

    return _build_aside(out_dir, "animatediff", seed, fill)


MS_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")  # ms-1.7b [H]


def build_modelscope(out_dir: str, seed: int = 0) -> str:
    """base/ (a TextToVideoSDPipeline folder: UNet3D, VAE, text encoder width 32, tokenizer, DDIM scheduler) and
    image_model/ (an SD pipeline folder whose UNet and text encoder are 16 wide, so swapped text wiring fails)."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    def fill(tmp: str) -> None:
        tok = build_tokenizer(os.path.join(tmp, "tokenizer"))
        vae = _vae(seed + 1)
        TextToVideoSDPipeline(vae=vae, text_encoder=_text_encoder(seed + 3), tokenizer=tok, unet=_unet3d(seed + 2),
                              scheduler=DDIMScheduler(**MS_SCHEDULER)).save_pretrained(os.path.join(tmp, "base"))
        # the ModelScope code runs the IDM at 64x64 latents: keep its attention at 32x32 so CPU tests stay fast
        _pipeline_folder(os.path.join(tmp, "image_model"), unet=_unet(seed + 5, cross_dim=16, low_res_attention=True), vae=vae,
                         text_encoder=_text_encoder(seed + 6, hidden=16), tokenizer=tok)
        shutil.rmtree(os.path.join(tmp, "tokenizer"))

    return _build_aside(out_dir, "modelscope", seed, fill)


def build_videocrafter2(out_dir: str, seed: int = 0) -> str:
    """base/ (a zeroscope-style TextToVideoSDPipeline folder: VAE, text encoder, tokenizer, DDIM config; its own UNet
    is never used), unet/ (the VC UNet with fps conditioning, at the folder root like the hub repo) and image_model/."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    from .backbones.videocrafter_unet import UNet3DVideoCrafterConditionModel

    def fill(tmp: str) -> None:
        tok = build_tokenizer(os.path.join(tmp, "tokenizer"))
        vae = _vae(seed + 1)
        TextToVideoSDPipeline(vae=vae, text_encoder=_text_encoder(seed + 3), tokenizer=tok, unet=_unet3d(seed + 2),
                              scheduler=DDIMScheduler(**MS_SCHEDULER)).save_pretrained(os.path.join(tmp, "base"))
        torch.manual_seed(seed + 7)
        vc = _perturb_zeros(UNet3DVideoCrafterConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=BLOCKS,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=8))
        vc.save_pretrained(os.path.join(tmp, "unet"))
        _pipeline_folder(os.path.join(tmp, "image_model"), unet=_unet(seed + 5, cross_dim=16), vae=vae,
                         text_encoder=_text_encoder(seed + 6, hidden=16), tokenizer=tok)
        shutil.rmtree(os.path.join(tmp, "tokenizer"))

    return _build_aside(out_dir, "videocrafter2", seed, fill)


def build_bivdiff(out_dir: str, seed: int = 0) -> str:
    """BIVDiff's model set (docs/algorithms.md §8): image_model/ (SD pipeline: inversion UNet, the shared VAE,
    text encoder 16 wide), video_model/ (a zeroscope-style TextToVideoSDPipeline folder, UNet3D with 32 GroupNorm
    groups as diffusers 0.23 hard-codes (docs/algorithms.md §11 G), text encoder 32 wide), controlnet/ (from the image UNet,
    zero convolutions perturbed), instruct_pix2pix/ (8-channel UNet, Euler ancestral), inpainting/ (9-channel),
    t2i_adapter_depth/ and t2i_adapter_canny/ (3- and 1-channel T2I-Adapters) and vidrd/ (`build_vidrd`)."""
    from diffusers import (ControlNetModel, DDIMScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler,
                           StableDiffusionInpaintPipeline, StableDiffusionInstructPix2PixPipeline, T2IAdapter,
                           TextToVideoSDPipeline)

    sd_betas = {k: v for k, v in SD15_SCHEDULER.items() if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                                                  "steps_offset")}
    quiet = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def fill(tmp: str) -> None:
        tok = build_tokenizer(os.path.join(tmp, "tokenizer"))
        vae = _vae(seed + 1)
        image_unet = _unet(seed + 5, cross_dim=16)
        _pipeline_folder(os.path.join(tmp, "image_model"), unet=image_unet, vae=vae,
                         text_encoder=_text_encoder(seed + 6, hidden=16), tokenizer=tok)
        TextToVideoSDPipeline(vae=vae, text_encoder=_text_encoder(seed + 3), tokenizer=tok, unet=_unet3d(seed + 2, groups=32),
                              scheduler=DDIMScheduler(**MS_SCHEDULER)).save_pretrained(os.path.join(tmp, "video_model"))
        torch.manual_seed(seed + 7)
        controlnet = ControlNetModel.from_unet(image_unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        _perturb_zeros(controlnet).save_pretrained(os.path.join(tmp, "controlnet"))
        StableDiffusionInstructPix2PixPipeline(
            vae=vae, text_encoder=_text_encoder(seed + 8, hidden=16), tokenizer=tok,
            unet=_unet(seed + 9, cross_dim=16, in_channels=8), scheduler=EulerAncestralDiscreteScheduler(**sd_betas), **quiet,
        ).save_pretrained(os.path.join(tmp, "instruct_pix2pix"))
        StableDiffusionInpaintPipeline(
            vae=vae, text_encoder=_text_encoder(seed + 10, hidden=16), tokenizer=tok,
            unet=_unet(seed + 11, cross_dim=16, in_channels=9), scheduler=PNDMScheduler(**SD15_SCHEDULER), **quiet,
        ).save_pretrained(os.path.join(tmp, "inpainting"))
        for k, (name, channels) in enumerate((("depth", 3), ("canny", 1))):  # the canny adapter reads one channel
            torch.manual_seed(seed + 12 + k)
            T2IAdapter(in_channels=channels, channels=list(BLOCKS), num_res_blocks=1, downscale_factor=8,
                       adapter_type="full_adapter").save_pretrained(os.path.join(tmp, f"t2i_adapter_{name}"))
        build_vidrd(os.path.join(tmp, "vidrd"), vae, seed + 14)
        shutil.rmtree(os.path.join(tmp, "tokenizer"))

    return _build_aside(out_dir, "bivdiff", seed, fill)


VIDRD_TEXT = 24  # the tiny VidRD text width: neither the SD image model's (16) nor the ModelScope VDM's (32)


def tiny_vidrd_base(path: str, vae, seed: int) -> None:
    """A tiny SD-2.1-base-like pipeline folder: linear-projection UNet, its own text encoder, a tokenizer padding with
    "!" (as SD-2's), the SD-1.5 noise schedule."""
    from diffusers import UNet2DConditionModel

    tok = build_tokenizer(os.path.join(path, "tokenizer"))
    tok.pad_token = "!"
    tok.save_pretrained(os.path.join(path, "tokenizer"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=BLOCKS, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=VIDRD_TEXT,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    _pipeline_folder(path, unet=unet, vae=vae, text_encoder=_text_encoder(seed + 1, hidden=VIDRD_TEXT), tokenizer=tok)


def tiny_vidrd_checkpoint(path: str, base: str, seed: int) -> str:
    """A tiny `ModelT2V.pth` in the published layout ({"state_dict": unet.*, text_encoder.text_model.*, vae.*, clip.*}),
    random weights (temporal output projections perturbed from zero so the temporal layers act)."""
    from diffusers import AutoencoderKL

    from .backbones.vidrd_unet import VidRDUNet

    cfg = VidRDUNet.load_config(base, subfolder="unet")
    keys = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "norm_num_groups")
    torch.manual_seed(seed)
    unet = _perturb_zeros(VidRDUNet(**{k: cfg[k] for k in keys}, sample_size=4))
    text = _text_encoder(seed + 1, hidden=VIDRD_TEXT)
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"text_encoder.text_model.{k.removeprefix('text_model.')}": v for k, v in text.state_dict().items()})
    state["text_encoder.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state.update({f"vae.{k}": v for k, v in AutoencoderKL.from_pretrained(base, subfolder="vae").state_dict().items()})
    state["clip.logit_scale"] = torch.tensor(4.6)
    torch.save({"state_dict": state, "epoch": 0}, path)
    return path


def build_vidrd(out: str, vae, seed: int) -> str:
    """vidrd/: a tiny VidRD folder converted (`pipelines.backbones.vidrd.convert`) from a tiny SD-2.1-base-like folder
    and a tiny checkpoint in the published layout."""
    from .backbones.vidrd import convert

    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "sd21_base")
        tiny_vidrd_base(base, vae, seed)
        convert(tiny_vidrd_checkpoint(os.path.join(tmp, "ModelT2V.pth"), base, seed + 2), base, out, resolution=32)
    return out


def build_clip(out_dir: str, seed: int = 0) -> str:
    """A tiny random CLIPModel folder (model, tokenizer, image processor) for the quality scores."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    def fill(tmp: str) -> None:
        torch.manual_seed(seed)
        text = dict(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp)
        build_tokenizer(tmp)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp)

    return _build_aside(out_dir, "clip", seed, fill)


BUILDERS = {"animatediff": build_animatediff, "modelscope": build_modelscope, "videocrafter2": build_videocrafter2,
            "bivdiff": build_bivdiff, "clip": build_clip}


def ensure_tiny(backbone: str, out_dir: str, seed: int = 0) -> str:
    """Build once into a cache folder; a complete folder (tiny.json written last) is reused."""
    if backbone not in BUILDERS:
        raise ValueError(f"backbone: no tiny builder for {backbone!r}; choose one of {sorted(BUILDERS)}")
    if not os.path.exists(os.path.join(out_dir, "tiny.json")):
        BUILDERS[backbone](out_dir, seed)
    return out_dir


def add_bin_copies(folder: str) -> list[str]:
    """Write a `diffusion_pytorch_model.bin` next to every `.safetensors` UNet/VAE/ControlNet file (the official BIVDiff
    code loads its inflated SD UNet from the .bin only, docs/algorithms.md §8 H); returns the files written."""
    from safetensors.torch import load_file

    written = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name == "diffusion_pytorch_model.safetensors":
                dest = os.path.join(root, "diffusion_pytorch_model.bin")
                torch.save(load_file(os.path.join(root, name)), dest)
                written.append(dest)
    return written


def build_full_size(kind: str, out_dir: str, seed: int = 0, dtype: str = "float16") -> str:
    """Random-weight models at the published sizes, in the published folder layouts (pipelines/published.py LAYOUTS):
    `.bin`-only where the hub repository is, a root-level VAE folder (`vae/`) for `--vae`. Same tiny.json marker."""
    from .published import LAYOUTS, write_layout

    if kind not in LAYOUTS:
        raise ValueError(f"--full-size: no published layout for {kind!r}; choose one of {sorted(LAYOUTS)}")
    torch_dtype = getattr(torch, dtype)
    return _build_aside(out_dir, kind, seed, lambda tmp: write_layout(kind, tmp, torch_dtype, seed),
                        full_size=True, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("backbone", choices=sorted(BUILDERS))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-bin", action="store_true", help="also write .bin copies of the diffusers weights (official code)")
    ap.add_argument("--full-size", action="store_true",
                    help="random weights at the published sizes and layouts of the default models (GBs; see README)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="weights dtype of --full-size folders (default float16, as published)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .cli import quiet_libraries

    quiet_libraries()
    if args.full_size:
        build_full_size(args.backbone, args.out_dir, args.seed, args.dtype)
    else:
        BUILDERS[args.backbone](args.out_dir, args.seed)
    if args.with_bin:
        logger.info("wrote %d .bin copies", len(add_bin_copies(args.out_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
