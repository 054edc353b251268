"""MLflow for the driver: the tracking store (an embedded SQLite file keeps its artifacts beside it, never in the
current folder), the up-front check of a named regression baseline, the run with its params, tags and config artifact,
the progress counters and metrics, the run's metadata artifact. Only the driver (`jobs/`) talks to MLflow."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pathlib
import tempfile
import threading
import time
from dataclasses import asdict

import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from operators import storage
from pipelines.params import BIVDIFF, GENERATION

logger = logging.getLogger(__name__)
SQLITE = "sqlite:///"


def start(mlflow, cfg) -> None:
    """Point MLflow at cfg.mlflow_uri and select cfg.experiment, creating it (with its artifacts beside a SQLite
    store, in `mlartifacts/`) when it does not exist yet."""
    uri = cfg.mlflow_uri
    artifacts = None
    if uri.startswith(SQLITE):
        db = pathlib.Path(os.path.abspath(uri[len(SQLITE):]))
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (db.parent / "mlartifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(cfg.experiment) is None:
            mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException as err:
        if "already exists" not in str(err).lower():  # another driver created it a moment ago
            raise ValueError(f"--mlflow-uri: {uri}: {' '.join(str(err).split())[:300]}") from None
    mlflow.set_experiment(cfg.experiment)


def close_abandoned(mlflow, cfg, output_uri: str) -> list[str]:
    """The experiment's runs on this output still `RUNNING` whose driver is gone (SIGKILL, a lost node): marked
    `KILLED`, their ids returned. Called with the output's lease held, so no live driver is writing to it."""
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return []
    quoted = output_uri.replace("'", "\\'")
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list",
                              filter_string=f"tags.output = '{quoted}' and attributes.status = 'RUNNING'")
    client = mlflow.tracking.MlflowClient()
    for r in runs:
        client.set_tag(r.info.run_id, "job_status", "KILLED")
        client.set_terminated(r.info.run_id, "KILLED")
    if runs:
        logger.warning("marked %d MLflow run(s) of this output KILLED: their driver ended without closing them (%s)",
                       len(runs), ", ".join(r.info.run_id for r in runs))
    return [r.info.run_id for r in runs]


def check_baseline(mlflow, cfg) -> None:
    """A baseline named by run id must exist before any video is generated ("last" is looked up at the end)."""
    baseline = cfg.regression.baseline
    if not baseline or baseline == "last":
        return
    try:
        mlflow.tracking.MlflowClient().get_run(baseline)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--baseline: no MLflow run {baseline!r} at {cfg.mlflow_uri}; give a run id of experiment "
                         f"{cfg.experiment!r} or 'last'") from None


FAILURE_CAUSES = {"worker died": "rows_worker_died", "row_timeout_s:": "rows_timed_out",
                  "memory:": "rows_out_of_memory"}


TIMING = ("worker", "started_at", "finished_at", "sampler_seconds")  # the metadata columns of `Progress`'s throughput


class Progress:
    """Rows done/failed, videos per hour and ETA from committed results (our own log line, not Ray's bars), and how
    busy the actors kept their devices (docs/job.md "Throughput"): `sampler_share` is the sampling-and-decode seconds of
    the ok rows over the actors' wall time (each actor from its first row's device turn to its last row's end, model
    loading excluded), `videos_per_actor_hour` the ok rows per hour of that time (per GPU-hour on a GPU pool)."""

    def __init__(self, total: int):
        self.total, self.ok, self.failed = total, 0, 0
        self.seconds, self.nfe, self.tflop = 0.0, 0, 0.0
        self.start = self.last_row = time.monotonic()
        self.logged: tuple[int, int] | None = None  # (ok, failed) of the last line logged
        self.step = 0  # MLflow progress step
        self.causes = dict.fromkeys(FAILURE_CAUSES.values(), 0)  # failed rows by cause (docs/reliability.md)
        self.spans: dict[str, list] = {}  # worker -> [first started_at, last finished_at] of its timed ok rows
        self.sampler_seconds, self.timed = 0.0, 0  # their device seconds, and how many they are

    def log(self, final: bool = False) -> None:
        """Log the progress line, unless the final one would repeat the last one logged."""
        if not (final and self.logged == (self.ok, self.failed)):
            logger.info(self.line())
            self.logged = (self.ok, self.failed)

    def add(self, table) -> None:
        if table.num_rows:
            self.last_row = time.monotonic()
        columns = (table.column(c).to_pylist() for c in ("status", "seconds", "nfe", "error", "tflop"))
        for status, secs, nfe, error, tflop in zip(*columns):
            if status == "ok":
                self.ok += 1
                self.seconds += secs or 0.0
                self.nfe += nfe or 0
                self.tflop += tflop or 0.0
            else:
                self.failed += 1
                cause = next((m for p, m in FAILURE_CAUSES.items() if (error or "").startswith(p)), None)
                if cause:
                    self.causes[cause] += 1
        if set(TIMING) <= set(table.column_names):
            for status, *timing in zip(*(table.column(c).to_pylist() for c in ("status", *TIMING))):
                if status == "ok" and None not in timing:
                    self._time(*timing)

    def _time(self, worker: str, started, finished, seconds: float) -> None:
        span = self.spans.setdefault(worker, [started, finished])
        span[0], span[1] = min(span[0], started), max(span[1], finished)
        self.sampler_seconds += seconds
        self.timed += 1

    def metrics(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = self.ok + self.failed
        actor = sum((end - start).total_seconds() for start, end in self.spans.values())
        return {"actor_seconds": actor, "sampler_share": self.sampler_seconds / actor if actor > 0 else 0.0,
                "videos_per_actor_hour": 3600.0 * self.timed / actor if actor > 0 else 0.0,
                "rows_ok": self.ok, "rows_failed": self.failed, "rows_done": done,
                "videos_per_hour": 3600.0 * self.ok / elapsed,
                "seconds_per_video": self.seconds / self.ok if self.ok else 0.0,
                "nfe_per_video": self.nfe / self.ok if self.ok else 0.0, "elapsed_seconds": elapsed,
                "tflop_total": self.tflop, "tflop_per_video": self.tflop / self.ok if self.ok else 0.0, **self.causes}

    def line(self) -> str:
        m = self.metrics()
        done = self.ok + self.failed
        rate = done / m["elapsed_seconds"]
        left = max(self.total - done, 0)
        eta = str(dt.timedelta(seconds=int(left / rate))) if rate > 0 else "?"
        return (f"progress: {done}/{self.total} rows ({self.ok} ok, {self.failed} failed), "
                f"{m['videos_per_hour']:.1f} videos/h, ETA {eta}")

    def throughput_line(self) -> str:
        m = self.metrics()
        return (f"actors: sampling and decode {100 * m['sampler_share']:.1f}% of their {m['actor_seconds']:.1f} s "
                f"({len(self.spans)} worker(s)), {m['videos_per_actor_hour']:.1f} videos per actor-hour")

    def working_line(self, pool_rows: int) -> str:
        """The heartbeat's line: rows done, rows the pool may hold, seconds since a row last came back."""
        done = self.ok + self.failed
        since = time.monotonic() - self.last_row
        back = f"last row back {since:.0f} s ago" if done else f"no row back yet after {since:.0f} s"
        return (f"working: {done}/{self.total} rows done, up to {min(pool_rows, max(self.total - done, 0))} in flight "
                f"on the actors, {back}")


class Heartbeat:
    """While rows run, a `working:` line every `interval` seconds in which no row came back, so that a slow first row
    (model loads, a large size on a CPU) is told from a hang; the `progress:` line stays tied to rows coming back. A
    daemon thread, stopped when the context ends; `interval` 0 (`commit.progress_seconds: 0`) beats every 5 s."""

    def __init__(self, progress: Progress, interval: float, pool_rows: int):
        self.progress, self.interval, self.pool_rows = progress, interval or 5.0, pool_rows
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="ivmix-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            if time.monotonic() - self.progress.last_row >= self.interval:
                logger.info(self.progress.working_line(self.pool_rows))

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def flat(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = "" if value is None else str(value)[:500]
    return out


def open_run(mlflow, run, git_sha: str | None):
    """The job's MLflow run (`run`: the driver's jobs.setup.Run), opened with the resolved config as params, the tags
    and the config artifact."""
    cfg, fs, root, version = run.cfg, run.fs, run.root, run.version
    mlrun = mlflow.start_run(run_name=run.run_name)
    record = cfg.record()
    record["model"]["device"] = run.device
    record["bivdiff"]["spec"] = asdict(run.resolver.setups[BIVDIFF].spec)
    mlflow.log_params(flat("", {k: v for k, v in record.items() if k != "commit"}, {}))
    mlflow.set_tags({"manifest": cfg.manifest, "output": storage.full_uri(fs, root), "git_sha": git_sha or "unknown",
                     "code_version": version, "ray_submission_id": submission_id() or "local",
                     "backbone": run.resolver.setups[GENERATION].spec.backbone})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "job_config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(record, f, sort_keys=False)
        mlflow.log_artifact(path, "config")
    return mlrun


def log_run_metadata(mlflow, parts, run_id: str) -> None:
    """This run's metadata rows (out of every part of the output, read once at the end) as one Parquet artifact."""
    if parts is None or "run_id" not in parts.column_names:
        return
    mine = parts.filter(pc.equal(parts["run_id"], run_id))
    if mine.num_rows:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "metadata.parquet")
            pq.write_table(mine, path)
            mlflow.log_artifact(path, "metadata")


def submission_id() -> str | None:
    """The Ray job submission id when running under `ray job submit`."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None
