"""Per-video quality scores, run inside the generating actor on the frames it already holds, on the same device: CLIP
(CLIPSIM, frame consistency), DINO (subject consistency) and weight-free flicker and optical-flow motion. Models are
hub ids or local folders (`ScoreModels`). Formulas: pipelines/metrics.py."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.metrics import (
    clipsim,
    dynamic,
    dynamic_frames,
    flicker,
    frame_consistency,
    motion,
    optical_flow,
    subject_consistency,
)

logger = logging.getLogger(__name__)


def _features(out) -> torch.Tensor:
    """transformers <5 returns the projected features, >=5 a model output holding them in pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass(frozen=True)
class ScoreModels:
    """Where the scorers' models load from (config `scores`): CLIP and the subject-consistency DINO."""

    clip: str
    subject: str | None  # None: no subject consistency (config scores.subject_model: null)


def resize_shorter(frames: torch.Tensor, short: int, at_least: tuple[int, int], device) -> torch.Tensor:
    """(F, H, W, 3) in [0, 1] -> (F, 3, h, w) float32 on `device`: the shorter side to `short` (bicubic,
    antialiased, as the image processors resize), each side at least `at_least` (h, w), clamped to [0, 1]."""
    x = frames.to(device, torch.float32).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    scale = short / min(h, w)
    return F.interpolate(x, size=(max(at_least[0], round(h * scale)), max(at_least[1], round(w * scale))),
                         mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def _channels(values, device) -> torch.Tensor:
    """Per-channel normalisation constants as a (1, 3, 1, 1) tensor."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


class SubjectScorer:
    """DINO's class token per frame (VBench uses facebook/dino-vitb16): frames resized so that the shorter side is
    the processor's size (VBench resizes to 224 without a crop), ImageNet-normalised, the position table
    interpolated to the frame's shape."""

    def __init__(self, source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, ViTModel  # seconds to import: only a scorer needs it

        self.device, self.dtype = torch.device(device), dtype
        self.model = ViTModel.from_pretrained(source, add_pooling_layer=False, dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        proc = AutoImageProcessor.from_pretrained(source)
        size = proc.size
        self.short = int(size.get("shortest_edge") or min(size["height"], size["width"]))
        self.mean, self.std = _channels(proc.image_mean, self.device), _channels(proc.image_std, self.device)

    @torch.inference_mode()
    def features(self, frames: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        x = resize_shorter(frames, self.short, (self.short, self.short), self.device)
        x = ((x - self.mean) / self.std).to(self.dtype)
        return torch.cat([self.model(pixel_values=x[i : i + chunk], interpolate_pos_encoding=True)
                          .last_hidden_state[:, 0].float() for i in range(0, x.shape[0], chunk)])

    def score(self, frames: torch.Tensor) -> float:
        return subject_consistency(self.features(frames))


def motion_scores(frames: torch.Tensor, fps: float) -> dict:
    """{motion, dynamic} of (F, H, W, 3) frames in [0, 1] shown at `fps` (pipelines/metrics.py)."""
    video = np.asarray(frames.float().cpu())
    mags = optical_flow(video)
    taken = dynamic_frames(video.shape[0], fps)
    picked = mags if len(taken) == video.shape[0] else optical_flow(video[taken])
    return {"motion": motion(mags), "dynamic": dynamic(picked, video.shape[1], video.shape[2])}


class ClipScorer:
    """CLIP in the run's dtype on the run's device (transformers 5 would keep a checkpoint's stored dtype, e.g. float16
    on a CPU); features are compared in float32."""

    def __init__(self, source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        # transformers takes seconds to import and only an actor (or the driver's check) with scores needs it
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

        self.device, self.dtype = torch.device(device), dtype
        self.model = CLIPModel.from_pretrained(source, dtype=dtype).to(self.device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(source)
        proc = AutoImageProcessor.from_pretrained(source)
        self.mean, self.std = _channels(proc.image_mean, self.device), _channels(proc.image_std, self.device)
        self.short = int(proc.size["shortest_edge"])
        self.crop = (int(proc.crop_size["height"]), int(proc.crop_size["width"]))

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return _features(self.model.get_text_features(input_ids=tok.input_ids.to(self.device))).float()

    @torch.inference_mode()
    def embed_frames(self, frames: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """(F, H, W, 3) in [0, 1] -> (F, D): CLIP's resize (shortest edge, bicubic), center crop, normalize."""
        x = resize_shorter(frames, self.short, self.crop, self.device)
        top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
        x = ((x[..., top : top + self.crop[0], left : left + self.crop[1]] - self.mean) / self.std).to(self.dtype)
        return torch.cat([_features(self.model.get_image_features(pixel_values=x[i : i + chunk])).float()
                          for i in range(0, x.shape[0], chunk)])

    def score(self, frames: torch.Tensor, prompt: str) -> dict:
        """{clipsim, frame_consistency, flicker} for one video; raises on failure (the caller records why)."""
        image = self.embed_frames(frames)
        text = self.embed_text([prompt])[0]
        return {"clipsim": clipsim(text, image), "frame_consistency": frame_consistency(image),
                "flicker": flicker(frames)}


class VideoScorer:
    """Every per-video score (pipelines/metrics.py SCORES, and `dynamic`) from one load of the scorers' models."""

    def __init__(self, models: ScoreModels, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.clip = ClipScorer(models.clip, device, dtype)
        self.subject = None if models.subject is None else SubjectScorer(models.subject, device, dtype)

    def score(self, frames: torch.Tensor, prompt: str, fps: float) -> dict:
        subject = {} if self.subject is None else {"subject_consistency": self.subject.score(frames)}
        return {**self.clip.score(frames, prompt), **subject, **motion_scores(frames, fps)}
