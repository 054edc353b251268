"""Batch generation job: Parquet manifest -> Ray actor pool -> videos + Parquet metadata -> MLflow.

The driver in parts (README "Architecture"): `jobs/config.py` (the config), `jobs/setup.py` (models, the manifest read
once, the run context), `jobs/pipeline.py` (Ray and its passes), `jobs/tracking.py` (MLflow), `jobs/quality.py` and
`jobs/report.py` (scores, regression, report); this module runs them in order and owns the exit codes.

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
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jobs import config as job_config  # noqa: E402
from jobs import pipeline, quality, setup, tracking  # noqa: E402
from jobs.pipeline import check_capacity  # noqa: E402,F401 - part of this module's interface
from operators import metadata, storage  # noqa: E402
from operators.manifest import ManifestError  # noqa: E402

logger = logging.getLogger("jobs.generate")
EXIT_CODES = ("exit status: 0 the job ran (failed rows are data: see the metadata's status/error columns) or had nothing "
              "to do; 1 --fail-on-error and a row failed, or a crash; 2 bad input (config, manifest, models, baseline), "
              "reported before any model loads; 3 a quality regression against the baseline")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python jobs/generate.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    ap.add_argument("--manifest", help="Parquet file or folder: local path or fsspec URI (s3://...)")
    ap.add_argument("--output", help="output prefix: local folder or fsspec URI; videos/ and metadata/ go below it")
    ap.add_argument("--output-format", choices=["files", "webdataset"],
                    help="files: videos/<id>.mp4 (default); webdataset: tar shards under shards/ (README \"Datasets\")")
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


def run(cfg: job_config.JobConfig, manifest: setup.Manifest) -> int:
    fs, root = storage.filesystem(cfg.output)
    committed = metadata.committed(fs, root)
    if cfg.compute.retry_poisoned:
        committed = dataclasses.replace(committed, poisoned=metadata.Committed.empty().poisoned)
    limit = min(manifest.rows, cfg.limit or manifest.rows)
    plan = setup.plan(cfg, manifest, committed.done)
    logger.info("manifest: %d rows%s; %d ids already committed under %s; %d row(s) to run", manifest.rows,
                f" (--limit {cfg.limit}: the first {limit})" if limit < manifest.rows else "", len(committed.done),
                cfg.output, plan.pending)
    try:
        model, bivdiff, scorer = setup.models(cfg, "bivdiff" in manifest.kinds)
        if scorer:
            setup.check_scorer(scorer)
        import mlflow

        tracking.start(mlflow, cfg)
        tracking.check_baseline(mlflow, cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_name = cfg.run_name or f"{os.path.basename(root) or 'run'}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    ctx = setup.RunContext(cfg, manifest, setup.resolver(cfg, model, bivdiff, manifest.kinds), fs, root, committed,
                           scorer, run_name, plan, device="none", version=code_version()[0])
    if len(committed.done) and not setup.anything_to_do(ctx):
        logger.info("nothing to do: every row%s is committed ok under %s", f" of the first {limit}" if limit < manifest.rows
                    else "", cfg.output)
        return _check_only(mlflow, ctx) if cfg.regression.baseline else 0
    from operators.lease import Lease, LeaseHeld

    lease = Lease(fs, root, run_name, cfg.commit.lease_ttl_s)
    try:
        lease.acquire()  # before anything is written or cleared: a second driver on this prefix stops here
    except LeaseHeld as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _execute(mlflow, ctx, total=limit * len(cfg.samplers or [None]))
    finally:
        lease.release()


def _export(mlflow, ctx: setup.RunContext, tag: str) -> dict | None:
    """The config's `export`: the output's ok rows over its thresholds as a new dataset (jobs/export.py)."""
    from jobs.export import Filter, export

    e = ctx.cfg.export
    if not e.to:
        return None
    dest = e.to.replace("{output}", ctx.cfg.output).replace("{run}", tag)
    summary = export(ctx.cfg.output, dest, Filter(e.min_clipsim, e.min_frame_consistency, e.max_flicker), fmt=e.format,
                     shard_max_mb=ctx.cfg.layout.shard_max_mb, shard_max_samples=ctx.cfg.layout.shard_max_samples,
                     contact_sheets=ctx.cfg.layout.contact_sheets, code_version=ctx.version)
    mlflow.set_tag("export_uri", summary["to"])
    mlflow.log_metric("export_rows", summary["rows"])
    return summary


def _replan(ctx: setup.RunContext) -> setup.RunContext:
    """After samples of a killed run were packed and committed: what is done now, and what is left to run."""
    committed = dataclasses.replace(metadata.committed(ctx.fs, ctx.root), poisoned=ctx.committed.poisoned)
    return dataclasses.replace(ctx, committed=committed, plan=setup.plan(ctx.cfg, ctx.manifest, committed.done))


def _check_only(mlflow, ctx: setup.RunContext) -> int:
    """Nothing to generate but a baseline to compare with: the quality stage over the committed metadata, no Ray."""
    with tracking.open_run(mlflow, ctx, code_version()[1]) as mlrun:
        mlflow.set_tag("job_status", "FINISHED")
        regressions = quality.finish(mlflow, ctx.cfg, ctx.fs, ctx.root, mlrun.info.run_id)
    if regressions:
        logger.error("quality regression against the baseline: %s", "; ".join(regressions))
        return 3
    return 0


def _execute(mlflow, ctx: setup.RunContext, total: int) -> int:
    """The run proper, with the output's lease held."""
    from operators.compute import without_actor_restart_note

    from operators import shards
    from operators.worker import run_dir

    cfg, fs, root = ctx.cfg, ctx.fs, ctx.root
    storage.clear_staging(fs, root)
    shards.remove_orphans(fs, root, ctx.committed.shards)  # with the lease held: no other run is writing
    if shards.salvage(fs, root, ctx.done, code_version=ctx.version, layout=cfg.layout):
        ctx = _replan(ctx)
    logger.info("starting Ray and %d actor(s); each loads its models once", cfg.compute.num_actors)
    ray = pipeline.init_ray()
    device = cfg.compute.device
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    ctx = ctx.with_device(device)
    try:
        pipeline.check_capacity(cfg.compute, ray.cluster_resources(), device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tracking.open_run(mlflow, ctx, code_version()[1]) as mlrun:
        ctx.run_id = mlrun.info.run_id
        status = "FINISHED"
        progress = tracking.Progress(ctx.plan.pending * len(cfg.samplers or [None]) if not ctx.plan.resolve_done
                                     else max(total - len(ctx.done), 0))
        tag = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{ctx.run_id[:8]}"
        writer = metadata.MetadataWriter(fs, root, tag)
        sink = shards.run_sink(fs, root, writer, tag, ctx.run_id, cfg.layout, ctx.version) if cfg.layout.format == "webdataset" else None
        if ctx.plan.keep is not None:
            ctx.todo = setup.write_todo(ctx, storage.join(run_dir(root, ctx.run_id), "todo.parquet"))

        def log_metrics() -> None:
            mlflow.log_metrics({k: float(v) for k, v in progress.metrics().items()}, step=progress.step)
            progress.step += 1

        try:
            with without_actor_restart_note():
                pipeline.run_passes(ray, ctx, pipeline.commit_loop(ctx, writer, progress, log_metrics, sink))
            if sink:
                sink.close()
        except BaseException:
            status = "FAILED"
            try:
                if sink:
                    sink.close()  # pack what finished; a sample whose shard cannot be written waits in scratch
            finally:
                writer.flush()  # whatever finished is committed; a rerun resumes from it
            raise
        finally:
            m = {**progress.metrics(), **(sink.totals() if sink else {})}
            mlflow.log_metrics({k: float(v) for k, v in m.items()}, step=progress.step)  # the latest step: the final value
            progress.log(final=True)
            # this run's rows: the parts its writer committed (salvaged samples keep their own run's id)
            tracking.log_run_metadata(mlflow, metadata.read_parts(fs, root, paths=writer.parts), ctx.run_id)
            mlflow.set_tag("job_status", status)
        exported = _export(mlflow, ctx, tag)
        regressions = quality.finish(mlflow, cfg, fs, root, ctx.run_id, export=exported)
        storage.clear_staging(fs, root)
        pipeline.remove_scratch(fs, root, ctx.run_id)
    if regressions:
        logger.error("quality regression against the baseline: %s", "; ".join(regressions))
        return 3
    if cfg.fail_on_error and progress.failed:
        logger.error("%d row(s) failed (see the 'error' column in %s/metadata)", progress.failed, cfg.output)
        return 1
    return 0


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
        manifest = setup.read_manifest(cfg)  # before any model loads
    except (ValueError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(cfg, manifest)


if __name__ == "__main__":
    raise SystemExit(main())
