"""Engine overhead and IV-Mixed cost, measured side by side in one run (a benchmark, not a test).

1. The sampler driven by a denoiser that costs nothing (returns a fixed tensor): engine seconds per
   model call (plan compile included), and that overhead as a fraction of one tiny-model call.
2. Tiny AnimateDiff, `ivmixed` vs `standard`, same rows: wall-time ratio vs model-call ratio.

    python benchmarks/engine_overhead.py [--steps 50 --frames 16 --size 64 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from pipelines.backbones.registry import load_backbone
from pipelines.config import ModelSpec, resolve_params
from pipelines.fixtures.models import build_animatediff
from pipelines.generate import build_plan, generate
from pipelines.sampling import sample_plan


def median_time(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="pixel height = width for the tiny-model part")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_animatediff(os.path.join(tmp, "m"))
        bb = load_backbone(ModelSpec.from_model_dir("animatediff", folder, device="cpu"))
        common = dict(prompt="Two horses race across a grassy field at sunset.", seed=23523, steps=args.steps,
                      frames=args.frames, height=args.size, width=args.size)
        rows = {s: [resolve_params({**common, "sampler": s})] for s in ("standard", "ivmixed")}

        # 1. engine alone: a denoiser that returns a fixed tensor (full-size 16x512x512 latents: 4x16x64x64)
        x = torch.randn(1, 4, args.frames, 64, 64)
        fixed = torch.randn_like(x)

        def free(x, t, w):
            return fixed

        plan_rows = rows["ivmixed"]
        plan = build_plan(bb, plan_rows)
        calls = sum(plan.calls().values())
        engine_s = median_time(lambda: sample_plan({"I": free, "V": free}, x, build_plan(bb, plan_rows)), args.repeats)
        per_call = engine_s / calls

        # one tiny-model call (the VDM on the CFG-doubled batch) at the tiny-model size
        models = bb.denoisers([common["prompt"]], [""], frames=args.frames, idm_text="own", fps=8)
        lat = torch.randn(1, 4, args.frames, args.size // 8, args.size // 8)
        w = torch.tensor([7.5])
        with torch.inference_mode():
            models["V"](lat, 500, w)
            vdm_call = median_time(lambda: models["V"](lat, 500, w), max(5, args.repeats))
            idm_call = median_time(lambda: models["I"](lat, 500, w), max(5, args.repeats))

        # 2. ivmixed vs standard on the tiny models, same run, no decode
        walls, counts = {}, {}
        for name, r in rows.items():
            generate(bb, r, decode=False)  # warm-up
            walls[name] = median_time(lambda: generate(bb, r, decode=False), args.repeats)
            counts[name] = generate(bb, r, decode=False)[0].calls
        wall_ratio = walls["ivmixed"] / walls["standard"]
        call_ratio = sum(counts["ivmixed"].values()) / sum(counts["standard"].values())
        # expected wall ratio if only model calls cost time, weighting IDM and VDM calls by their measured cost

        def cost(c):
            return c["I"] * idm_call + c["V"] * vdm_call

        expected = cost(counts["ivmixed"]) / cost(counts["standard"])
        report = {
            "engine_seconds_per_call": per_call,
            "engine_calls": calls,
            "tiny_vdm_call_seconds": vdm_call,
            "tiny_idm_call_seconds": idm_call,
            "engine_overhead_fraction_of_tiny_vdm_call": per_call / vdm_call,
            "ivmixed_seconds": walls["ivmixed"],
            "standard_seconds": walls["standard"],
            "ivmixed_calls": counts["ivmixed"],
            "standard_calls": counts["standard"],
            "wall_ratio": wall_ratio,
            "call_ratio": call_ratio,
            "cost_weighted_call_ratio": expected,
            "setup": {"steps": args.steps, "frames": args.frames, "size": args.size,
                      "threads": torch.get_num_threads()},
        }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
