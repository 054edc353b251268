"""Batch generation job: Parquet manifest -> Ray actor pool -> videos + Parquet metadata -> MLflow.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/generate.py --manifest s3://bucket/prompts/nightly.parquet \\
        --output s3://bucket/runs/2026-11-24 --config jobs/configs/animatediff.yaml \\
        --mlflow-uri http://mlflow:5000 --experiment nightly

Locally (`make demo`): `python jobs/generate.py --config jobs/configs/tiny.yaml --manifest
datasets/examples/smoke.parquet --output outputs/demo` runs on a local Ray with tiny models.
Running again with the same arguments generates only what is missing. Only this driver talks to MLflow.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jobs import config as job_config  # noqa: E402
from jobs import setup, tracking  # noqa: E402
from operators.compute import without_actor_restart_note  # noqa: E402
from operators.generate import RUN_DIR  # noqa: E402
from operators import metadata, storage  # noqa: E402
from operators.manifest import ManifestError, duplicated, read_schema  # noqa: E402

logger = logging.getLogger("jobs.generate")
EXIT_CODES = ("exit status: 0 the job ran (failed rows are data: see the metadata's status/error columns) or had nothing "
              "to do; 1 --fail-on-error and a row failed, or a crash; 2 bad input (config, manifest, models, baseline), "
              "reported before any model loads; 3 a quality regression against the baseline")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python jobs/generate.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    ap.add_argument("--manifest", help="Parquet file or folder: local path or fsspec URI (s3://...)")
    ap.add_argument("--output", help="output prefix: local folder or fsspec URI; videos/ and metadata/ go below it")
    ap.add_argument("--config", help="job YAML (jobs/configs/*.yaml)")
    ap.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else an embedded SQLite file "
                    "under $IVMIX_HOME, default ~/.local/share/ivmix/mlflow.db, artifacts beside it)")
    ap.add_argument("--experiment", help="MLflow experiment name")
    ap.add_argument("--run-name", help="MLflow run name (default: derived from the output prefix)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], help="cuda: one GPU per actor; cpu: CPU actors")
    ap.add_argument("--num-actors", type=int, help="fixed actor-pool size (default: the config's)")
    ap.add_argument("--batch-size", type=int, help="rows per actor call")
    ap.add_argument("--sampler-batch", type=int, help="rows sampled together in one batched call")
    ap.add_argument("--limit", type=int, help="only the first N manifest rows")
    ap.add_argument("--fail-on-error", action="store_true", help="exit 1 if any row failed")
    ap.add_argument("--retry-poisoned", action="store_true",
                    help="run again the rows that killed their worker twice in an earlier run (default: record them failed)")
    ap.add_argument("--samplers", help="A/B: comma-separated presets; every row once per sampler, same seed and noise")
    ap.add_argument("--scores", action="store_true", help="compute CLIPSIM, frame consistency and flicker per video")
    ap.add_argument("--baseline", help="regression check against an MLflow run id, or 'last' (the newest healthy run: "
                    "not regressed, success rate at least its own baseline's)")
    ap.add_argument("--regression-threshold", type=float, help="relative worsening that counts (default 0.05)")
    return ap


def code_version() -> tuple[str, str | None]:
    """(package version + hash of the project's sources, git sha if a checkout is at hand)."""
    h = hashlib.sha256()
    for pkg in ("pipelines", "operators", "jobs"):
        for dirpath, _, files in sorted(os.walk(os.path.join(ROOT, pkg))):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        h.update(name.encode() + f.read())
    sha = None
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return f"0.1.0+{h.hexdigest()[:12]}", sha


def submission_id() -> str | None:
    """The Ray job submission id when running under `ray job submit`."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


FAILURE_CAUSES = {"worker died": "rows_worker_died", "row_timeout_s:": "rows_timed_out", "memory:": "rows_out_of_memory"}


class Progress:
    """Rows done/failed, videos per hour and ETA from committed results (our own log line, not Ray's bars)."""

    def __init__(self, total: int):
        self.total, self.ok, self.failed = total, 0, 0
        self.seconds, self.nfe = 0.0, 0
        self.start = time.monotonic()
        self.logged: tuple[int, int] | None = None  # (ok, failed) of the last line logged
        self.step = 0  # MLflow progress step
        self.causes = dict.fromkeys(FAILURE_CAUSES.values(), 0)  # failed rows by cause (README, "Reliability")

    def log(self, final: bool = False) -> None:
        """Log the progress line, unless the final one would repeat the last one logged."""
        if not (final and self.logged == (self.ok, self.failed)):
            logger.info(self.line())
            self.logged = (self.ok, self.failed)

    def add(self, table) -> None:
        for status, secs, nfe, error in zip(*(table.column(c).to_pylist() for c in ("status", "seconds", "nfe", "error"))):
            if status == "ok":
                self.ok += 1
                self.seconds += secs or 0.0
                self.nfe += nfe or 0
            else:
                self.failed += 1
                cause = next((m for p, m in FAILURE_CAUSES.items() if (error or "").startswith(p)), None)
                if cause:
                    self.causes[cause] += 1

    def metrics(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = self.ok + self.failed
        return {"rows_ok": self.ok, "rows_failed": self.failed, "rows_done": done,
                "videos_per_hour": 3600.0 * self.ok / elapsed,
                "seconds_per_video": self.seconds / self.ok if self.ok else 0.0,
                "nfe_per_video": self.nfe / self.ok if self.ok else 0.0, "elapsed_seconds": elapsed, **self.causes}

    def line(self) -> str:
        m = self.metrics()
        done = self.ok + self.failed
        rate = done / m["elapsed_seconds"]
        left = max(self.total - done, 0)
        eta = str(dt.timedelta(seconds=int(left / rate))) if rate > 0 else "?"
        return (f"progress: {done}/{self.total} rows ({self.ok} ok, {self.failed} failed), "
                f"{m['videos_per_hour']:.1f} videos/h, ETA {eta}")


def _flat(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = "" if value is None else str(value)[:500]
    return out


def _init_ray():
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
        if not address:
            kwargs["include_dashboard"] = False
        ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # progress is our own log line (pain point 10)
    ctx.max_errored_blocks = -1  # a batch lost with its worker must not end the run: _pipeline retries its rows
    return ray


READ_CPUS = 0.25  # per read / resolve task
RESERVED_CPUS = 1.0  # Ray's internal ListFiles task of read_parquet takes one whole CPU (not configurable in 2.60)


def check_capacity(compute: job_config.ComputeConfig, resources: dict, device: str) -> None:
    """Refuse a pool that cannot start or that starves the read tasks (a silent hang otherwise: pain point 3).
    On an autoscaling cluster (compute.autoscaling) the same findings are warnings: nodes may still come."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    need_cpu = compute.num_actors * compute.cpus_per_actor
    problems = []
    if device == "cuda" and compute.num_actors > gpus:
        problems.append(f"compute.num_actors: {compute.num_actors} GPU actors need {compute.num_actors} GPUs; the cluster has {gpus:g}")
    if need_cpu + RESERVED_CPUS > cpus:
        problems.append(f"compute: {compute.num_actors} actors x {compute.cpus_per_actor:g} CPU leave less than {RESERVED_CPUS:g} CPU "
                        f"for reading the manifest on a {cpus:g}-CPU cluster; lower compute.num_actors or compute.cpus_per_actor")
    if problems and compute.autoscaling:
        logger.warning("cluster is smaller than the pool right now (autoscaling expected): %s", "; ".join(problems))
    elif problems:
        raise ValueError("; ".join(problems))


def run(cfg: job_config.JobConfig, n_rows: int, ids_dup: set[str], bivdiff_rows: bool = False) -> int:
    fs, root = storage.filesystem(cfg.output)
    done, poisoned = metadata.committed(fs, root)
    if cfg.compute.retry_poisoned:
        poisoned = set()
    limit = min(n_rows, cfg.limit or n_rows)
    total = limit * len(cfg.samplers or [None])
    logger.info("manifest: %d rows%s; %d ids already committed under %s", n_rows,
                f" (--limit {cfg.limit}: the first {limit})" if limit < n_rows else "", len(done), cfg.output)
    try:
        model, bivdiff, scorer = setup.models(cfg, bivdiff_rows)
        if scorer:
            setup.check_scorer(scorer)
        import mlflow

        tracking.start(mlflow, cfg)
        tracking.check_baseline(mlflow, cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_name = cfg.run_name or f"{os.path.basename(root) or 'run'}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    if done and not setup.anything_to_do(cfg, n_rows, model, bivdiff, done, ids_dup):
        logger.info("nothing to do: every row%s is committed ok under %s", f" of the first {limit}" if limit < n_rows else "",
                    cfg.output)
        return _check_only(cfg, mlflow, fs, root, model, bivdiff, run_name) if cfg.regression.baseline else 0
    from operators.lease import Lease, LeaseHeld

    lease = Lease(fs, root, run_name, cfg.commit.lease_ttl_s)
    try:
        lease.acquire()  # before anything is written or cleared: a second driver on this prefix stops here
    except LeaseHeld as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _execute(cfg, mlflow, fs, root, done, ids_dup, total, model, bivdiff, scorer, poisoned, run_name)
    finally:
        lease.release()


def _mlflow_run(mlflow, cfg, fs, root, model, bivdiff, device: str, run_name: str, version: str, git_sha: str | None):
    """The job's MLflow run, opened with the resolved config as params, the tags and the config artifact."""
    mlrun = mlflow.start_run(run_name=run_name)
    record = cfg.record()
    record["model"]["device"] = device
    record["bivdiff"]["spec"] = _model_dict(bivdiff)
    mlflow.log_params(_flat("", {k: v for k, v in record.items() if k != "commit"}, {}))
    mlflow.set_tags({"manifest": cfg.manifest, "output": storage.full_uri(fs, root), "git_sha": git_sha or "unknown",
                     "code_version": version, "ray_submission_id": submission_id() or "local", "backbone": model.backbone})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "job_config.yaml")
        import yaml

        with open(path, "w") as f:
            yaml.safe_dump(record, f, sort_keys=False)
        mlflow.log_artifact(path, "config")
    return mlrun


def _check_only(cfg, mlflow, fs, root, model, bivdiff, run_name: str) -> int:
    """Nothing to generate but a baseline to compare with: the quality stage over the committed metadata, no Ray."""
    with _mlflow_run(mlflow, cfg, fs, root, model, bivdiff, "none", run_name, *code_version()) as mlrun:
        mlflow.set_tag("job_status", "FINISHED")
        regressions = _quality(mlflow, cfg, fs, root, mlrun.info.run_id)
    if regressions:
        logger.error("quality regression against the baseline: %s", "; ".join(regressions))
        return 3
    return 0


def _execute(cfg, mlflow, fs, root, done, ids_dup, total, model, bivdiff, scorer, poisoned, run_name: str) -> int:
    """The run proper, with the output's lease held."""
    storage.clear_staging(fs, root)
    logger.info("starting Ray and %d actor(s); each loads its models once", cfg.compute.num_actors)
    ray = _init_ray()
    device = cfg.compute.device
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    model = replace(model, device=device)
    bivdiff = replace(bivdiff, device=device, dtype=model.dtype, decode_chunk=model.decode_chunk)
    try:
        check_capacity(cfg.compute, ray.cluster_resources(), device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    version, git_sha = code_version()
    with _mlflow_run(mlflow, cfg, fs, root, model, bivdiff, device, run_name, version, git_sha) as mlrun:
        run_id = mlrun.info.run_id
        status = "FINISHED"
        progress = Progress(max(total - len(done), 0))
        writer = metadata.MetadataWriter(fs, root, f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{run_id[:8]}")
        try:
            with without_actor_restart_note():
                _pipeline(ray, cfg, model, bivdiff, fs, root, done, ids_dup, run_id, version, progress, writer, device, scorer,
                          poisoned)
        except BaseException:
            status = "FAILED"
            writer.flush()  # whatever finished is committed; a rerun resumes from it
            raise
        finally:
            m = progress.metrics()
            mlflow.log_metrics({k: float(v) for k, v in m.items()}, step=progress.step)  # the latest step: the final value
            progress.log(final=True)
            _log_run_metadata(mlflow, fs, root, writer)
            mlflow.set_tag("job_status", status)
        regressions = _quality(mlflow, cfg, fs, root, run_id)
        storage.clear_staging(fs, root)
        _remove_scratch(fs, root, run_id)
    if regressions:
        logger.error("quality regression against the baseline: %s", "; ".join(regressions))
        return 3
    if cfg.fail_on_error and progress.failed:
        logger.error("%d row(s) failed (see the 'error' column in %s/metadata)", progress.failed, cfg.output)
        return 1
    return 0


def _pipeline(ray, cfg, model, bivdiff, fs, root, done, ids_dup, run_id, version, progress, writer, device, scorer,
              poisoned) -> None:
    """Pass 1 runs every row in its batches. Batches lost with their worker (killed for memory, a crash, a node gone,
    a row past its time) come back as Ray Data errored blocks: pass 2 runs their rows again one at a time on fresh
    actors, and pass 3 records whatever was lost again as failed rows with the reason (README, "Reliability")."""
    import mlflow

    from operators.compute import ErroredBlocks, actor_pool
    from operators.generate import VideoGenerator, lost_rows, resolve_rows

    env = storage.storage_env()
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # local Ray: make the project importable in workers
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": env}
    mfs, mpath = storage.filesystem(cfg.manifest)
    resolve_kwargs = {"defaults": dict(cfg.defaults), "model": _model_dict(model), "done": frozenset(done),
                      "duplicate_ids": frozenset(ids_dup), "samplers": cfg.samplers, "bivdiff": _model_dict(bivdiff),
                      "bivdiff_defaults": dict(cfg.bivdiff.defaults), "limits": _model_dict(cfg.limits),
                      "poisoned": frozenset(poisoned)}
    seen: set[str] = set()  # ids this run has recorded (the retry passes skip them)

    def resolved():
        ds = ray.data.read_parquet(mpath, filesystem=storage.arrow_filesystem(mfs), runtime_env=runtime_env, num_cpus=READ_CPUS)
        if cfg.limit:
            ds = ds.limit(cfg.limit)
        return ds.map_batches(resolve_rows, batch_format="pyarrow", batch_size=512, num_cpus=READ_CPUS, runtime_env=runtime_env,
                              fn_kwargs={**resolve_kwargs, "seen": frozenset(seen)})

    def consume(ds) -> ErroredBlocks:
        last_commit = last_log = time.monotonic()
        with ErroredBlocks() as errors:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                writer.add(batch)
                progress.add(batch)
                seen.update(batch.column("id").to_pylist())
                now = time.monotonic()
                if writer.pending >= cfg.commit.every_rows or now - last_commit >= cfg.commit.every_seconds:
                    writer.flush()
                    last_commit = now
                if now - last_log >= cfg.commit.progress_seconds:
                    progress.log()
                    mlflow.log_metrics({k: float(v) for k, v in progress.metrics().items()}, step=progress.step)
                    progress.step += 1
                    last_log = now
        writer.flush()
        return errors

    def generation(batch_size: int, sampler_batch: int) -> ErroredBlocks:
        # one actor call per block: rows stream to the driver as they finish and spread over the whole pool
        ds = resolved().repartition(target_num_rows_per_block=batch_size)
        ds = ds.map_batches(
            VideoGenerator,
            fn_constructor_kwargs={"model": _model_dict(model), "output": cfg.output, "run_id": run_id,
                                   "code_version": version, "sampler_batch": sampler_batch, "scorer": scorer,
                                   "bivdiff": _model_dict(bivdiff), "bivdiff_stage1_batch": cfg.bivdiff.stage1_batch,
                                   "limits": _model_dict(cfg.limits), "memory_budget_gb": cfg.compute.memory_budget_gb,
                                   "row_timeout_s": cfg.compute.row_timeout_s},
            batch_size=batch_size,
            batch_format="pyarrow",
            runtime_env=runtime_env,
            **actor_pool(ray, size=cfg.compute.num_actors, num_gpus=1 if device == "cuda" else 0,
                         num_cpus=cfg.compute.cpus_per_actor, max_restarts=cfg.compute.max_restarts,
                         max_task_retries=cfg.compute.max_task_retries),
        )
        return consume(ds)

    errors = generation(cfg.compute.batch_size, cfg.compute.sampler_batch)
    if errors.count:
        logger.warning("%d batch(es) were lost with their worker (%s); running their rows again one at a time on fresh "
                       "actors", errors.count, errors.summary())
        errors = generation(1, 1)
    if errors.count:
        reason = (f"{metadata.WORKER_DIED} ({errors.summary()}); it was lost in its batch and again "
                  "when run alone")
        logger.warning("%d row batch(es) lost again; recording their rows as failed", errors.count)
        errors = consume(resolved().map_batches(lost_rows, batch_format="pyarrow", num_cpus=READ_CPUS, runtime_env=runtime_env,
                                                fn_kwargs={"model": _model_dict(model), "bivdiff": _model_dict(bivdiff),
                                                           "run_id": run_id, "code_version": version, "reason": reason}))
        if errors.count:  # not even the failures could be recorded: a fault outside the rows (e.g. the manifest)
            raise RuntimeError(f"{errors.count} block(s) could not be processed: {errors.summary()}")


def _remove_scratch(fs, root: str, run_id: str) -> None:
    """This run's scratch (`OUTPUT/.runs/<run>/`: timeout marks), and the folder when no other run left one."""
    scratch = storage.join(root, RUN_DIR, run_id)
    if fs.exists(scratch):
        fs.rm(scratch, recursive=True)
    parent = storage.join(root, RUN_DIR)
    if storage.is_local(fs) and fs.exists(parent) and not fs.ls(parent):
        fs.rmdir(parent)


def _quality(mlflow, cfg, fs, root, run_id) -> list[str]:
    """Per-sampler aggregates over the output's current metadata (all attempts), nested runs, score table,
    and the regression check when a baseline is configured."""
    from jobs import quality

    current = metadata.latest(metadata.read_parts(fs, root))
    if current is None or current.num_rows == 0:
        mlflow.set_tag("healthy", "false")
        return []
    from jobs import report

    groups = quality.aggregate(current)
    quality.log_groups(mlflow, groups, current)
    logger.info("quality: %s", quality.summary(groups))
    path = report.write_report(fs, root, current, groups, f"ivmix run {posixpath.basename(root) or root}")
    report.log_report(mlflow, fs, root, path, current)
    found, baseline = [], {}
    if cfg.regression.baseline:
        found, baseline = quality.regression_check(mlflow, cfg.regression, groups, run_id)
    mlflow.set_tag("healthy", str(quality.healthy(groups, found, baseline)).lower())
    return found


def _model_dict(model) -> dict:
    from dataclasses import asdict

    return asdict(model)


def _log_run_metadata(mlflow, fs, root, writer) -> None:
    """This run's metadata rows as one Parquet artifact."""
    if not writer.parts:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for p in writer.parts:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "metadata.parquet")
        pq.write_table(pa.concat_tables(tables, promote_options="permissive"), path)
        mlflow.log_artifact(path, "metadata")


def quiet_console() -> None:
    """Only what a user needs on the console: our progress, warnings that call for action, the result. Ray's startup
    notes, its Ray Data plan lines, the libraries' load bars and advisory warnings go (Ray's logs stay in its session
    folder); Ray's error-level note on restartable actor pools is dropped around the pipeline (operators.compute)."""
    from pipelines.cli import quiet_libraries

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    quiet_libraries()
    for noisy in ("alembic", "mlflow", "matplotlib",
                  "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for advisory in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        logging.getLogger(advisory).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_console()
    try:
        cfg = job_config.load(args)
        schema, n_rows = read_schema(cfg.manifest)  # before any model loads
        ids_dup = _duplicate_ids(cfg.manifest)
    except (ValueError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(cfg, n_rows, ids_dup, bivdiff_rows="task" in schema.names)


def _duplicate_ids(uri: str) -> set[str]:
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(uri)
    dataset = pads.dataset(path, filesystem=storage.arrow_filesystem(fs), format="parquet")
    if "id" not in dataset.schema.names:
        return set()
    return duplicated(dataset.to_table(columns=["id"]).column("id").to_pylist())


if __name__ == "__main__":
    raise SystemExit(main())
