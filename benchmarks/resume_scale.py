"""Resume planning at dataset scale (docs/datasets.md "Resume at dataset scale"): a rerun of an N-row manifest whose
rows are all committed but two. Builds synthetic committed metadata (N ids in 1000-row parts, webdataset layout: one
shard per part, the shard files present) and a manifest of N + 2 rows, then runs the driver's planning in a fresh
process, in the order `jobs/generate.py` does before it starts Ray: the manifest read (`jobs.setup.read_manifest`: ids,
duplicate ids, kinds), the committed state (`operators.resume.committed`), the plan (`jobs.setup.plan`: one Arrow
anti-join) and the todo file (`jobs.setup.write_todo`, streamed). Reports wall seconds per step and the process's peak
RSS; then, in another fresh process, what the end of the run reads (`jobs/quality.finish`: the aggregates' columns of
every part, newest row per id, aggregates, then the shown rows whole).

    python benchmarks/resume_scale.py --rows 10000000 --json outputs/resume_scale.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from jobs import quality, setup
from operators import resume, storage

PART = 1000


def build(folder: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta, shards = os.path.join(folder, "out", "metadata"), os.path.join(folder, "out", "shards")
    os.makedirs(meta)
    os.makedirs(shards)
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    spec = json.dumps({"backbone": "animatediff", "base": "emilianJR/epiCRealism", "dtype": "float16"})
    import numpy as np

    rng = np.random.default_rng(0)
    for p in range(0, n, PART):
        ids = [f"row-{i:09d}" for i in range(p, min(p + PART, n))]
        name = f"20261101T000000-bench-{p // PART:05d}"
        uri = f"file://{shards}/{name}.tar"
        pq.write_table(pa.table({
            "id": ids, "status": ["ok"] * len(ids), "error": pa.nulls(len(ids), pa.string()),
            "prompt": [f"a synthetic prompt number {i} about a lantern over a lake" for i in range(p, p + len(ids))],
            "seed": pa.array(range(p, p + len(ids)), pa.int64()), "model_spec": [spec] * len(ids),
            "finished_at": pa.array([t0] * len(ids), pa.timestamp("us", tz="UTC")),
            "shard_uri": [uri] * len(ids), "shard_offset": pa.array([i * 40960 for i in range(len(ids))], pa.int64()),
            "sampler": ["ivmixed"] * len(ids), "clipsim": pa.array(rng.normal(0.3, 0.02, len(ids))),
        }), os.path.join(meta, f"part-{name}.parquet"))
        open(os.path.join(shards, f"{name}.tar"), "wb").close()
    order = np.random.default_rng(0).permutation(n + 2)  # manifest rows in another order than they were committed
    manifest = pa.table({"id": [f"row-{i:09d}" for i in range(n + 2)],
                         "prompt": [f"a synthetic prompt number {i} about a lantern over a lake" for i in range(n + 2)],
                         "seed": pa.array(range(n + 2), pa.int64())}).take(pa.array(order))
    pq.write_table(manifest, os.path.join(folder, "manifest.parquet"), row_group_size=1 << 20)


def plan_once(folder: str) -> dict:
    """In a fresh process: the driver's planning steps, timed, and the peak RSS."""
    steps = {}

    def peak() -> float:
        """VmHWM: this process's peak RSS (getrusage's ru_maxrss would carry the parent's peak across exec)."""
        with open("/proc/self/status") as f:
            return round(next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 2 ** 20, 3)

    steps["imports_rss_gb"] = peak()
    out = os.path.join(folder, "out")
    cfg = SimpleNamespace(manifest=os.path.join(folder, "manifest.parquet"), limit=None, samplers=None)
    t = time.perf_counter()
    manifest = setup.read_manifest(cfg)
    steps["read_manifest_s"] = time.perf_counter() - t
    steps["read_manifest_rss_gb"] = peak()
    t = time.perf_counter()
    fs, root = storage.filesystem(out)
    committed = resume.committed(fs, root)
    steps["committed_s"] = time.perf_counter() - t
    steps["committed_rss_gb"] = peak()
    t = time.perf_counter()
    plan = setup.plan(cfg, manifest, committed.done)
    steps["plan_s"] = time.perf_counter() - t
    steps["plan_rss_gb"] = peak()
    t = time.perf_counter()
    ctx = SimpleNamespace(cfg=cfg, manifest=manifest, plan=plan, fs=fs)
    todo = setup.write_todo(ctx, os.path.join(folder, "todo.parquet"))
    steps["write_todo_s"] = time.perf_counter() - t
    steps["write_todo_rss_gb"] = peak()
    import pyarrow.parquet as pq

    left = pq.read_table(todo, columns=["id"])["id"].to_pylist()
    steps["total_s"] = sum(v for k, v in steps.items() if k.endswith("_s"))
    return {**steps, "done": len(committed.done), "pending": plan.pending, "todo_ids": left,
            "peak_rss_gb": peak()}


def end_once(folder: str) -> dict:
    """In a fresh process: what the end of a run reads of the whole output, the quality stage's columns of every part,
    newest row per id, per-sampler aggregates (`jobs/quality.py`)."""
    t = time.perf_counter()
    fs, root = storage.filesystem(os.path.join(folder, "out"))
    groups, shown, _ = quality.read_current(fs, root)
    with open("/proc/self/status") as f:
        hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 2 ** 20
    return {"end_of_run_s": time.perf_counter() - t, "end_of_run_rss_gb": round(hwm, 3),
            "end_of_run_rows": int(groups["ivmixed"]["n"]), "shown_rows": shown.num_rows,
            "clipsim_mean": groups["ivmixed"]["clipsim_mean"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--json")
    ap.add_argument("--plan", help=argparse.SUPPRESS)  # the measured child processes
    ap.add_argument("--end", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan or args.end:
        print(json.dumps(plan_once(args.plan) if args.plan else end_once(args.end)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        build(folder, args.rows)
        built = time.perf_counter() - t
        proc = subprocess.run([sys.executable, __file__, "--plan", folder], capture_output=True, text=True, check=True)
        result = {"rows": args.rows, "build_s": round(built, 1), **json.loads(proc.stdout.strip().splitlines()[-1])}
        proc = subprocess.run([sys.executable, __file__, "--end", folder], capture_output=True, text=True, check=True)
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert sorted(result["todo_ids"]) == [f"row-{args.rows:09d}", f"row-{args.rows + 1:09d}"], result["todo_ids"]
    for k, v in result.items():
        print(f"{k:>16}: {v:.2f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
