"""The Ray part of the job (docs/architecture.md): Ray start-up, the capacity check, and the passes that turn the
manifest into committed metadata parts. The driver splits rows by kind here: each kind present in the manifest runs
through its own actor pool (`operators.kinds.KINDS`), one kind after the other, so an actor holds one model set."""
from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import signal
import threading
import time

import fsspec
import pyarrow as pa
import ray
import torch

from jobs.config import ComputeConfig
from jobs.setup import Recorded, Run
from operators import storage
from operators.compute import ErroredBlocks, actor_pool
from operators.kinds import KINDS, bivdiff_rows, of_kind
from operators.layout import Layout
from operators.metadata import WORKER_DIED
from operators.resolve import resolve_rows
from operators.worker import lost_rows
from pipelines.params import BIVDIFF, GENERATION

logger = logging.getLogger("jobs.generate")
READ_CPUS = 0.25  # per read / resolve task
# rows left (of a manifest the driver holds) that the driver resolves itself, at about 70 µs a generation row on one
# core: such a run starts no resolve, filter or repartition tasks (each a fresh Ray worker that imports the library).
# A BIVDiff row also looks its input videos up in storage (up to 3 requests, tens of ms each on S3), so only a few of
# those are resolved one after the other here. Larger runs are resolved by Ray Data tasks across the cluster.
RESOLVE_IN_DRIVER_ROWS = 10_000
RESOLVE_IN_DRIVER_BIVDIFF_ROWS = 100
RESERVED_CPUS = 1.0  # Ray's internal ListFiles task of read_parquet takes one whole CPU (not configurable in 2.60)


def job_runtime_env() -> dict:
    """The driver's storage variables (`operators.storage.ENV_VARS`) as the runtime env of the whole Ray job, so every
    task and actor of a run on an existing cluster sees the same store: each operator passes them too, but Ray 2.60's
    `ListFiles` task inside `read_parquet` takes no remote args and runs with the job's env alone. The keys a submitted
    job's own runtime env already sets (`ray job submit --runtime-env-json`) are left to it: Ray refuses a key set
    twice ("Failed to merge the Job's runtime env")."""
    env = storage.storage_env()
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for a submitted driver
    if injected:
        taken = (json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in taken}
    return {"env_vars": env} if env else {}


def init_ray():
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:  # a local Ray started here inherits the driver's environment; a running cluster does not
            kwargs["runtime_env"] = job_runtime_env()
        else:
            kwargs["include_dashboard"] = False
        ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # progress is our own log line (jobs.tracking)
    ctx.max_errored_blocks = -1  # a batch lost with its worker must not end the run: run_passes retries its rows
    return ray


def local_resources() -> dict[str, float] | None:
    """The CPUs and GPUs a local Ray started by this driver would have (Ray counts the machine's CPUs, fewer under a
    cgroup quota, and its visible GPUs), or None when the job joins a running cluster (RAY_ADDRESS) or Ray is up."""
    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return None
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def pick_device(setting: str, resources: dict) -> str:
    """`compute.device`, with "auto" resolved: cuda when the cluster (or the local Ray to be) has a GPU."""
    if setting != "auto":
        return setting
    return "cuda" if resources.get("GPU", 0) > 0 else "cpu"


def check_capacity(compute: ComputeConfig, resources: dict, device: str) -> None:
    """Refuse a pool that cannot start or that starves the read tasks (a silent hang otherwise).
    On an autoscaling cluster (compute.autoscaling) the same findings are warnings: nodes may still come."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    need_cpu = compute.num_actors * compute.cpus_per_actor
    problems = []
    if device == "cuda" and compute.num_actors > gpus:
        problems.append(f"compute.num_actors: {compute.num_actors} GPU actors need {compute.num_actors} GPUs; "
                        f"the cluster has {gpus:g}")
    if need_cpu + RESERVED_CPUS > cpus:
        problems.append(f"compute: {compute.num_actors} actors x {compute.cpus_per_actor:g} CPU leave less than "
                        f"{RESERVED_CPUS:g} CPU for reading the manifest on a {cpus:g}-CPU cluster; lower "
                        "compute.num_actors or compute.cpus_per_actor")
    if problems and compute.autoscaling:
        logger.warning("cluster is smaller than the pool right now (autoscaling expected): %s", "; ".join(problems))
    elif problems:
        raise ValueError("; ".join(problems))


@contextlib.contextmanager
def insistent_interrupt(every: float = 5.0):
    """Ctrl-C while the passes run raises KeyboardInterrupt in the driver's main thread, and again every `every` seconds
    until it has left this context. Once in CI (Ray 2.60) the run went on after the SIGINT, as if something under the
    consume loop had swallowed the KeyboardInterrupt; a repeated one reaches the driver's own handling (exit 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    hit, left = threading.Event(), threading.Event()

    def on_sigint(signum, frame) -> None:
        hit.set()
        raise KeyboardInterrupt

    def repeat() -> None:
        hit.wait()
        while not left.wait(every):
            _thread.interrupt_main()  # calls on_sigint in the main thread

    previous = signal.signal(signal.SIGINT, on_sigint)
    threading.Thread(target=repeat, name="interrupt-repeat", daemon=True).start()
    try:
        yield
    finally:
        left.set()
        hit.set()
        signal.signal(signal.SIGINT, previous)


def run_passes(ray, run: Run, recorded: Recorded, consume) -> None:
    """For each row kind in the manifest: pass 1 runs its rows in their batches. Batches lost with their worker (killed
    for memory, a crash, a node gone, a row past its time) come back as Ray Data errored blocks: pass 2 runs their rows
    again one at a time on fresh actors, and pass 3 records whatever was lost again as failed rows with the reason
    (docs/reliability.md). `consume(ds)` commits a dataset's metadata rows and returns its errored blocks."""
    cfg = run.cfg
    runtime_env = {"env_vars": storage.storage_env()}
    mfs, mpath = storage.filesystem(run.todo or cfg.manifest)
    # each kind's operator batch sizes (a pass that runs rows alone sets them to 1)
    batching = {GENERATION: {"sampler_batch": cfg.compute.sampler_batch},
                BIVDIFF: {"stage1_batch": cfg.bivdiff.stage1_batch}}

    planned = run.planned  # a manifest the driver holds: its rows left (Ray's Parquet read starts tasks and actors)
    in_driver = (planned is not None and planned.num_rows <= RESOLVE_IN_DRIVER_ROWS
                 and bivdiff_rows(planned) <= RESOLVE_IN_DRIVER_BIVDIFF_ROWS)

    def resolved(kind: str, block_rows: int | None = None):
        """The rows of `kind` left to run, resolved; `block_rows`: in blocks of that many rows (one actor call each, so
        that rows stream back as they finish and spread over the whole pool)."""
        # the plan dropped the rows whose manifest id is done; `done` is needed only for ids known once resolved
        known = {"done": run.done if run.plan.resolve_done else None, "duplicate_ids": run.manifest.duplicate_ids,
                 "poisoned": run.committed.poisoned, "seen": recorded.ids}
        if in_driver:
            rows = of_kind(resolve_rows(planned, run.resolver, **known), kind)
            step = block_rows or max(rows.num_rows, 1)
            # `take` copies each block's rows: a pickled slice would carry the whole table's buffers
            return ray.data.from_blocks([rows.take(pa.array(range(i, min(i + step, rows.num_rows)), pa.int64()))
                                         for i in range(0, max(rows.num_rows, 1), step)])
        if planned is not None:
            ds = ray.data.from_arrow(planned)
        else:
            ds = ray.data.read_parquet(mpath, filesystem=storage.arrow_filesystem(mfs), runtime_env=runtime_env,
                                       num_cpus=READ_CPUS)
            if cfg.limit and not run.todo:
                ds = ds.limit(cfg.limit)
        ds = ds.map_batches(resolve_rows, batch_format="pyarrow", batch_size=512, num_cpus=READ_CPUS,
                            runtime_env=runtime_env, fn_args=(run.resolver,), fn_kwargs=known)
        ds = ds.map_batches(of_kind, batch_format="pyarrow", num_cpus=READ_CPUS, fn_args=(kind,))
        return ds.repartition(target_num_rows_per_block=block_rows) if block_rows else ds

    def generation(kind: str, batch_size: int, batched: bool):
        extra = batching[kind] if batched else {k: 1 for k in batching[kind]}
        ds = resolved(kind, batch_size).map_batches(
            KINDS[kind].operator, fn_constructor_args=(run.resolver, cfg.output, run.run_id, run.version),
            fn_constructor_kwargs={"scorer": run.scorer, "memory_budget_gb": cfg.compute.memory_budget_gb,
                                   "row_timeout_s": cfg.compute.row_timeout_s, "output_format": cfg.layout.format,
                                   "contact_sheets": cfg.layout.contact_sheets, **extra},
            batch_size=batch_size, batch_format="pyarrow", runtime_env=runtime_env,
            **actor_pool(ray, size=cfg.compute.num_actors, num_gpus=1 if run.device == "cuda" else 0,
                         num_cpus=cfg.compute.cpus_per_actor, max_restarts=cfg.compute.max_restarts,
                         max_task_retries=cfg.compute.max_task_retries,
                         # rows alone: no other row waits on an actor that one of them may kill
                         tasks_in_flight=None if batched else 1,
                         concurrent_calls=cfg.compute.concurrent_batches if batched else 1))
        return consume(ds)

    for kind in run.kinds:
        errors = generation(kind, cfg.compute.batch_size, True)
        if errors.count:
            logger.warning("%d batch(es) were lost with their worker (%s); running their rows again one at a time on "
                           "fresh actors", errors.count, errors.summary())
            errors = generation(kind, 1, False)
        if errors.count:
            reason = f"{WORKER_DIED} ({errors.summary()}); it was lost in its batch and again when run alone"
            logger.warning("%d row batch(es) lost again; recording their rows as failed", errors.count)
            errors = consume(resolved(kind).map_batches(
                lost_rows, batch_format="pyarrow", num_cpus=READ_CPUS, runtime_env=runtime_env,
                fn_kwargs={"operator": KINDS[kind].operator, "resolver": run.resolver, "run_id": run.run_id,
                           "code_version": run.version, "reason": reason}))
            if errors.count:  # not even the failures could be recorded: a fault outside the rows (e.g. the manifest)
                raise RuntimeError(f"{errors.count} block(s) could not be processed: {errors.summary()}")


def commit_loop(run: Run, recorded: Recorded, writer, progress, log_metrics, sink=None):
    """`consume(ds)` for run_passes: every result batch goes to the metadata writer (a part per `commit.every_rows` rows
    or `every_seconds`) or, with webdataset output, to the shard sink (ok rows commit with their shard), the progress
    counters and, every `progress_seconds`, the log and MLflow."""
    commit = run.cfg.commit

    def consume(ds):
        last_commit = last_log = time.monotonic()
        # closed on the way out of an exception (Ctrl-C): Ray Data's executor shuts down now, not at interpreter exit
        # (where it would touch a worker Ray has already shut down and end the process with status 1)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        with ErroredBlocks() as errors, contextlib.closing(batches):
            for batch in batches:
                (sink or writer).add(batch)
                progress.add(batch)
                recorded.add(batch.column("id").combine_chunks())
                now = time.monotonic()
                if writer.pending >= commit.every_rows or now - last_commit >= commit.every_seconds:
                    writer.flush()
                    last_commit = now
                if now - last_log >= commit.progress_seconds:
                    progress.log()
                    log_metrics()
                    last_log = now
        writer.flush()
        return errors

    return consume


def remove_scratch(fs: fsspec.AbstractFileSystem, layout: Layout) -> None:
    """This run's scratch (`OUTPUT/.runs/<run>/`: timeout marks), and the folder when no other run left one."""
    if fs.exists(layout.scratch):
        fs.rm(layout.scratch, recursive=True)
    if storage.is_local(fs) and fs.exists(layout.runs) and not fs.ls(layout.runs):
        fs.rmdir(layout.runs)
