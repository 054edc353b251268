"""Batch generation job: Parquet manifest -> Ray actor pool -> videos + Parquet metadata -> MLflow.

The driver in parts (docs/architecture.md): `jobs/config.py` (the config), `jobs/setup.py` (models, the manifest read
once, the run's plan), `jobs/pipeline.py` (Ray and its passes), `jobs/tracking.py` (MLflow), `jobs/quality.py` and
`jobs/report.py` (scores, regression, report); this module runs them in order and owns the exit codes.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/generate.py --manifest s3://bucket/prompts/nightly.parquet \\
        --output s3://bucket/runs/2026-11-24 --config jobs/configs/animatediff.yaml \\
        --mlflow-uri http://mlflow:5000 --experiment nightly

Locally (`make demo`): `python jobs/generate.py --config jobs/configs/tiny.yaml --manifest
datasets/examples/smoke.parquet --output outputs/demo` runs on a local Ray with tiny models; `python -m jobs.generate`
is the same command. Both import the installed package (`pip install -e .`). Running again with the same arguments
generates only what is missing. Only this driver talks to MLflow.
"""
from __future__ import annotations

from pipelines import interrupt

interrupt.while_loading(__name__, interrupt.JOB)  # before Ray and torch load

import argparse
import datetime as dt
import hashlib
import logging
import os
import posixpath
import subprocess
import sys

import ray

import jobs
import operators
import pipelines
from jobs import config as job_config
from jobs import pipeline, quality, setup, tracking, verify
from jobs.export import Filter, export
from operators import integrity, lease, metadata, shards, storage
from operators.compute import without_actor_restart_note
from operators.layout import METADATA, Layout
from operators.manifest import ManifestError
from pipelines.cli import quiet_libraries

logger = logging.getLogger("jobs.generate")
EXIT_CODES = ("exit status: 0 the job ran (failed rows are data: see the metadata's status/error columns) or had "
              "nothing to do; 1 --fail-on-error and a row failed, or a crash; 2 bad input (config, manifest, output, "
              "models, baseline, a pool the machine cannot hold), reported before any model loads; 3 a quality "
              "regression against the baseline; 130 interrupted (Ctrl-C)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python jobs/generate.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    ap.add_argument("--manifest", help="Parquet file or folder: local path or fsspec URI (s3://...)")
    ap.add_argument("--output", help="output prefix: local folder or fsspec URI; videos/ and metadata/ go below it")
    ap.add_argument("--output-format", choices=["files", "webdataset"],
                    help="files: videos/<id>.mp4 (default); webdataset: tar shards under shards/ (docs/datasets.md)")
    ap.add_argument("--config", help="job YAML (jobs/configs/*.yaml)")
    ap.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else an embedded SQLite "
                    "file under $IVMIX_HOME, default ~/.local/share/ivmix/mlflow.db, artifacts beside it)")
    ap.add_argument("--experiment", help="MLflow experiment name")
    ap.add_argument("--run-name", help="MLflow run name (default: derived from the output prefix)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], help="cuda: one GPU per actor; cpu: CPU actors")
    ap.add_argument("--num-actors", type=int, help="fixed actor-pool size (default: the config's)")
    ap.add_argument("--batch-size", type=int, help="rows per actor call")
    ap.add_argument("--sampler-batch", type=int, help="rows sampled together in one batched call")
    ap.add_argument("--limit", type=int, help="only the first N manifest rows")
    ap.add_argument("--fail-on-error", action="store_true", help="exit 1 if any row failed")
    ap.add_argument("--retry-poisoned", action="store_true",
                    help="run again the rows that killed their worker twice in an earlier run "
                    "(default: record them failed)")
    ap.add_argument("--samplers", help="A/B: comma-separated presets; every row once per sampler, same seed and noise")
    ap.add_argument("--scores", action="store_true", help="compute CLIPSIM, frame consistency and flicker per video")
    ap.add_argument("--baseline", help="regression check against an MLflow run id, or 'last' (the newest healthy run: "
                    "not regressed, success rate at least its own baseline's)")
    ap.add_argument("--regression-threshold", type=float, help="relative worsening that counts (default 0.05)")
    return ap


def code_version() -> tuple[str, str | None]:
    """(package version + hash of the project's sources, git sha if a checkout is at hand)."""
    h = hashlib.sha256()
    folders = [os.path.dirname(os.path.abspath(pkg.__file__)) for pkg in (pipelines, operators, jobs)]
    for folder in folders:
        for dirpath, _, files in sorted(os.walk(folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        h.update(name.encode() + f.read())
    sha = None
    try:
        sha = subprocess.run(["git", "-C", os.path.dirname(folders[-1]), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return f"0.1.0+{h.hexdigest()[:12]}", sha


def refusal_before_ray(cfg: job_config.JobConfig, fs, root: str) -> str | None:
    """What is refused before Ray, models or MLflow start, with nothing created: an output that is a file, and a pool
    that a local Ray (started by this driver) could not hold. On a running cluster (RAY_ADDRESS) only the cluster
    knows its size: `pipeline.check_capacity` runs again once Ray is up."""
    if storage.with_retries(lambda: fs.isfile(root), f"reading {cfg.output}"):
        return f"output: {cfg.output!r} is a file; give a folder or an object-store prefix"
    resources = pipeline.local_resources()
    if resources is None:
        return None
    try:
        pipeline.check_capacity(cfg.compute, resources, pipeline.pick_device(cfg.compute.device, resources))
    except ValueError as err:
        return str(err)
    return None


def run(cfg: job_config.JobConfig, manifest: setup.Manifest) -> int:
    fs, root = storage.filesystem(cfg.output)
    refusal = refusal_before_ray(cfg, fs, root)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if not manifest.rows:
        logger.info("nothing to do: the manifest %s has no rows", cfg.manifest)
        return 0
    committed = setup.committed(cfg, fs, root)
    limit = min(manifest.rows, cfg.limit or manifest.rows)
    plan = setup.plan(cfg, manifest, committed.done)
    try:
        model, bivdiff, scorer = setup.models(cfg, "bivdiff" in manifest.kinds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    run_name = cfg.run_name or f"{os.path.basename(root) or 'run'}-{stamp}"
    plan = setup.Run(cfg, manifest, setup.resolver(cfg, model, bivdiff, manifest.kinds), fs, Layout(root), committed,
                     plan, scorer, run_name, version=code_version()[0])
    todo, exact = setup.rows_to_run(plan)
    logger.info("manifest: %d rows%s; %d ids already committed under %s; %s row(s) to run%s", manifest.rows,
                f" (--limit {cfg.limit}: the first {limit})" if limit < manifest.rows else "", len(committed.done),
                cfg.output, todo if exact else f"about {todo}", _per_sampler(cfg, manifest))
    for line in setup.duplicate_lines(manifest):
        logger.warning("%s", line)
    # a rerun with nothing left and no baseline to check ends here: no scorer load, no MLflow store created
    idle = not todo
    if idle and not cfg.regression.baseline:
        logger.info("nothing to do: every row%s is committed ok under %s",
                    f" of the first {limit}" if limit < manifest.rows else "", cfg.output)
        return 0
    try:
        if scorer and not idle:
            setup.check_scorer(scorer)
        import mlflow  # heavy (about 2 s) and needed only past the checks above: `--help` and bad input stay quick

        tracking.start(mlflow, cfg)
        tracking.check_baseline(mlflow, cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if idle:
        logger.info("nothing to do: every row%s is committed ok under %s; checking against the baseline",
                    f" of the first {limit}" if limit < manifest.rows else "", cfg.output)
        return _check_only(mlflow, plan)
    held = lease.Lease(fs, root, run_name, cfg.commit.lease_ttl_s)
    try:
        held.claim()  # before anything is written or cleared: a second driver on this prefix stops here
        return _execute(mlflow, plan, held, total=todo)
    except lease.LeaseHeld as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        held.release()


def _per_sampler(cfg: job_config.JobConfig, manifest: setup.Manifest) -> str:
    """How A/B rows are counted, said next to the count: one output row per sampler."""
    if cfg.samplers:
        return f" ({len(cfg.samplers)} per manifest row: one for each of --samplers)"
    return " (an A/B manifest row counts once per sampler)" if manifest.groups else ""


def _export(mlflow, run: setup.Run, tag: str) -> dict | None:
    """The config's `export`: the output's ok rows over its thresholds as a new dataset (jobs/export.py)."""
    e, out = run.cfg.export, run.cfg.layout
    if not e.to:
        return None
    dest = e.to.replace("{output}", run.cfg.output).replace("{run}", tag)
    summary = export(run.cfg.output, dest, Filter.of(e),
                     fmt=e.format, shard_max_mb=out.shard_max_mb, shard_max_samples=out.shard_max_samples,
                     contact_sheets=out.contact_sheets, code_version=run.version)
    mlflow.set_tag("export_uri", summary["to"])
    mlflow.log_metric("export_rows", summary["rows"])
    return summary


def _verify(mlflow, run: setup.Run) -> None:
    """The config's `verify`: a share of the output read back (jobs/verify.py), what it finds logged, tagged on the
    MLflow run and set aside (the lease is held), so that the next run generates those rows again."""
    share = run.cfg.verify.fraction
    if not share:
        return
    report = verify.verify(run.cfg.output, fraction=share, workers=run.cfg.verify.workers)
    for f in report.findings:
        logger.warning("verify: %s %s %s: %s", f.problem, f.what, f.path, f.reason)
    logger.info("verify: %s", report.summary())
    mlflow.set_tags({"verify_fraction": share, "verify_objects": report.shards + report.videos,
                     "verify_damaged": report.count("damaged"), "verify_missing": report.count("missing"),
                     "verify_found": "; ".join(posixpath.relpath(f.path, run.root) for f in report.findings[:20])})
    integrity.set_aside(run.fs, run.root, report.damage)


def _check_only(mlflow, run: setup.Run) -> int:
    """Nothing to generate but a baseline to compare with: the quality stage over the committed metadata, no Ray."""
    with tracking.open_run(mlflow, run, code_version()[1]) as mlrun:
        mlflow.set_tag("job_status", "FINISHED")
        regressions = quality.finish(mlflow, run.cfg, run.fs, run.root, mlrun.info.run_id)
    if regressions:
        logger.error("quality regression against the baseline: %s", "; ".join(regressions))
        return 3
    return 0


def _execute(mlflow, run: setup.Run, held: lease.Lease, total: int) -> int:
    """The run proper, with the output's lease claimed: Ray starts while the claim settles, then it is confirmed."""
    cfg, fs, root = run.cfg, run.fs, run.root
    logger.info("starting Ray and %d actor(s); each loads its models once", cfg.compute.num_actors)
    ray = pipeline.init_ray()
    held.confirm()
    storage.clear_staging(fs, root)
    integrity.set_aside(fs, root, run.committed.damage)  # what a rerun found damaged: its rows are made again
    # with the lease held: no other run is writing; a part set aside leaves its shards unnamed: they go aside too
    shards.remove_orphans(fs, root, run.committed.shards,
                          keep=any(d.what == "metadata part" for d in run.committed.damage))
    salvaged = shards.salvage(fs, root, run.done, code_version=run.version, output=cfg.layout)
    if salvaged:
        run = run.replanned()
        total = setup.rows_to_run(run)[0]
        logger.info("%d row(s) left to run after the salvage", total)
    device = pipeline.pick_device(cfg.compute.device, ray.cluster_resources())
    run = run.on_device(device)
    try:
        pipeline.check_capacity(cfg.compute, ray.cluster_resources(), device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    slow = setup.slow_on_cpu(run)
    if slow:
        logger.warning("%s", slow)
    tracking.close_abandoned(mlflow, cfg, storage.full_uri(fs, root))  # the lease is held: no live driver owns them
    with tracking.open_run(mlflow, run, code_version()[1]) as mlrun:
        run = run.started(mlrun.info.run_id)
        status = "FINISHED"
        progress = tracking.Progress(total)  # the count the console gave as "row(s) to run"
        tag = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{run.run_id[:8]}"
        writer = metadata.MetadataWriter(fs, root, tag)
        sink = (shards.run_sink(fs, root, writer, tag, run.run_id, cfg.layout, run.version)
                if cfg.layout.format == "webdataset" else None)
        run = run.with_todo()
        recorded = setup.Recorded()

        def log_metrics() -> None:
            mlflow.log_metrics({k: float(v) for k, v in progress.metrics().items()}, step=progress.step)
            progress.step += 1

        try:
            pool_rows = cfg.compute.num_actors * cfg.compute.batch_size
            with (without_actor_restart_note(), tracking.Heartbeat(progress, cfg.commit.progress_seconds, pool_rows),
                  pipeline.insistent_interrupt()):
                pipeline.run_passes(ray, run, recorded,
                                    pipeline.commit_loop(run, recorded, writer, progress, log_metrics, sink))
            if sink:
                sink.close()
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            try:
                if sink:
                    sink.close()  # pack what finished; a sample whose shard cannot be written waits in scratch
            finally:
                writer.flush()  # whatever finished is committed; a rerun resumes from it
            raise
        finally:
            m = {**progress.metrics(), **(sink.totals() if sink else {})}
            # the latest step: the final value
            mlflow.log_metrics({k: float(v) for k, v in m.items()}, step=progress.step)
            progress.log(final=True)
            if progress.timed:
                logger.info(progress.throughput_line())
            # this run's rows: the parts its writer committed (salvaged samples keep their own run's id)
            tracking.log_run_metadata(mlflow, metadata.read_parts(fs, root, paths=writer.parts), run.run_id)
            mlflow.set_tag("job_status", status)
            if status == "KILLED":  # Ctrl-C: MLflow's own context would record FAILED
                mlflow.end_run("KILLED")
        exported = _export(mlflow, run, tag)
        regressions = quality.finish(mlflow, cfg, fs, root, run.run_id, export=exported)
        _verify(mlflow, run)
        storage.clear_staging(fs, root)
        pipeline.remove_scratch(fs, run.layout)
    if regressions:
        logger.error("quality regression against the baseline: %s", "; ".join(regressions))
        return 3
    if cfg.fail_on_error and progress.failed:
        logger.error("%d row(s) failed (see the 'error' column in %s/%s)", progress.failed, cfg.output, METADATA)
        return 1
    return 0


def quiet_console() -> None:
    """Only what a user needs on the console: our progress, warnings that call for action, the result. Ray's startup
    notes, its Ray Data plan lines, the libraries' load bars and advisory warnings go (Ray's logs stay in its session
    folder); Ray's error-level note on restartable actor pools is dropped around the pipeline (operators.compute)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not sys.stderr.isatty():  # a log file or a pipe: Ray's worker-line prefixes without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    quiet_libraries(load=False)
    for noisy in ("alembic", "mlflow", "matplotlib",
                  "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for advisory in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        logging.getLogger(advisory).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    interrupt.loaded()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_console()
    try:
        try:
            cfg = job_config.load(args)
            manifest = setup.read_manifest(cfg)  # before any model loads
        except (ValueError, ManifestError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return run(cfg, manifest)
    except KeyboardInterrupt:  # the lease is released and the MLflow run marked KILLED on the way out
        return interrupted_exit()


def interrupted_exit() -> int:
    """Exit status 130 after Ctrl-C, with one line, the last one. Ray is shut down first (its local cluster ends with
    it: a worker cut off mid-task may still write a line to the stderr it shares with this driver); the process then
    ends at once, as Ray Data's driver threads, cut off mid-run, would otherwise touch the shut-down worker at
    interpreter exit and end the process with status 1 and a core-worker error line."""
    if ray.is_initialized():
        ray.shutdown()
    print(interrupt.JOB, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(130)


if __name__ == "__main__":
    interrupt.exit_now(main())
