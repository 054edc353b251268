"""The published configurations of the default hub repositories (`pipelines/model_configs/`, provenance in its
README) and models built from them: on the `meta` device for architecture facts (no memory, no weights), or with
random weights, saved in the published folder layouts (`python -m pipelines.tiny KIND DIR --full-size`)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


@dataclass(frozen=True)
class Component:
    """One model of a published repository: where its config lives and which class builds it."""

    repo: str  # hub id, e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5"
    sub: str | None  # subfolder ("unet", "vae", ...) or None for a repository whose model sits at its root
    cls: str  # diffusers / transformers / project class name

    @property
    def folder(self) -> str:
        return os.path.join(CONFIGS, self.repo.replace("/", "--"), self.sub or "")

    def config(self) -> dict:
        with open(os.path.join(self.folder, "config.json")) as f:
            return json.load(f)

    def build(self, device: str | torch.device = "meta") -> torch.nn.Module:
        """The model with this config; on `meta` no memory is allocated (parameter counts, shapes, key names)."""
        with torch.device(device):
            return model_class(self.cls).from_config(self.config()) if self.cls in _DIFFUSERS else _transformers(self)


_DIFFUSERS = ("UNet2DConditionModel", "UNet3DConditionModel", "AutoencoderKL", "MotionAdapter", "ControlNetModel",
              "UNet3DVideoCrafterConditionModel")


def model_class(name: str):
    if name == "UNet3DVideoCrafterConditionModel":
        from .backbones.videocrafter_unet import UNet3DVideoCrafterConditionModel

        return UNet3DVideoCrafterConditionModel
    import diffusers

    return getattr(diffusers, name)


def _transformers(c: Component) -> torch.nn.Module:
    import transformers

    config_cls = {"CLIPTextModel": transformers.CLIPTextConfig, "CLIPModel": transformers.CLIPConfig}[c.cls]
    return getattr(transformers, c.cls)(config_cls.from_dict(c.config()))


SD15, RV51, RV60 = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "SG161222/Realistic_Vision_V5.1_noVAE",
                    "SG161222/Realistic_Vision_V6.0_B1_noVAE")
MS, ZS, VC2 = "ali-vilab/text-to-video-ms-1.7b", "cerspense/zeroscope_v2_576w", "adamdad/videocrafterv2_diffusers"
IP2P, INPAINT = "timbrooks/instruct-pix2pix", "stable-diffusion-v1-5/stable-diffusion-inpainting"


def sd_pipeline(repo: str) -> dict[str, Component]:
    return {"unet": Component(repo, "unet", "UNet2DConditionModel"), "vae": Component(repo, "vae", "AutoencoderKL"),
            "text_encoder": Component(repo, "text_encoder", "CLIPTextModel")}


def video_pipeline(repo: str) -> dict[str, Component]:
    return {"unet": Component(repo, "unet", "UNet3DConditionModel"), "vae": Component(repo, "vae", "AutoencoderKL"),
            "text_encoder": Component(repo, "text_encoder", "CLIPTextModel")}


# Repositories whose published weights are pickled `.bin` only (no safetensors): the full-size layouts copy that.
BIN_ONLY = {ZS: ("unet", "vae", "text_encoder"), RV60: ("unet",), INPAINT: ("unet",)}

# What `--full-size` writes per kind: folder -> (repository, its components). model_index.json and the scheduler
# config are the repository's files in model_configs/; the tokenizer is the offline byte-level one (the real CLIP
# vocabulary is not shipped here; its ids fit the published 49,408-entry embedding).
LAYOUTS: dict[str, dict[str, tuple[str, dict[str, Component]]]] = {
    "animatediff": {
        "base": (RV51, sd_pipeline(RV51)),
        "motion_adapter": ("guoyww/animatediff-motion-adapter-v1-5-3",
                           {"": Component("guoyww/animatediff-motion-adapter-v1-5-3", None, "MotionAdapter")}),
        "image_model": (SD15, sd_pipeline(SD15)),
        "vae": ("stabilityai/sd-vae-ft-mse", {"": Component("stabilityai/sd-vae-ft-mse", None, "AutoencoderKL")}),
    },
    "modelscope": {"base": (MS, video_pipeline(MS)), "image_model": (SD15, sd_pipeline(SD15))},
    "videocrafter2": {
        "base": (ZS, {k: v for k, v in video_pipeline(ZS).items() if k != "unet"}),  # VC2 reads VAE/text/scheduler
        "unet": (VC2, {"": Component(VC2, None, "UNet3DVideoCrafterConditionModel")}),
        "image_model": (RV60, sd_pipeline(RV60)),
    },
    "bivdiff": {
        "image_model": (SD15, sd_pipeline(SD15)),
        "video_model": (ZS, video_pipeline(ZS)),
        "controlnet": ("lllyasviel/control_v11p_sd15_canny",
                       {"": Component("lllyasviel/control_v11p_sd15_canny", None, "ControlNetModel")}),
        "instruct_pix2pix": (IP2P, {**sd_pipeline(SD15), "unet": Component(IP2P, "unet", "UNet2DConditionModel")}),
        "inpainting": (INPAINT, {**sd_pipeline(SD15), "unet": Component(INPAINT, "unet", "UNet2DConditionModel")}),
    },
}

# Every default model of every backbone, BIVDiff task and the scorer (meta-device facts, README "Real checkpoints").
DEFAULT_MODELS: dict[str, Component] = {
    "sd15.unet": Component(SD15, "unet", "UNet2DConditionModel"), "sd15.vae": Component(SD15, "vae", "AutoencoderKL"),
    "sd15.text_encoder": Component(SD15, "text_encoder", "CLIPTextModel"),
    "rv51.unet": Component(RV51, "unet", "UNet2DConditionModel"), "rv51.vae": Component(RV51, "vae", "AutoencoderKL"),
    "rv51.text_encoder": Component(RV51, "text_encoder", "CLIPTextModel"),
    "rv60.unet": Component(RV60, "unet", "UNet2DConditionModel"),
    "motion_adapter.v1-5-3": Component("guoyww/animatediff-motion-adapter-v1-5-3", None, "MotionAdapter"),
    "motion_adapter.v1-5-2": Component("guoyww/animatediff-motion-adapter-v1-5-2", None, "MotionAdapter"),
    "ms.unet": Component(MS, "unet", "UNet3DConditionModel"), "ms.vae": Component(MS, "vae", "AutoencoderKL"),
    "ms.text_encoder": Component(MS, "text_encoder", "CLIPTextModel"),
    "zeroscope.unet": Component(ZS, "unet", "UNet3DConditionModel"),
    "vc2.unet": Component(VC2, None, "UNet3DVideoCrafterConditionModel"),
    "controlnet.canny": Component("lllyasviel/sd-controlnet-canny", None, "ControlNetModel"),
    "ip2p.unet": Component(IP2P, "unet", "UNet2DConditionModel"),
    "inpainting.unet": Component(INPAINT, "unet", "UNet2DConditionModel"),
    "sd_vae_ft_mse": Component("stabilityai/sd-vae-ft-mse", None, "AutoencoderKL"),
    "clip_scorer": Component("openai/clip-vit-base-patch32", None, "CLIPModel"),
}


def count(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, state-dict tensors) — works on `meta` modules."""
    return sum(p.numel() for p in module.parameters()), len(module.state_dict())


def write_random(c: Component, dest: str, dtype: torch.dtype, bin_only: bool, seed: int) -> int:
    """Random weights for `c` (the classes' own initialisation) saved to `dest` in `dtype`, with the published
    config.json put back verbatim (the loader reads what the hub serves). Returns the parameter count."""
    torch.manual_seed(seed)
    model = c.build("cpu").to(dtype)
    model.save_pretrained(dest)
    n = count(model)[0]
    del model
    if bin_only:  # pickled like the hub repository (transformers 5 writes safetensors whatever it is asked)
        from safetensors.torch import load_file

        for name, pickled in (("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                              ("model.safetensors", "pytorch_model.bin")):
            if os.path.isfile(os.path.join(dest, name)):
                torch.save(load_file(os.path.join(dest, name)), os.path.join(dest, pickled))
                os.remove(os.path.join(dest, name))
    shutil.copyfile(os.path.join(c.folder, "config.json"), os.path.join(dest, "config.json"))
    return n


def write_layout(kind: str, out_dir: str, dtype: torch.dtype, seed: int = 0) -> dict[str, int]:
    """Write the full-size random model folders of `kind` under out_dir (see LAYOUTS); returns parameters per folder."""
    from .tiny import build_tokenizer

    written: dict[str, int] = {}
    for i, (folder, (repo, parts)) in enumerate(LAYOUTS[kind].items()):
        root = os.path.join(out_dir, folder)
        for j, (sub, comp) in enumerate(parts.items()):
            bin_only = (comp.sub or "") in BIN_ONLY.get(comp.repo, ())
            n = write_random(comp, os.path.join(root, sub), dtype, bin_only, seed + 100 * i + j)
            written[f"{folder}/{sub}".rstrip("/")] = n
            logger.info("wrote %s/%s (%s, %.1f M parameters%s)", folder, sub, comp.repo, n / 1e6,
                        ", .bin" if bin_only else "")
        if "text_encoder" in parts:
            build_tokenizer(os.path.join(root, "tokenizer"))
        for name in ("model_index.json", os.path.join("scheduler", "scheduler_config.json")):
            src = os.path.join(CONFIGS, repo.replace("/", "--"), name)
            if "" not in parts and os.path.isfile(src):  # pipeline folders only; a bare model has its config alone
                os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
                shutil.copyfile(src, os.path.join(root, name))
    return written
