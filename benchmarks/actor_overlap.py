"""How much a slow store costs an actor (docs/job.md "Throughput"; a benchmark, not a test).

Runs the job on the same rows with one actor and batches of one row: no delay; every upload delayed by its batch's own
sampling time (`IVMIX_FAULTS=slow_upload=:1`) with `compute.concurrent_batches` 3 (the default), 2, and 1 (one batch
at a time: how the actor ran before). Prints, from each run's metadata, the steady rows per hour (one over
the median time between two device turns' starts), the whole actor span's rows per hour, the sampler share, and the
ratios to the run without delay.

    python benchmarks/actor_overlap.py [--rows 12 --steps 6 --delay 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from operators.metadata import read_latest
from pipelines.fixtures.tiny import ensure_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(manifest: str, cfg: dict, out: str, faults: str | None) -> dict:
    with open(out + ".yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": ROOT}
    env.pop("IVMIX_FAULTS", None)
    if faults:
        env["IVMIX_FAULTS"] = faults
    r = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "generate.py"), "--config", out + ".yaml",
                        "--manifest", manifest, "--output", out, "--mlflow-uri", f"sqlite:///{out}.db"],
                       env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    rows = sorted((m for m in read_latest(out).to_pylist() if m["status"] == "ok"), key=lambda m: m["started_at"])
    gaps = [(b["started_at"] - a["started_at"]).total_seconds() for a, b in zip(rows, rows[1:])]
    span = (max(m["finished_at"] for m in rows) - rows[0]["started_at"]).total_seconds()
    return {"steady": 3600.0 / statistics.median(gaps), "span": 3600.0 * len(rows) / span,
            "share": sum(m["sampler_seconds"] for m in rows) / span,
            "sampled": statistics.median(m["sampler_seconds"] for m in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--delay", type=float, default=1.0, help="upload delay as a multiple of the batch's sampling time")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "tiny")
        ensure_tiny("animatediff", os.path.join(cache, "animatediff"))
        manifest = os.path.join(tmp, "m.parquet")
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(args.rows)],
                                 "prompt": [f"A paper lantern number {i} rising into the night sky."
                                            for i in range(args.rows)],
                                 "seed": pa.array(range(args.rows), pa.int64())}), manifest)
        with open(os.path.join(ROOT, "jobs", "configs", "tiny.yaml")) as f:
            base = yaml.safe_load(f)
        base.update(tiny_cache=cache, scores={"enabled": False})
        base["defaults"]["steps"] = args.steps
        slow = f"slow_upload=:{args.delay}"
        cases = [("no delay", 3, None), (f"delay x{args.delay:g}, 3 batches", 3, slow),
                 (f"delay x{args.delay:g}, 2 batches", 2, slow), (f"delay x{args.delay:g}, 1 batch", 1, slow)]
        results = {}
        for name, concurrent, faults in cases:
            cfg = {**base, "compute": {**base["compute"], "batch_size": 1, "sampler_batch": 1,
                                       "concurrent_batches": concurrent}}
            results[name] = run(manifest, cfg, os.path.join(tmp, f"out{concurrent}{bool(faults)}"), faults)
    ref = results["no delay"]
    print(f"{args.rows} rows, {args.steps} steps, tiny AnimateDiff on one CPU actor; sampling {ref['sampled']:.2f} s "
          "per row (median)")
    print(f"{'case':<22} {'rows/h steady':>14} {'ratio':>6} {'rows/h span':>12} {'ratio':>6} {'sampler share':>14}")
    for name, r in results.items():
        print(f"{name:<22} {r['steady']:>14.0f} {r['steady'] / ref['steady']:>6.2f} {r['span']:>12.0f} "
              f"{r['span'] / ref['span']:>6.2f} {r['share']:>14.3f}")


if __name__ == "__main__":
    main()
