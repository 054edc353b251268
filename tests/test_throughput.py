"""An actor never waits on its store (docs/job.md "Throughput"): with `compute.concurrent_batches` at its default (3), a
batch's tail (encode, contact sheet, upload, metadata) runs beside the next batch's device turn. Measured from the
metadata of two runs of the same rows on one CPU actor: no delay, and every upload delayed by its batch's own sampling
time (the `slow_upload` drill). With one batch at a time (how the actor ran before) the same delay halves the rows per
hour: `benchmarks/actor_overlap.py` prints every case."""
import datetime as dt
import statistics

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.metadata import read_latest

from .jobutil import job_env, mlflow_store, parent_runs, run_job, tiny_config

ROWS = 8


def turns(out: str) -> list[dict]:
    """The ok rows of a run, in the order their device turns began (batches of one row)."""
    rows = [r for r in read_latest(out).to_pylist() if r["status"] == "ok"]
    assert len(rows) == ROWS and len({r["worker"] for r in rows}) == 1
    return sorted(rows, key=lambda r: r["started_at"])


def steady_rate(rows: list[dict]) -> float:
    """Rows per second in steady state: one over the median time from one device turn's start to the next, from the
    second row on (model loading, the first row's warm-up and the last row's tail are outside it)."""
    gaps = [(b["started_at"] - a["started_at"]).total_seconds() for a, b in zip(rows[1:], rows[2:])]
    return 1.0 / statistics.median(gaps)


@pytest.mark.integration
@pytest.mark.alone
@pytest.mark.usefixtures("shared_ray")
def test_a_store_as_slow_as_sampling_costs_the_actor_under_a_tenth_of_its_rows(tmp_path, tiny_cache):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(ROWS)],
                             "prompt": [f"A paper lantern number {i} rising into the night sky." for i in range(ROWS)],
                             "seed": pa.array(range(ROWS), pa.int64())}), manifest)

    db = mlflow_store(tmp_path / 'mlflow.db')

    def run(name: str, faults: str | None) -> list[dict]:
        cfg = tiny_config(tmp_path / f"{name}.yaml", tiny_cache, scores={"enabled": False}, defaults={"steps": 12},
                          compute={"batch_size": 1, "sampler_batch": 1})  # concurrent_batches: its default
        out = str(tmp_path / name)
        env = job_env(**({"IVMIX_FAULTS": faults} if faults else {}))
        r = run_job("--config", cfg, "--manifest", str(manifest), "--output", out, "--mlflow-uri", db,
                    "--experiment", name, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "actors: sampling and decode" in r.stderr
        return turns(out)

    base = run("base", None)
    slow = run("slow", "slow_upload=:1")

    # the drill really delayed each upload by its sampling time: a row's own seconds at least double its device part
    assert all(r["seconds"] >= 2 * r["sampler_seconds"] for r in slow)
    # one device turn at a time on the actor; the tails overlapped the next turn (which began before the row ended)
    for run_rows in (base, slow):
        for a, b in zip(run_rows, run_rows[1:]):
            assert b["started_at"] >= a["started_at"] + dt.timedelta(seconds=a["sampler_seconds"]) - dt.timedelta(
                milliseconds=1)
    assert all(b["started_at"] < a["finished_at"] for a, b in zip(slow, slow[1:]))
    # the job's MLflow metric: device seconds over the actor's time from its first turn to its last row's end
    share = sum(r["sampler_seconds"] for r in base) / (max(r["finished_at"] for r in base)
                                                       - base[0]["started_at"]).total_seconds()
    client = mlflow.tracking.MlflowClient(db)
    logged = parent_runs(client, "base")[0].data.metrics["sampler_share"]
    assert logged == pytest.approx(share, rel=1e-6) and 0.5 < share <= 1.0

    assert steady_rate(slow) >= 0.9 * steady_rate(base)
