"""Video quality measures (pure functions over tensors; the CLIP model that makes embeddings is injected).

- CLIPSIM: mean cosine similarity between the prompt's CLIP text embedding and each frame's CLIP image
  embedding (Wu et al., GODIVA / the T2V literature's MSR-VTT protocol).
- Frame consistency: mean cosine similarity of CLIP image embeddings of consecutive frames
  (the BIVDiff paper, arXiv 2312.02813, §4).
- Flicker: mean absolute difference of consecutive frames in [0, 1] pixel units (weight-free).
- Subject consistency: VBench's formula (Huang et al., arXiv 2311.17982, "Subject Consistency") over DINO features
  of the frames: the mean over frames i >= 1 of (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2.
- Motion: the mean dense optical-flow magnitude between consecutive frames, in pixels per frame at the video's size,
  from OpenCV's DIS flow (weight-free); `dynamic` applies VBench's dynamic-degree rule ("Dynamic Degree": RAFT flow
  there) to the same flow fields: a frame pair moves when the mean of its largest 5 % of magnitudes exceeds
  6 · min(H, W) / 256 pixels, and a video is dynamic when at least round(4 · N / 16) of its pairs move, N its frames
  taken at about 8 fps (docs/lab.md "Scores").
- Fréchet distance between two Gaussians fitted to feature sets: the FID/FVD formula
  d² = |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}) with a pluggable feature extractor.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# per-video score names (metadata columns, MLflow metrics)
SCORES = ("clipsim", "frame_consistency", "flicker", "subject_consistency", "motion")
# the direction of each: True when higher is better (motion: static clips are the ones a dataset drops)
HIGHER_IS_BETTER = {"clipsim": True, "frame_consistency": True, "flicker": False, "subject_consistency": True,
                    "motion": True}
DYNAMIC_FPS = 8  # VBench takes frames at about 8 fps for its dynamic degree


def flicker(frames: torch.Tensor) -> float:
    """(F, H, W, C) in [0, 1] -> mean |f_{t+1} - f_t|; 0 for a still video (and for a single frame)."""
    if frames.shape[0] < 2:
        return 0.0
    f = frames.float()
    return float((f[1:] - f[:-1]).abs().mean())


def frame_consistency(image_embeds: torch.Tensor) -> float:
    """(F, D) CLIP image embeddings -> mean cosine of consecutive frames; 1 for identical frames."""
    if image_embeds.shape[0] < 2:
        return 1.0
    e = F.normalize(image_embeds.float(), dim=-1)
    return float((e[1:] * e[:-1]).sum(-1).mean())


def clipsim(text_embed: torch.Tensor, image_embeds: torch.Tensor) -> float:
    """(D,) text embedding, (F, D) image embeddings -> mean cosine similarity over frames."""
    t = F.normalize(text_embed.float().reshape(1, -1), dim=-1)
    e = F.normalize(image_embeds.float(), dim=-1)
    return float((e @ t.T).mean())


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)) with the unbiased estimator, as FID/FVD code does."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    The trace of (Σ1 Σ2)^{1/2} is computed from the eigenvalues of Σ2^{1/2} Σ1 Σ2^{1/2} (symmetric PSD), which
    avoids the complex round-off of a general matrix square root.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError("frechet_distance: mean and covariance shapes disagree")
    w, v = np.linalg.eigh((s2 + s2.T) / 2)
    root2 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root2 @ s1 @ root2
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two feature sets (any extractor: I3D for FVD, CLIP, ...)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def frechet_video_distance(videos_a, videos_b, extract) -> float:
    """The FVD formula over two sets of videos with a pluggable extractor: `extract(video) -> (D,) features`
    (I3D logits for the paper's FVD, CLIP mean embeddings, ...)."""
    feats = [np.stack([np.asarray(extract(v), dtype=np.float64).reshape(-1) for v in vids])
             for vids in (videos_a, videos_b)]
    return frechet_from_features(*feats)


def subject_consistency(features: torch.Tensor) -> float:
    """(F, D) per-frame features (DINO's class token) -> VBench's subject consistency; 1 for identical frames and
    for a single frame."""
    if features.shape[0] < 2:
        return 1.0
    e = F.normalize(features.float(), dim=-1)
    previous = (e[1:] * e[:-1]).sum(-1).clamp(min=0)
    first = (e[1:] * e[:1]).sum(-1).clamp(min=0)
    return float(((previous + first) / 2).mean())


def optical_flow(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) frames in [0, 1] -> (F - 1, H, W) flow magnitudes in pixels between consecutive frames (OpenCV's
    DIS optical flow, medium preset, on 8-bit grey frames)."""
    import cv2  # OpenCV: only the scorer needs it

    grey = [cv2.cvtColor(np.ascontiguousarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)), cv2.COLOR_RGB2GRAY)
            for f in np.asarray(frames)]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    out = [np.linalg.norm(dis.calc(a, b, None), axis=-1) for a, b in zip(grey[:-1], grey[1:])]
    return np.stack(out) if out else np.zeros((0, *grey[0].shape), np.float32)


def motion(magnitudes: np.ndarray) -> float:
    """Mean flow magnitude (pixels per frame) over every pixel of every consecutive pair; 0 for a single frame."""
    return float(magnitudes.mean()) if magnitudes.size else 0.0


def dynamic_frames(frames: int, fps: float) -> list[int]:
    """The frames VBench's dynamic degree looks at: every round(fps / 8)-th (all of them at 8 fps or less)."""
    return list(range(0, frames, max(1, round(fps / DYNAMIC_FPS))))


def dynamic(magnitudes: np.ndarray, height: int, width: int) -> bool:
    """VBench's dynamic-degree rule on the (N - 1, H, W) flow magnitudes between consecutive taken frames
    (`dynamic_frames`): a pair moves when the mean of its largest 5 % of magnitudes exceeds 6 · min(H, W) / 256
    pixels; the video is dynamic when at least round(4 · N / 16) pairs move."""
    if magnitudes.shape[0] == 0:
        return False
    threshold = 6.0 * min(height, width) / 256.0
    need = round(4 * (magnitudes.shape[0] + 1) / 16)
    moving = 0
    for m in magnitudes:
        flat = np.sort(np.abs(m).reshape(-1))[::-1]
        moving += float(flat[: max(1, int(flat.size * 0.05))].mean()) > threshold
    return moving >= need
