"""Reading source, mask, condition and pre-edited frame inputs from any fsspec URI (docs/algorithms.md §8).

Frames are sampled the way the official code does: indices 0, k, 2k, … (k = `stride`, the code's `frame_rate`),
the first F kept, each resized directly to W×H (no crop; spec quirk Q10). Every failure is a ValueError that
names the input, the URI and what is wrong.
"""
from __future__ import annotations

import io
import logging
import os
import posixpath
import tempfile
from typing import NamedTuple

import numpy as np

from ..outputs import filesystem
from ..video import read_mp4

logger = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def _decode_video(data: bytes, suffix: str) -> np.ndarray:
    """All frames of an encoded video as (N, H, W, 3) uint8 (ffmpeg via imageio-ffmpeg)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "input" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        return read_mp4(path)[0]


def _read_any(name: str, uri: str) -> np.ndarray:
    """(N, H, W, 3) uint8 frames, or float32 in [-1, 1] for a .npy array."""
    try:
        fs, path = filesystem(uri)
        if fs.isdir(path):
            files = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(IMAGE_EXTS))
            if not files:
                raise ValueError("the folder holds no PNG/JPEG/WebP frames")
            from PIL import Image

            arrs = [np.asarray(Image.open(io.BytesIO(fs.cat_file(p))).convert("RGB")) for p in files]
            if len({a.shape for a in arrs}) != 1:
                raise ValueError("the frames in the folder differ in size")
            return np.stack(arrs)
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ValueError(f"{name}: {uri!r} does not exist") from None
    except ValueError as err:
        raise ValueError(f"{name}: cannot read {uri!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any storage/decoder failure becomes a readable row error
        raise ValueError(f"{name}: cannot read {uri!r} ({type(err).__name__}: {err})") from None
    suffix = posixpath.splitext(path)[1].lower()
    if suffix == ".npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - any reader failure becomes a readable row error
            raise ValueError(f"{name}: {uri!r} is not a readable .npy array ({err})") from None
        if arr.ndim != 4 or arr.shape[-1] != 3 or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name}: {uri!r} must hold a float array of shape (F, H, W, 3), got {arr.dtype} "
                             f"{arr.shape}")
        if not np.isfinite(arr).all() or arr.min() < -1.0 - 1e-6 or arr.max() > 1.0 + 1e-6:
            raise ValueError(f"{name}: {uri!r} must hold finite values in [-1, 1]")
        return arr.astype(np.float32)
    try:
        frames = _decode_video(data, suffix or ".mp4")
    except Exception as err:  # noqa: BLE001 - any decoder failure becomes a readable row error
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{name}: {uri!r} is not a decodable video ({reason})") from None
    if len(frames) == 0:
        raise ValueError(f"{name}: {uri!r} holds no frames")
    return frames


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Direct bilinear resize of every frame to width×height (aspect not kept, as the official reader)."""
    if frames.shape[1:3] == (height, width):
        return frames
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    y = y.permute(0, 2, 3, 1).numpy()
    return y.round().clip(0, 255).astype(np.uint8) if frames.dtype == np.uint8 else y.astype(np.float32)


def read_frames(name: str, uri: str, *, frames: int, stride: int, height: int, width: int,
                like: tuple[int, int, int] | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Sample `frames` frames at `stride` and resize to height×width.

    Returns (frames, (available, native_h, native_w)); `like` is the source's triple: a mask or condition
    video must have the source's native size (it is meant pixel for pixel)."""
    raw = _read_any(name, uri)
    need = (frames - 1) * stride + 1
    if len(raw) < need:
        raise ValueError(f"{name}: {uri!r} has {len(raw)} frames; {frames} frames at stride {stride} need {need}")
    info = (len(raw), raw.shape[1], raw.shape[2])
    if like is not None and info[1:] != like[1:]:
        raise ValueError(f"{name}: {uri!r} is {info[2]}x{info[1]} but the source video is {like[2]}x{like[1]}; "
                         "it must match the source pixel for pixel")
    return _resize(raw[0:need:stride], height, width), info


def to_signed(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float32 in [-1, 1]; float frames (already in [-1, 1]) pass through."""
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 127.5 - 1.0
    return frames.astype(np.float32)


def signed_to_uint8(frames: np.ndarray) -> np.ndarray:
    """float frames in [-1, 1] -> uint8 as the official BIVDiff conversion: (x + 1) / 2 · 255, truncated (not rounded:
    `video.unit_to_uint8` rounds [0, 1] frames); uint8 frames pass through (the official BIVDiff
    code's conversion)."""
    if frames.dtype == np.uint8:
        return frames
    return ((np.clip(frames, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)


class RowInputs(NamedTuple):
    source: np.ndarray | None  # (F, H, W, 3) uint8; external: uint8 or float32 in [-1, 1]
    mask: np.ndarray | None  # (F, H, W) uint8, 255 = fill
    condition: np.ndarray | None  # (F, H, W, 3) uint8 condition maps


def read_row_inputs(p) -> RowInputs:
    """Read and check every input a resolved BivdiffParams names (before any model runs)."""
    task = p.spec_task
    size = dict(frames=p.frames, stride=p.stride, height=p.height, width=p.width)
    source = info = mask = condition = None
    if p.source_video is not None:
        source, info = read_frames("source_video", p.source_video, **size)
        if task.idm != "external":
            source = signed_to_uint8(source)
    if task.mask == "video":
        m, _ = read_frames("mask_video", p.mask_video, like=info, **size)
        mask = np.where(signed_to_uint8(m).mean(-1) >= 128, 255, 0).astype(np.uint8)
    if task.condition in ("depth", "pose"):
        if p.condition_video is None:  # the source video holds the maps: already read above
            logger.warning("condition_video: not given, so the source video's frames are used as the %s maps as they "
                           "are (give precomputed %s maps with condition_video / --condition-video)", task.condition,
                           task.condition)
            condition = signed_to_uint8(source)
        else:
            condition = signed_to_uint8(read_frames("condition_video", p.condition_video, like=info, **size)[0])
    return RowInputs(source, mask, condition)
