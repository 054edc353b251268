"""Single-video CLI.

    python -m pipelines.sample --backbone animatediff \\
        --base SG161222/Realistic_Vision_V5.1_noVAE \\
        --motion-adapter guoyww/animatediff-motion-adapter-v1-5-3 \\
        --image-model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompt "Two horses race across a grassy field at sunset." \\
        --sampler ivmixed --seed 23523 --out horses.mp4

`--sampler standard` with the same seed gives the plain DDIM video from the same initial noise.
Bad input (parameters, the output path, a model path that does not exist) exits with status 2 and a one-line
reason before any model is loaded; a model that cannot be loaded exits 2 the same way.
"""
from __future__ import annotations

from . import interrupt

interrupt.while_loading(__name__, interrupt.CLI)  # before torch and diffusers load

import argparse
import functools
import json
import logging
import time

from . import cli, cost, params, presets
from .backbones import registry
from .backbones.common import resolve_placement
from .cli import EXIT_CODES, check_source, load_models, progress_bar
from .config import ModelSpec, resolve_params
from .fixtures.published import meta_backbone
from .generate import build_plan, generate
from .outputs import check_output

logger = logging.getLogger("pipelines.sample")


def _defaults_help() -> str:
    return "; ".join(f"{n}: {c.defaults.frames} frames x {c.defaults.height}x{c.defaults.width}, {c.defaults.steps} "
                     f"steps, {c.defaults.fps} fps" for n, c in registry.BACKBONES.items())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines.sample",
                                 description="Generate one video with an image+video mixing sampler.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"{LAPTOP}\n\n{EXIT_CODES}\n\n--list-presets and --list-backbones describe "
                                        "the choices.")
    m = ap.add_argument_group("models (hub ids or local folders)")
    m.add_argument("--backbone", default="animatediff", choices=sorted(registry.BACKBONES),
                   help="video model family (default animatediff)")
    m.add_argument("--model-dir", help="folder written by `python -m pipelines.fixtures.tiny BACKBONE DIR` (sets base, "
                   "motion adapter, image model)")
    m.add_argument("--base", help="VDM base pipeline (default: the backbone's, see --list-backbones)")
    m.add_argument("--motion-adapter")
    m.add_argument("--unet", help="VDM UNet folder loaded on its own (videocrafter2: the VC UNet)")
    m.add_argument("--image-model", help="IDM pipeline (or a UNet folder)")
    m.add_argument("--vae", help="VAE source (default: the base pipeline's)")
    m.add_argument("--lora", help="LoRA for the image model (file, folder or hub id)")
    m.add_argument("--lora-scale", type=float, default=1.0, help="default 1.0")
    cli.add_placement_flags(m)
    s = ap.add_argument_group("sampling (unset flags take the preset's or the backbone's value)")
    params.add_flags(s, params.GENERATION, extra_help={"steps": "; defaults per backbone: " + _defaults_help()})
    o = ap.add_argument_group("output")
    cli.add_output_flags(o, required=False)  # not with --list-presets / --list-backbones
    o.add_argument("--list-presets", action="store_true",
                   help="print the sampler presets with their model calls and TFLOP per video on --backbone at its "
                        "defaults (counted on the published architectures) and exit")
    o.add_argument("--json", action="store_true",
                   help="with --list-presets: a JSON list of {name, calls, tflop} for --backbone's presets")
    o.add_argument("--list-backbones", action="store_true",
                   help="print the backbones with their default models and exit")
    return ap


LAPTOP = ("On a laptop (CPU, tiny random models):\n"
          "python -m pipelines.fixtures.tiny animatediff .cache/tiny/animatediff,\n"
          "then add --model-dir .cache/tiny/animatediff --steps 6 --frames 8 --height 64 --width 64 (the backbone's\n"
          "defaults, 16 x 512 x 512 and 50 steps, take over an hour on a CPU even with tiny models).")


@functools.lru_cache(maxsize=8)
def preset_costs(name: str) -> tuple[dict, ...]:
    """Each preset that runs on backbone `name`: its model calls and TFLOP per video at the backbone's defaults (and
    the preset's own), its plan compiled on the published schedulers as a run compiles it: `--list-presets`."""
    backbone = meta_backbone(registry.get(name))
    out = []
    for preset in presets.PRESETS.values():
        if preset.backbones and name not in preset.backbones:
            continue
        p = resolve_params({"sampler": preset.name, "prompt": "-"}, backbone=name)
        try:
            plan = build_plan(backbone, [p])
        except ValueError:  # a comparator the backbone's models do not take (freenoise, pag, freeu)
            continue
        calls = plan.calls()
        costs = cost.published_costs(name, p.frames, p.height, p.width, p.fps, plan.resize)
        out.append({"name": preset.name, "calls": sum(calls.values()), "tflop": round(cost.tflop(costs.of(calls)), 1)})
    return tuple(out)


def list_presets(backbone: str, as_json: bool = False) -> str:
    """The presets, each with its calls and TFLOP per video on `backbone` at its defaults (pipelines/cost.py)."""
    try:
        costs = {c["name"]: c for c in preset_costs(backbone)}
    except ValueError as err:  # no published layout (VidRD): the table without costs
        logger.warning("no FLOP count for %s: %s", backbone, err)
        costs = {}
    if as_json:
        return json.dumps([{"name": n, "calls": c["calls"], "tflop": c["tflop"]} for n, c in costs.items()])
    d = registry.defaults(backbone)
    head = (f"calls and TFLOP per video on {backbone} at {d.frames} x {d.height}x{d.width}, {d.steps} steps "
            "(model calls and the VAE decode; - where the preset runs on another backbone only)")
    cells = [(p.name, p.variant, "/".join(p.backbones) or "any backbone",
              str(costs[p.name]["calls"]) if p.name in costs else "-",
              f"{costs[p.name]['tflop']:,.0f}" if p.name in costs else "-", p.description)
             for p in presets.PRESETS.values()]
    cells.insert(0, ("name", "variant", "backbones", "calls", "TFLOP", "description"))
    widths = [max(len(c[i]) for c in cells) for i in range(5)]  # columns as wide as their longest cell
    return head + "\n" + "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(5)) + "  " + c[5] for c in cells)


def list_backbones() -> str:
    out = []
    for name, cls in registry.BACKBONES.items():
        b = cls.defaults
        models = ", ".join(f"{k}={v}" for k, v in (("base", b.base), ("unet", b.unet),
                                                   ("motion_adapter", b.motion_adapter), ("image_model", b.image_model))
                           if v)
        out.append(f"{name:<14} {b.frames} x {b.height}x{b.width}, {b.steps} steps, {b.fps} fps; {models}")
    return "\n".join(out)


def _spec(args: argparse.Namespace) -> ModelSpec:
    common = dict(vae=args.vae, lora=args.lora, lora_scale=args.lora_scale, dtype=args.dtype, device=args.device,
                  decode_chunk=args.decode_chunk, compile=args.compile, channels_last=args.channels_last)
    if args.model_dir:
        if any((args.base, args.motion_adapter, args.image_model, args.unet)):
            raise ValueError("--model-dir: give either --model-dir or --base/--motion-adapter/--unet/--image-model")
        kind = cli.model_dir_kind(args.model_dir)
        if kind is not None and kind != args.backbone:
            raise ValueError(f"--model-dir: {args.model_dir!r} holds tiny {kind} models; pass --backbone {kind}"
                             if kind in registry.BACKBONES else
                             f"--model-dir: {args.model_dir!r} holds a tiny {kind} set, not the models of a video "
                             "backbone")
        spec = ModelSpec.from_model_dir(args.backbone, args.model_dir, **common)
    else:
        spec = ModelSpec(backbone=args.backbone, base=args.base, motion_adapter=args.motion_adapter, unet=args.unet,
                         image_model=args.image_model, **common)
    resolve_placement(spec.device, spec.dtype)  # device/dtype errors first: they need no file
    for name in ("base", "motion_adapter", "unet", "image_model", "vae", "lora"):
        check_source(name, getattr(spec, name))
    return spec


def _warn_if_slow(spec: ModelSpec, p) -> None:
    if resolve_placement(spec.device, spec.dtype)[0].type == "cpu" and params.cpu_units(p) > params.SLOW_ON_CPU:
        logger.warning("sampling %d x %dx%d for %d steps on the CPU is slow (the full default size takes over an hour "
                       "even with tiny models); on a laptop pass --steps 6 --frames 8 --height 64 --width 64",
                       p.frames, p.height, p.width, p.steps)


def run(args: argparse.Namespace) -> dict:
    if not args.prompt:
        raise ValueError("--prompt: required")
    if not args.out:
        raise ValueError("--out: required (a .mp4 path, or .npy with --output-type latent)")
    spec = _spec(args)
    p = resolve_params(params.from_args(args, params.GENERATION), backbone=spec.backbone)
    check_output(args.out, args.output_type)
    _warn_if_slow(spec, p)
    start = time.perf_counter()
    logger.info("loading %s models", spec.backbone)
    backbone = load_models(lambda: registry.load_backbone(spec))
    load_s = time.perf_counter() - start
    bar = progress_bar(p.steps, "sampling", args.quiet)

    def step(info: dict) -> None:
        bar.set_postfix_str(f"model calls {sum(info['calls'].values())}", refresh=False)
        bar.update(1)

    try:
        result = generate(backbone, [p], decode=args.output_type == "mp4", callback=step)[0]
    finally:
        bar.close()
    cli.write_output(args.out, args.output_type, result.latents, result.frames, p.fps)
    return {"out": args.out, "calls": result.calls, "nfe": result.nfe, "seconds": result.seconds,
            "load_seconds": load_s, "params": p}


def summary(out: dict) -> str:
    c = out["calls"]
    return (f"wrote {out['out']}: sampler={out['params'].sampler} variant={out['params'].variant} "
            f"model calls={sum(c.values())} (IDM {c['I']}, VDM {c['V']}), NFE={out['nfe']}, "
            f"sampling {out['seconds']:.2f}s, loading {out['load_seconds']:.2f}s")


def listing(args: argparse.Namespace) -> str | None:
    if args.list_presets:
        return list_presets(args.backbone, args.json)
    return list_backbones() if args.list_backbones else None


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), run, summary, argv, listing=listing)


if __name__ == "__main__":
    interrupt.exit_now(main())
