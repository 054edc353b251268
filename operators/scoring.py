"""Per-video quality scores with a CLIP model (hub id or local folder), run inside the generating actor on
the frames it already holds, batched on the same device. Formulas: pipelines/metrics.py."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from pipelines.metrics import clipsim, flicker, frame_consistency

logger = logging.getLogger(__name__)


def _features(out) -> torch.Tensor:
    """transformers <5 returns the projected features, >=5 a model output holding them in pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


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
        self.mean = torch.tensor(proc.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(proc.image_std, device=self.device).view(1, 3, 1, 1)
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
        x = frames.to(self.device, torch.float32).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        scale = self.short / min(h, w)
        x = F.interpolate(x, size=(max(self.crop[0], round(h * scale)), max(self.crop[1], round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
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
