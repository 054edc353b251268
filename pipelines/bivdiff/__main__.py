"""Single-video BIVDiff CLI.

    python -m pipelines.bivdiff --task controlnet-canny --video in.mp4 \\
        --prompt "a silver robot dancing on the beach" --out out.mp4

Models default to the official ones (SD-1.5, ControlNet v1.1, InstructPix2Pix, SD inpainting, ZeroScope v2);
`--model-dir DIR` reads the layout of `python -m pipelines.fixtures.tiny bivdiff DIR`. Bad input (parameters, outputs,
model paths, videos) exits with status 2 and a one-line reason before any model is loaded; so does a model that
cannot be loaded.
"""
from __future__ import annotations

from .. import interrupt

interrupt.while_loading(__name__, interrupt.CLI)  # before torch and diffusers load

import argparse
import logging
import time
from dataclasses import replace

from .. import cli, params, presets
from ..backbones import registry
from ..cli import EXIT_CODES, check_source, load_models, progress_bar
from ..outputs import check_output, write_atomic
from ..video import write_mp4
from .config import BivdiffSpec, resolve_bivdiff_params
from .inputs import read_row_inputs
from .runner import BIVDiff

logger = logging.getLogger("pipelines.bivdiff")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.bivdiff", description="Edit or re-render one video with BIVDiff.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tasks: " + "; ".join(f"{t.name} (alpha {t.alpha:g}): {t.description}"
                                     for t in presets.BIVDIFF_TASKS.values())
        + "\n\ndefaults: " + ", ".join(f"{k} {v}" for k, v in presets.BIVDIFF_DEFAULTS.items())
        + " (alpha: the task's)\n\nOn a laptop: python -m pipelines.fixtures.tiny bivdiff .cache/tiny/bivdiff, then "
        "add --model-dir .cache/tiny/bivdiff --steps 5 --idm-steps 2 --frames 4 --height 64 --width 64\n\n"
        + EXIT_CODES)
    t = ap.add_argument_group("row parameters (inputs are fsspec URIs: local paths, s3://, gs://, ...; unset flags "
                              "take the preset's or the task's value)")
    params.add_flags(t, params.BIVDIFF, flags={"source_video": "--video", "sampler": "--preset"}, required=("task",))
    m = ap.add_argument_group("models (hub ids or local folders)")
    m.add_argument("--model-dir", help="folder written by `python -m pipelines.fixtures.tiny bivdiff DIR`")
    m.add_argument("--vdm", default=presets.BIVDIFF_MODELS["vdm"], choices=tuple(registry.BACKBONES),
                   help="video model family")
    m.add_argument("--video-model", help="VDM pipeline folder or hub id (default: the family's; vidrd: the folder "
                   "`python -m pipelines.backbones.vidrd` converts from ModelT2V.pth)")
    m.add_argument("--video-unet", help="videocrafter2: its UNet folder")
    m.add_argument("--motion-adapter", help="animatediff as the VDM: its motion adapter")
    m.add_argument("--image-model", help="SD-1.5-family pipeline: inversion UNet, shared VAE, ControlNet base")
    m.add_argument("--controlnet", help="ControlNet for this task (default: the v1.1 model of its condition)")
    m.add_argument("--t2i-adapter",
                   help="T2I-Adapter for this task (default: TencentARC's sd15v2 model of its condition)")
    m.add_argument("--instruct-pix2pix", help="InstructPix2Pix pipeline")
    m.add_argument("--inpainting", help="SD inpainting pipeline")
    cli.add_placement_flags(m, speed_options=False)  # the speed options serve generation backbones only
    m.add_argument("--stage1-batch", type=int, default=8,
                   help="frames per stage-1 pipeline call (shared/per_frame noise)")
    o = ap.add_argument_group("output")
    cli.add_output_flags(o, required=True)
    o.add_argument("--save-stage1", help="also write the stage-1 frames as an mp4 here")
    return ap


MODEL_FLAGS = ("video_model", "video_unet", "motion_adapter", "image_model", "controlnet", "t2i_adapter",
               "instruct_pix2pix", "inpainting")
TINY_VDMS = ("zeroscope", "modelscope", "vidrd")  # the tiny set's video_model/ (ModelScope architecture) and vidrd/


def _spec(args: argparse.Namespace, task: presets.BivdiffTask) -> BivdiffSpec:
    common = dict(vdm=args.vdm, dtype=args.dtype, device=args.device, decode_chunk=args.decode_chunk)
    if args.model_dir:
        given = [f"--{k.replace('_', '-')}" for k in MODEL_FLAGS if getattr(args, k)]
        if given:
            raise ValueError(f"--model-dir: give either --model-dir or {', '.join(given)}")
        kind = cli.model_dir_kind(args.model_dir)
        if kind not in (None, "bivdiff"):
            raise ValueError(f"--model-dir: {args.model_dir!r} holds tiny {kind} models; write a BIVDiff set with "
                             "`python -m pipelines.fixtures.tiny bivdiff DIR`")
        if args.vdm not in TINY_VDMS:
            own = "--video-unet" if args.vdm == "videocrafter2" else "--motion-adapter"
            raise ValueError(f"--vdm: the tiny BIVDiff set holds ModelScope-architecture and VidRD video models "
                             f"({', '.join(TINY_VDMS)}); {args.vdm} needs its own models (--video-model, {own}) "
                             "instead of --model-dir")
        return BivdiffSpec.from_model_dir(args.model_dir, **common)
    spec = BivdiffSpec(video_model=args.video_model, video_unet=args.video_unet, motion_adapter=args.motion_adapter,
                       **({"image_model": args.image_model} if args.image_model else {}), **common)
    over = {"instruct_pix2pix": args.instruct_pix2pix, "inpainting": args.inpainting}
    for flag in ("controlnet", "t2i_adapter"):
        if getattr(args, flag) and task.idm == flag and task.condition:
            over[f"{flag}_{task.condition}"] = getattr(args, flag)
    spec = replace(spec, **{k: v for k, v in over.items() if v})
    for name in ("video_model", "video_unet", "motion_adapter", "image_model"):
        check_source(name, getattr(spec, name))
    check_source("task model", spec.task_model(task))
    return spec


def run(args: argparse.Namespace) -> dict:
    p = resolve_bivdiff_params(params.from_args(args, params.BIVDIFF))
    spec = _spec(args, p.spec_task)
    check_output(args.out, args.output_type)
    if args.save_stage1:
        check_output(args.save_stage1, "mp4", "--save-stage1")
    loaded = read_row_inputs(p)  # a bad video fails here, before any model loads
    start = time.perf_counter()
    logger.info("loading BIVDiff models (video model: %s)", spec.vdm)
    worker = load_models(lambda: BIVDiff(spec, stage1_batch=args.stage1_batch))
    load_s = time.perf_counter() - start
    branches = (p.alpha > 0) + (p.alpha < 1)  # a branch of weight 0 is not computed
    bars = []  # opened at the first move, after stage 1

    def step(info: dict) -> None:
        if not bars:
            bars.append(progress_bar(p.steps * (branches + 1), "inversion + smoothing", args.quiet))
        bars[0].set_postfix_str(info["stage"], refresh=False)
        bars[0].update(1)

    if p.spec_task.idm != "external":
        logger.info("stage 1: %s on %d frames", p.task, p.frames)
    try:
        result = worker.run(p, decode=args.output_type == "mp4", loaded=loaded, callback=step)
    finally:
        for bar in bars:
            bar.close()
    cli.write_output(args.out, args.output_type, result.latents, result.frames, p.fps)
    if args.save_stage1:
        write_atomic(args.save_stage1, lambda tmp: write_mp4(result.stage1, tmp, p.fps))
    return {"out": args.out, "result": result, "load_seconds": load_s}


def summary(out: dict) -> str:
    r = out["result"]
    return (f"wrote {out['out']}: task={r.params.task} preset={r.params.sampler} alpha={r.params.alpha:g} "
            f"calls: image inversion {r.calls['I']}, video {r.calls['V']}; {r.seconds:.2f}s, "
            f"loading {out['load_seconds']:.2f}s")


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, summary, argv)


if __name__ == "__main__":
    interrupt.exit_now(main())
