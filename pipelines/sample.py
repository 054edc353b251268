"""Single-video CLI.

    python -m pipelines.sample --backbone animatediff \\
        --base SG161222/Realistic_Vision_V5.1_noVAE \\
        --motion-adapter guoyww/animatediff-motion-adapter-v1-5-3 \\
        --image-model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompt "Two horses race across a grassy field at sunset." \\
        --sampler ivmixed --seed 23523 --out horses.mp4

`--sampler standard` with the same seed gives the plain DDIM video from the same initial noise.
Bad input exits with status 2 and a one-line reason before any model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

from . import presets
from .config import ModelSpec, resolve_params

logger = logging.getLogger("pipelines.sample")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines.sample", description="Generate one video with an image+video mixing sampler.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="presets: " + "; ".join(f"{p.name}: {p.description}" for p in presets.PRESETS.values()))
    m = ap.add_argument_group("models (hub ids or local folders)")
    m.add_argument("--backbone", default="animatediff", choices=sorted(presets.BACKBONES))
    m.add_argument("--model-dir", help="folder written by `python -m pipelines.tiny BACKBONE DIR` (sets base, motion adapter, image model)")
    m.add_argument("--base", help="VDM base pipeline")
    m.add_argument("--motion-adapter")
    m.add_argument("--unet", help="VDM UNet folder loaded on its own (videocrafter2: the VC UNet)")
    m.add_argument("--image-model", help="IDM pipeline (or a UNet folder)")
    m.add_argument("--vae", help="VAE source (default: the base pipeline's)")
    m.add_argument("--lora", help="LoRA for the image model (file, folder or hub id)")
    m.add_argument("--lora-scale", type=float, default=1.0)
    m.add_argument("--dtype", default=presets.DEFAULT_DTYPE, choices=["auto", "float32", "float16", "bfloat16"])
    m.add_argument("--device", default=presets.DEFAULT_DEVICE)
    s = ap.add_argument_group("sampling (unset flags take the preset's value)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt")
    s.add_argument("--sampler", default=presets.DEFAULT_SAMPLER, help=f"preset: {', '.join(presets.PRESETS)}")
    s.add_argument("--variant", help="grammar pattern overriding the preset's, e.g. 'down:IV-IV', 'up:IV-IV@main=V'")
    s.add_argument("--steps", type=int)
    s.add_argument("--frames", type=int)
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--fps", type=int)
    s.add_argument("--guidance", type=float, help="main-step CFG scale")
    s.add_argument("--idm-guidance", help="zigzag CFG of IDM sub-steps: W or BEGIN,END[,RHO] (Karras ramp)")
    s.add_argument("--vdm-guidance", help="zigzag CFG of VDM sub-steps: W or BEGIN,END[,RHO]")
    s.add_argument("--interval", help="steps with the zigzag: 'a..b' step indices or '0.0..0.5' fractions")
    s.add_argument("--zz", type=int, help="substitute the IDM letters by the VDM when step %% zz == zz-1")
    s.add_argument("--seed", type=int)
    o = ap.add_argument_group("output")
    o.add_argument("--output-type", default="mp4", choices=["mp4", "latent"])
    o.add_argument("--out", required=True, help="output path (.mp4, or .npy for --output-type latent)")
    o.add_argument("-q", "--quiet", action="store_true")
    return ap


PARAM_FLAGS = ("negative_prompt", "sampler", "variant", "steps", "frames", "height", "width", "fps", "guidance",
               "idm_guidance", "vdm_guidance", "interval", "zz", "seed")


def _spec(args: argparse.Namespace) -> ModelSpec:
    common = dict(vae=args.vae, lora=args.lora, lora_scale=args.lora_scale, dtype=args.dtype, device=args.device)
    if args.model_dir:
        if any((args.base, args.motion_adapter, args.image_model, args.unet)):
            raise ValueError("--model-dir: give either --model-dir or --base/--motion-adapter/--unet/--image-model")
        if not os.path.isdir(args.model_dir):
            raise ValueError(f"--model-dir: {args.model_dir!r} is not a folder")
        return ModelSpec.from_model_dir(args.backbone, args.model_dir, **common)
    return ModelSpec(backbone=args.backbone, base=args.base, motion_adapter=args.motion_adapter, unet=args.unet,
                     image_model=args.image_model, **common)


def _write_atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_output(path: str, output_type: str, latents, frames, fps: int) -> None:
    """Atomically write `latents` as float32 .npy (output_type "latent") or `frames` as an mp4."""
    from .video import write_mp4

    if output_type == "latent":
        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, latents.numpy().astype(np.float32))
    else:
        def save(tmp: str) -> None:
            write_mp4(frames, tmp, fps)
    _write_atomic(path, save)


def run(args: argparse.Namespace) -> dict:
    from .backbones import load_backbone
    from .generate import generate

    spec = _spec(args)
    params = resolve_params({"prompt": args.prompt, **{k: getattr(args, k) for k in PARAM_FLAGS}}, backbone=spec.backbone)
    start = time.perf_counter()
    backbone = load_backbone(spec)
    load_s = time.perf_counter() - start
    result = generate(backbone, [params], decode=args.output_type == "mp4")[0]
    write_output(args.out, args.output_type, result.latents, result.frames, params.fps)
    return {"out": args.out, "calls": result.calls, "nfe": result.nfe, "seconds": result.seconds, "load_seconds": load_s,
            "params": params}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = out["calls"]
    print(f"wrote {out['out']}: sampler={out['params'].sampler} variant={out['params'].variant} "
          f"model calls={sum(c.values())} (IDM {c['I']}, VDM {c['V']}), NFE={out['nfe']}, "
          f"sampling {out['seconds']:.2f}s, loading {out['load_seconds']:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
