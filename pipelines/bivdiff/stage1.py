"""Stage 1: frame-wise generation or editing with a task image model through diffusers pipelines (docs/algorithms.md §8).

Every frame is denoised with the IDM's own scheduler, `idm_steps` steps and the stage-1 CFG. Noise policies (docs/algorithms.md §8,
§11 E): "independent" = one CPU generator seeded `seed` drawn frame after frame (the official behaviour: one pipeline
call per frame, in order); "shared" = every frame from a generator seeded `seed` (same noise per frame); "per_frame" =
frame i from a generator seeded `seed + i`. The last two do not depend on frame order, so up to `batch` frames go
through one pipeline call with one generator per frame (diffusers' list-of-generators contract) and give the same
frames as one call per frame. Outputs are uint8 frames, as the official code hands PIL images to stage 2.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)


def canny(image: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Canny edges of an (H, W, 3) uint8 image as an (H, W, 3) uint8 0/255 map, without learned weights.

    As OpenCV's `Canny(img, 100, 200)` used by the official processor: 3×3 Sobel per colour channel, L1 magnitude,
    the channel with the largest magnitude per pixel, non-maximum suppression along the quantised gradient direction,
    hysteresis with 8-connectivity."""
    from scipy import ndimage

    img = image.astype(np.float32)
    gx = np.stack([ndimage.sobel(img[..., c], axis=1, mode="nearest") for c in range(img.shape[-1])], -1)
    gy = np.stack([ndimage.sobel(img[..., c], axis=0, mode="nearest") for c in range(img.shape[-1])], -1)
    mag_c = np.abs(gx) + np.abs(gy)
    pick = mag_c.argmax(-1)[..., None]
    gx, gy, mag = (np.take_along_axis(a, pick, -1)[..., 0] for a in (gx, gy, mag_c))
    # direction bins: 0 = horizontal gradient (compare left/right), 1 = 45°, 2 = vertical, 3 = 135°
    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    bins = np.digitize(angle, [22.5, 67.5, 112.5, 157.5]) % 4
    pad = np.pad(mag, 1)
    h, w = mag.shape
    shifted = lambda dy, dx: pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # noqa: E731
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    keep = np.zeros_like(mag, dtype=bool)
    for b, (dy, dx) in offsets.items():
        m = bins == b
        keep |= m & (mag > shifted(dy, dx)) & (mag >= shifted(-dy, -dx))
    nms = np.where(keep, mag, 0.0)
    weak = nms >= low
    labels, n = ndimage.label(weak, structure=np.ones((3, 3)))
    strong_labels = np.unique(labels[(nms > high) & weak])
    edges = np.isin(labels, strong_labels[strong_labels > 0])
    out = np.where(edges, 255, 0).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


def outpaint_mask(kind: str, height: int, width: int) -> np.ndarray:
    """Static outpainting mask, 255 = fill (docs/algorithms.md §8): horizontal = top and bottom quarters, vertical = left/right."""
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

    def __init__(self, spec, components: dict, device: torch.device, dtype: torch.dtype, cache: int = 2, batch: int = 8):
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

        # read straight into the run dtype (no float32 copy, no cast warning)
        quiet = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, torch_dtype=self.dtype)
        logger.info("loading stage-1 %s model %s", task.idm, source)
        if task.idm == "controlnet":
            controlnet = diffusers.ControlNetModel.from_pretrained(source, torch_dtype=self.dtype)
            pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
                self.spec.image_model, controlnet=controlnet, **self.components, **quiet)
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
    def run(self, params, source: np.ndarray | None, mask: np.ndarray | None, condition: np.ndarray | None) -> np.ndarray:
        """(F, H, W, 3) uint8 edited frames for one row."""
        from PIL import Image

        task = params.spec_task
        pipe = self.pipeline(task)
        prompt, negative = params.stage1_prompts()
        h, w = params.height, params.width
        common = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=params.idm_steps,
                      guidance_scale=params.idm_guidance, output_type="np")
        per_frame: Callable[[int], dict]
        if task.idm == "controlnet":
            maps = condition if task.condition != "canny" else np.stack([canny(f) for f in source])
            per_frame = lambda i: dict(image=Image.fromarray(maps[i]))  # noqa: E731
            common.update(height=h, width=w)
        elif task.idm == "instruct_pix2pix":
            per_frame = lambda i: dict(image=Image.fromarray(source[i]))  # noqa: E731
            common.update(image_guidance_scale=params.image_guidance)
        else:
            masks = mask if task.mask == "video" else np.stack([outpaint_mask(task.mask, h, w)] * params.frames)
            per_frame = lambda i: dict(image=Image.fromarray(source[i]), mask_image=Image.fromarray(masks[i]))  # noqa: E731
            common.update(height=h, width=w)
        out = []
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
                images = pipe(**{**common, "prompt": [prompt] * len(idx), "negative_prompt": [negative] * len(idx)},
                              **batched, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
                out.extend(images)
        return np.stack([(np.clip(im, 0.0, 1.0) * 255.0).round().astype(np.uint8) for im in out])
