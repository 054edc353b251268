"""Stage 1: frame-wise generation or editing with a task image model through diffusers pipelines (docs/algorithms.md
§8).

Every frame is denoised with the IDM's own scheduler, `idm_steps` steps and the stage-1 CFG. Noise policies
(docs/algorithms.md §7, §8): "independent" = one CPU generator seeded `seed` drawn frame after frame (the official
behaviour: one pipeline call per frame, in order); "shared" = every frame from a generator seeded `seed` (same noise
per frame); "per_frame" = frame i from a generator seeded `seed + i`. The last two do not depend on frame order, so up
to `batch` frames go through one pipeline call with one generator per frame (diffusers' list-of-generators contract)
and give the same frames as one call per frame. Outputs are uint8 frames, as the official code hands PIL images to
stage 2.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable

import numpy as np
import torch

from .. import presets
from ..video import unit_to_uint8
from . import p2p

logger = logging.getLogger(__name__)


def canny(image: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """OpenCV's Canny edges (3 x 3 Sobel, L1 gradient, hysteresis `low`/`high`: the official processor's 100/200) of an
    (H, W, 3) uint8 image as an (H, W) uint8 0/255 map."""
    import cv2

    return cv2.Canny(np.ascontiguousarray(image), low, high)


ANNOTATOR_RESOLUTION = 512  # the official condition processors' detect and image resolution


def annotator_size(height: int, width: int, resolution: int = ANNOTATOR_RESOLUTION) -> tuple[int, int]:
    """The official processor's size rule (docs/algorithms.md §8): short side scaled to `resolution`, each side then
    rounded to the nearest multiple of 64."""
    k = float(resolution) / min(height, width)
    return int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64


def annotator_resize(image: np.ndarray, resolution: int = ANNOTATOR_RESOLUTION) -> np.ndarray:
    """Resize to `annotator_size` with OpenCV: Lanczos when enlarging, area when shrinking (the processor's filters)."""
    import cv2

    h, w = annotator_size(image.shape[0], image.shape[1], resolution)
    if (h, w) == image.shape[:2]:
        return image
    grow = resolution / min(image.shape[:2]) > 1
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LANCZOS4 if grow else cv2.INTER_AREA)


def condition_maps(frames: np.ndarray, compat: bool) -> np.ndarray:
    """Canny maps of uint8 frames, (F, H', W'): compat computes them at the processor's size (`annotator_resize`), as
    the official stage 1, and the stage-1 model then runs at that size; clean computes them at the frame size."""
    return np.stack([canny(annotator_resize(f) if compat else f) for f in frames])


def resize_back(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stage-1 frames of another size back to height x width with PIL's Lanczos (the official stage-2 image
    processor's filter, docs/algorithms.md §8)."""
    from PIL import Image

    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.LANCZOS)) for f in frames])


def outpaint_mask(kind: str, height: int, width: int) -> np.ndarray:
    """Static outpainting mask, 255 = fill (docs/algorithms.md §8): horizontal = top and bottom quarters, vertical =
    left/right."""
    mask = np.zeros((height, width), np.uint8)
    if kind == "horizontal":
        mask[: height // 4] = 255
        mask[height - height // 4 :] = 255
    elif kind == "vertical":
        mask[:, : width // 4] = 255
        mask[:, width - width // 4 :] = 255
    else:
        raise ValueError(f"outpaint mask must be horizontal or vertical, got {kind!r}")
    return mask


class Stage1:
    """Builds each task's diffusers pipeline once (sharing the SD components the worker already holds) and runs it
    frame by frame. `components` = modules of the SD image model to share (text_encoder, tokenizer, unet: the ControlNet
    base)."""

    def __init__(self, spec, components: dict, device: torch.device, dtype: torch.dtype, cache: int = 2,
                 batch: int = 8):
        if batch < 1:
            raise ValueError(f"stage1_batch: must be >= 1, got {batch}")
        self.spec, self.components, self.device, self.dtype = spec, components, device, dtype
        self.cache_size, self.batch = cache, batch
        self._pipes: dict[str, object] = {}

    def pipeline(self, task):
        key = self.spec.task_model(task)
        if key in self._pipes:
            self._pipes[key] = self._pipes.pop(key)  # most recently used last
            return self._pipes[key]
        while len(self._pipes) >= self.cache_size:
            self._pipes.pop(next(iter(self._pipes)))
        self._pipes[key] = pipe = self._load(task, key)
        return pipe

    def _load(self, task, source: str):
        import diffusers

        # read straight into the run dtype (no float32 copy, no cast warning); pipelines call it `dtype` where diffusers
        # deprecates `torch_dtype` (0.42: a FutureWarning per load), models keep `torch_dtype`
        key = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"
        quiet = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False, key: self.dtype}
        logger.info("loading stage-1 %s model %s", task.idm, source)
        if task.idm == "controlnet":
            controlnet = diffusers.ControlNetModel.from_pretrained(source, torch_dtype=self.dtype)
            pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
                self.spec.image_model, controlnet=controlnet, **self.components, **quiet)
        elif task.idm == "t2i_adapter":  # the official T2I-Adapter path samples with DDIM (docs/algorithms.md §8)
            adapter = diffusers.T2IAdapter.from_pretrained(source, torch_dtype=self.dtype)
            pipe = diffusers.StableDiffusionAdapterPipeline.from_pretrained(
                self.spec.image_model, adapter=adapter, **self.components, **quiet)
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        elif task.idm == "p2p":  # the SD image model itself; its scheduler is chosen per row (`p2p`)
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, **self.components, **quiet)
            pipe.own_scheduler = pipe.scheduler  # the model folder's (compat samples with it); clean swaps in DDIM
        elif task.idm == "instruct_pix2pix":
            pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(source, **quiet)
        elif task.idm == "inpainting":
            pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(source, **quiet)
        else:
            raise ValueError(f"task {task.name!r} has no stage-1 model")
        pipe.to(device=self.device, dtype=self.dtype)  # its own VAE too: diffusers feeds it latents in the run dtype
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.inference_mode()
    def run(self, params, source: np.ndarray | None, mask: np.ndarray | None,
            condition: np.ndarray | None) -> np.ndarray:
        """(F, H, W, 3) uint8 edited frames for one row."""
        from PIL import Image

        task = params.spec_task
        pipe = self.pipeline(task)
        prompt, negative = params.stage1_prompts()
        h, w = params.height, params.width
        common = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=params.idm_steps,
                      guidance_scale=params.idm_guidance, output_type="np")
        per_frame: Callable[[int], dict]
        if task.idm in ("controlnet", "t2i_adapter"):
            compat = params.preset.compat
            if task.condition == "canny":  # ControlNet reads 3 channels, the canny T2I-Adapter one
                maps = condition_maps(source, compat)
                maps = np.repeat(maps[..., None], 3, -1) if task.idm == "controlnet" else maps
            else:
                maps = condition
            per_frame = lambda i: dict(image=Image.fromarray(maps[i]))  # noqa: E731 - the branch picks the inputs
            if not compat:  # compat: the model runs at the condition map's size, then frames are resized back
                common.update(height=h, width=w)
        elif task.idm == "instruct_pix2pix":
            per_frame = lambda i: dict(image=Image.fromarray(source[i]))  # noqa: E731 - the branch picks the inputs
            common.update(image_guidance_scale=params.image_guidance)
        else:
            masks = mask if task.mask == "video" else np.stack([outpaint_mask(task.mask, h, w)] * params.frames)
            per_frame = lambda i: dict(image=Image.fromarray(source[i]),  # noqa: E731 - the branch picks the inputs
                                       mask_image=Image.fromarray(masks[i]))
            common.update(height=h, width=w)
        out = []
        with warnings.catch_warnings():
            # diffusers' T2I-Adapter pipeline calls its own deprecated decode_latents: a notice for its authors
            warnings.filterwarnings("ignore", message="The decode_latents method is deprecated", category=FutureWarning)
            if params.noise == "independent":
                gen = torch.Generator("cpu").manual_seed(params.seed)
                for i in range(params.frames):
                    out.append(pipe(**common, **per_frame(i), generator=gen).images[0])
            else:
                for start in range(0, params.frames, self.batch):
                    idx = list(range(start, min(start + self.batch, params.frames)))
                    seeds = [params.seed + (i if params.noise == "per_frame" else 0) for i in idx]
                    inputs = [per_frame(i) for i in idx]
                    batched = {k: [d[k] for d in inputs] for k in inputs[0]}
                    images = pipe(**{**common, "prompt": [prompt] * len(idx),
                                     "negative_prompt": [negative] * len(idx)},
                                  **batched, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
                    out.extend(images)
        return resize_back(unit_to_uint8(np.stack(out)), h, w)

    @torch.inference_mode()
    def p2p(self, params, noise: torch.Tensor) -> np.ndarray:
        """Prompt2Prompt (docs/algorithms.md §8): each frame's inverted latent `noise` (1, C, F, h, w), duplicated for
        [idm_prompt (source caption), vdm_prompt (edited caption)], denoised with the attention control of `p2p.py`;
        the edited frames, (F, H, W, 3) uint8. Scheduler: the image model's own (compat) or DDIM on the
        inversion's grid (clean)."""
        import diffusers

        task = params.spec_task
        pipe = self.pipeline(task)
        own = pipe.own_scheduler
        pipe.scheduler = own if params.preset.compat else diffusers.DDIMScheduler.from_config(own.config)
        prompts = [params.idm_prompt, params.vdm_prompt]
        h, w = noise.shape[-2:]
        out = []
        for i in range(params.frames):
            control = p2p.P2PControl(prompts, pipe.tokenizer, edit_type=params.edit_type, steps=params.idm_steps,
                                     cross=params.cross_replace, self_=params.self_replace,
                                     blend_words=params.blend_words(), self_max_tokens=presets.P2P_SELF_MAX_TOKENS,
                                     threshold=presets.P2P_BLEND_THRESHOLD)
            previous = p2p.install(pipe.unet, control)
            try:
                latents = noise[:, :, i].to(self.device, self.dtype).repeat(2, 1, 1, 1)

                def step(_pipe, _i, _t, kw) -> dict:
                    return {"latents": control.after_step(kw["latents"], (h, w))}

                images = pipe(prompt=prompts, negative_prompt=[params.negative_prompt] * 2, latents=latents,
                              height=params.height, width=params.width, num_inference_steps=params.idm_steps,
                              guidance_scale=params.idm_guidance, output_type="np", callback_on_step_end=step).images
            finally:
                pipe.unet.set_attn_processor(previous)
            out.append(images[1])
        return unit_to_uint8(np.stack(out))
