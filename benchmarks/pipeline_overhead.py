"""The Ray job vs a plain in-process loop over the same sampler, same rows, same run (a benchmark, not a test).

Both do the same work per row (sample with tiny models, decode, encode mp4, write the file). Prints the
throughput ratio (pipeline / loop) and the pipeline's overhead seconds per video, for whole runs
(Ray start, actor start and model load included) and for the steady state (first video to last).

    python benchmarks/pipeline_overhead.py [--rows 24 --steps 6 --actors 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from operators.metadata import read_latest
from pipelines.backbones.registry import load_backbone
from pipelines.config import ModelSpec, resolve_params
from pipelines.fixtures.tiny import ensure_tiny
from pipelines.generate import generate
from pipelines.video import write_mp4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loop(rows, model_dir, defaults, out_dir) -> dict:
    start = time.perf_counter()
    bb = load_backbone(ModelSpec.from_model_dir("animatediff", model_dir, device="cpu", dtype="float32"))
    first = None
    for r in rows:
        p = resolve_params(r, defaults)
        res = generate(bb, [p])[0]
        write_mp4(res.frames, os.path.join(out_dir, f"{r['id']}.mp4"), p.fps)
        first = first or time.perf_counter()
    end = time.perf_counter()
    return {"total": end - start, "steady": end - first}


def pipeline(manifest, cfg_path, out_dir) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": ROOT}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "generate.py"), "--config", cfg_path,
                        "--manifest", manifest, "--output", out_dir, "--mlflow-uri", f"sqlite:///{out_dir}.db"],
                       env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    t = read_latest(out_dir).to_pylist()
    finished = sorted(m["finished_at"].timestamp() for m in t)
    assert all(m["status"] == "ok" for m in t), [m["error"] for m in t if m["status"] != "ok"]
    # steady state: from the first committed video to the last, scaled to N videos
    steady = (finished[-1] - finished[0]) * len(finished) / max(len(finished) - 1, 1)
    return {"total": total, "steady": steady}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "tiny")
        model_dir = ensure_tiny("animatediff", os.path.join(cache, "animatediff"))
        rows = [{"id": f"r{i:03d}", "prompt": f"A test prompt number {i}", "seed": i} for i in range(args.rows)]
        manifest = os.path.join(tmp, "m.parquet")
        pq.write_table(pa.Table.from_pylist(rows), manifest)
        with open(os.path.join(ROOT, "jobs", "configs", "tiny.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["tiny_cache"] = cache
        cfg["defaults"]["steps"] = args.steps
        cfg["compute"].update(batch_size=1, sampler_batch=1)
        defaults = cfg["defaults"]
        os.makedirs(os.path.join(tmp, "loop"))
        base = loop(rows, model_dir, defaults, os.path.join(tmp, "loop"))
        report = {"rows": args.rows, "steps": args.steps, "loop_seconds": base["total"],
                  "loop_steady_seconds": base["steady"]}
        for n in args.actors:
            # leave one CPU for the read tasks (the job refuses a pool that starves them)
            cfg["compute"].update(num_actors=n, cpus_per_actor=min(1.0, ((os.cpu_count() or 1) - 1.0) / n))
            cfg_path = os.path.join(tmp, f"job{n}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(cfg, f)
            res = pipeline(manifest, cfg_path, os.path.join(tmp, f"out{n}"))
            report[f"pipeline_{n}_actors"] = {
                "seconds": res["total"], "steady_seconds": res["steady"],
                "throughput_ratio": base["total"] / res["total"],
                "steady_throughput_ratio": base["steady"] / res["steady"],
                "overhead_seconds_per_video": (res["total"] - base["total"]) / args.rows,
                "steady_overhead_seconds_per_video": (res["steady"] - base["steady"]) / args.rows,
            }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
