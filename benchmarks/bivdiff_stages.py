"""BIVDiff stage costs on the tiny model set, measured side by side in one run (ratios, not absolute times).

    python benchmarks/bivdiff_stages.py [--frames 8] [--size 64] [--steps 50] [--idm-steps 10] [--repeats 3]

Reports the median seconds of stage 1 (ControlNet on canny maps: one call per frame as the official code, and with
`shared` noise all frames in one batched call), the VAE encode, and stages 2-3
with α = 1 — where the zero-weight video inversion is skipped — against α = 0.5, which computes both inversion
chains as the official code always does (so it is the official cost at any α). Same inputs, interleaved repeats.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from pipelines.bivdiff.config import BivdiffSpec, resolve_bivdiff_params
from pipelines.bivdiff.inputs import read_row_inputs
from pipelines.bivdiff.program import bivdiff_sample
from pipelines.bivdiff.runner import BIVDiff
from pipelines.fixtures.tiny import ensure_tiny
from pipelines.video import write_mp4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--idm-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=".cache/tiny")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = ensure_tiny("bivdiff", os.path.join(args.cache, "bivdiff"))
    worker = BIVDiff(BivdiffSpec.from_model_dir(folder, device="cpu", dtype="float32"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src.mp4")
        rng = np.random.default_rng(0)
        base = rng.uniform(0, 1, (1, 48, 80, 3)).astype(np.float32)
        write_mp4(np.clip(base + 0.02 * np.arange(4 * args.frames)[:, None, None, None] % 1.0, 0, 1), src, 8)
        common = dict(task="controlnet-canny", source_video=src, prompt="a bear", frames=args.frames, height=args.size,
                      width=args.size, steps=args.steps, idm_steps=args.idm_steps)
        p1 = resolve_bivdiff_params({**common, "alpha": 1.0})
        p_half = resolve_bivdiff_params({**common, "alpha": 0.5})
        loaded = read_row_inputs(p1)
        p_shared = resolve_bivdiff_params({**common, "alpha": 1.0, "noise": "shared"})
        times = {"stage1": [], "stage1_shared_seq": [], "stage1_shared_batch": [], "encode": [], "stages23_alpha1": [],
                 "stages23_both": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            edited = worker.stage1.run(p1, *loaded)
            t1 = time.perf_counter()
            z0 = worker.encode(edited, p1.seed)
            t2 = time.perf_counter()
            with torch.inference_mode():
                for key, p in (("stages23_alpha1", p1), ("stages23_both", p_half)):
                    s = time.perf_counter()
                    _, calls = bivdiff_sample(worker.denoisers(p), z0, p.alpha, table=worker.table, steps=p.steps,
                                              guidance=torch.tensor([p.guidance]), compat=False)
                    times[key].append(time.perf_counter() - s)
                    times[key + "_calls"] = calls
            for key, batch in (("stage1_shared_seq", 1), ("stage1_shared_batch", args.frames)):
                worker.stage1.batch = batch
                s = time.perf_counter()
                worker.stage1.run(p_shared, *loaded)
                times[key].append(time.perf_counter() - s)
            times["stage1"].append(t1 - t0)
            times["encode"].append(t2 - t1)
    med = {k: statistics.median(v) for k, v in times.items() if not k.endswith("_calls")}
    print(f"tiny BIVDiff, {args.frames} frames {args.size}x{args.size}, {args.steps} steps, stage-1 {args.idm_steps} "
          f"steps/frame, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:18s} {v:8.3f} s")
    print(f"  calls alpha=1: {times['stages23_alpha1_calls']}   both chains: {times['stages23_both_calls']}")
    skip = med["stages23_both"] / med["stages23_alpha1"]
    batching = med["stage1_shared_seq"] / med["stage1_shared_batch"]
    print(f"  stages 2-3 speed-up from skipping the zero-weight branch: x{skip:.2f}")
    print(f"  stage-1 speed-up from batching the frames (shared noise): x{batching:.2f}")


if __name__ == "__main__":
    main()
