"""H.264 mp4 encoding and decoding (imageio-ffmpeg, yuv420p) of (F, H, W, 3) frames."""
from __future__ import annotations

import os
import tempfile

import numpy as np


def unit_to_uint8(frames) -> np.ndarray:
    """(F, H, W, 3) floats in [0, 1] (tensor or array) -> uint8, rounded (the decoders' and diffusers' "np" output);
    uint8 frames pass through. BIVDiff's [-1, 1] frames: `bivdiff.inputs.signed_to_uint8`."""
    arr = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_mp4(frames, path: str, fps: int, *, quality_crf: int = 18) -> int:
    """Encode to `path` (a local file); returns its size in bytes. Height and width must be even."""
    import imageio_ffmpeg

    arr = unit_to_uint8(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {arr.shape}")
    f, h, w, _ = arr.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even height and width, got {h}x{w}")
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=2, output_params=["-crf", str(quality_crf)],
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in arr:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return os.path.getsize(path)


def mp4_bytes(frames, fps: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        write_mp4(frames, path, fps)
        with open(path, "rb") as f:
            return f.read()


def read_mp4(path: str) -> tuple[np.ndarray, float]:
    """Decode every frame: ((F, H, W, 3) uint8, fps)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    meta = reader.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8), float(meta["fps"])


def contact_sheet(frames, columns: int = 8) -> np.ndarray:
    """(F, H, W, 3) -> one uint8 image with the frames in a grid, `columns` per row, in time order."""
    arr = unit_to_uint8(frames)
    f, h, w, c = arr.shape
    cols = max(1, min(columns, f))
    rows = -(-f // cols)
    sheet = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, frame in enumerate(arr):
        r, k = divmod(i, cols)
        sheet[r * h : (r + 1) * h, k * w : (k + 1) * w] = frame
    return sheet


def png_bytes(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
