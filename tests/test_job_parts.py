"""Unit tests, no Ray: the metadata rows a worker records (Recorder), the count of blocks Ray Data gave up on
(ErroredBlocks), the stderr filter that drops Ray's restart note, the driver's progress counters (Progress), and the
storage variables a run hands to the Ray job (job_runtime_env)."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import sys
import time

import pyarrow as pa
import pytest

from jobs import tracking
from jobs.pipeline import job_runtime_env
from operators import metadata
from operators.compute import ERRORED_BLOCK_LOGGER, RESTART_NOTE, ErroredBlocks, without_actor_restart_note
from operators.worker import Recorder
from pipelines.config import ModelSpec, resolve_params

SPEC = ModelSpec(backbone="animatediff", base="/models/base", device="cpu", dtype="float32")


# ---- Recorder ----------------------------------------------------------------------------------------------------
def recorder(kind: str = "generation") -> Recorder:
    return Recorder(kind, SPEC, "animatediff", "run-1", "0.1.0+abc")


def test_a_row_says_who_made_it_and_leaves_placement_out():
    before = dt.datetime.now(dt.timezone.utc)
    row = recorder().row("r1", "failed", "height: too small")
    after = dt.datetime.now(dt.timezone.utc)
    assert {k: row[k] for k in ("id", "status", "error", "run_id", "code_version", "backbone")} == {
        "id": "r1", "status": "failed", "error": "height: too small", "run_id": "run-1", "code_version": "0.1.0+abc",
        "backbone": "animatediff"}
    assert row["worker"] == f"{socket.gethostname()}:{os.getpid()}"  # this process made it
    spec = json.loads(row["model_spec"])
    assert spec["base"] == "/models/base" and not {"device", "dtype", "decode_chunk"} & set(spec)
    assert before <= row["finished_at"] <= after and row["finished_at"].tzinfo is not None
    assert "seed" not in row  # no params, no parameter columns


def test_a_row_carries_its_params_and_extra_values_win():
    params = resolve_params({"prompt": "A red kite.", "seed": 7, "idm_guidance": "6,2,7"})
    row = recorder().row("r1", "ok", None, params, seed=8, sha256="ab")
    assert row["prompt"] == "A red kite." and row["idm_guidance"] == params.idm_guidance.text() == "karras(6,2,7)"
    assert row["interval"] == params.interval.text() and row["steps"] == params.steps
    assert row["seed"] == 8 and row["sha256"] == "ab"  # keyword values override the params' record


def test_unresolved_rows_keep_only_text_prompts_and_tasks():
    rec = recorder()
    row = rec.unresolved({"_id": "x1", "_sampler": "standard", "prompt": "A cat.", "task": 3}, "prompt: too long")
    assert (row["id"], row["status"], row["error"], row["sampler"]) == ("x1", "failed", "prompt: too long", "standard")
    assert row["prompt"] == "A cat." and row["task"] is None  # a non-text cell is not copied into a text column
    row = rec.unresolved({"_id": "x2", "prompt": None}, "prompt: missing")
    assert row["sampler"] is None and row["prompt"] is None and row["task"] is None


def test_a_batch_table_keeps_pairs_and_passthrough_columns_by_position():
    rec = recorder()
    batch = pa.table({"id": ["a", "b", "c"], "prompt": ["p", "q", "r"], "category": ["animal", None, "sky"],
                      "status": ["kept", "x", None], "_id": ["a", "b", "c"], "_pair": ["g1", None, "g1"],
                      "_kind": ["generation"] * 3})
    rows = [rec.row(i, "ok" if i != "b" else "failed", None if i != "b" else "boom") for i in ("a", "b", "c")]
    table = rec.table(rows, batch)
    assert table.schema.names == [*metadata.SCHEMAS["generation"].names, "category", "manifest_status"]
    assert table.column("pair_id").to_pylist() == ["g1", None, "g1"]
    assert table.column("status").to_pylist() == ["ok", "failed", "ok"]  # the metadata status, not the manifest's
    assert table.column("manifest_status").to_pylist() == ["kept", "x", None]
    assert table.column("category").to_pylist() == ["animal", None, "sky"]
    assert table.column("error").to_pylist() == [None, "boom", None]


def test_a_batch_without_passthrough_columns_has_the_kinds_schema():
    rec = recorder("bivdiff")
    batch = pa.table({"id": ["a"], "prompt": ["p"], "_id": ["a"], "_pair": [None]})
    table = rec.table([rec.row("a", "ok", None)], batch)
    assert table.schema == metadata.SCHEMAS["bivdiff"] and table.num_rows == 1


# ---- ErroredBlocks -----------------------------------------------------------------------------------------------
def _raised(err: BaseException):
    try:
        raise err
    except type(err):
        return sys.exc_info()


def test_errored_blocks_are_counted_with_their_first_reason(caplog):
    log = logging.getLogger(ERRORED_BLOCK_LOGGER)
    with caplog.at_level(logging.DEBUG), ErroredBlocks() as errors:
        assert errors.summary() == "unknown"
        died = _raised(RuntimeError("The actor died\n   unexpectedly " + "x" * 300))
        log.error("An exception was raised from a task of operator X. Ignoring this exception with remaining "
                  "max_errored_blocks=-1.", exc_info=died)
        log.error("Ignoring this exception: no traceback")
        log.error("some other Ray Data error")  # not a block given up on
        log.warning("Ignoring this exception (a warning: below the handler's level)")
    assert errors.count == 2
    assert errors.reasons[0] == "RuntimeError: " + ("The actor died unexpectedly " + "x" * 300)[:200]
    assert errors.reasons[1] == "error: Ignoring this exception: no traceback"
    assert errors.summary() == errors.reasons[0]
    # while counted, nothing of that logger reaches the other handlers; each block's traceback is kept at debug level
    assert not [r for r in caplog.records if r.name == ERRORED_BLOCK_LOGGER]
    kept = [r for r in caplog.records if r.name == ErroredBlocks.__module__]
    assert [r.levelno for r in kept] == [logging.DEBUG] * 2 and kept[0].exc_info[0] is RuntimeError


def test_errored_blocks_restore_the_logger_on_exit(caplog):
    log = logging.getLogger(ERRORED_BLOCK_LOGGER)
    handlers, propagate = list(log.handlers), log.propagate
    with ErroredBlocks() as errors:
        assert errors in log.handlers and log.propagate is False
    assert log.handlers == handlers and log.propagate is propagate
    with caplog.at_level(logging.ERROR):
        log.error("Ignoring this exception after the context")
    assert errors.count == 0 and "after the context" in caplog.text  # not counted, shown as usual


# ---- the stderr filter -------------------------------------------------------------------------------------------
NOTE_LINE = b"[core_worker.cc:123] Actor MapWorker " + RESTART_NOTE + b". The refs may be lost.\n"


def test_the_filter_drops_the_restart_note_and_passes_the_rest_in_order(capfd):
    with without_actor_restart_note():
        os.write(2, b"first line\n" + NOTE_LINE + b"second line\n")
        os.write(2, NOTE_LINE[:40])  # the note cut across two writes is still one line
        os.write(2, NOTE_LINE[40:] + b"third line\nno newline at the end")
    assert capfd.readouterr().err == "first line\nsecond line\nthird line\nno newline at the end"


def test_the_filter_restores_stderr_and_takes_another_note(capfd):
    before = os.fstat(2)
    with without_actor_restart_note(b"drop me"):
        os.write(2, b"keep\nplease drop me now\n" + NOTE_LINE)
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    os.write(2, b"drop me: written after the context\n")
    assert capfd.readouterr().err == "keep\n" + NOTE_LINE.decode() + "drop me: written after the context\n"


# ---- Progress ----------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def results(*rows) -> pa.Table:
    """Committed metadata rows: (status, seconds, nfe, error[, tflop])."""
    rows = [(*r, None)[:5] for r in rows]
    cols = list(zip(*rows)) if rows else [[], [], [], [], []]
    return pa.table({"status": pa.array(cols[0], pa.string()), "seconds": pa.array(cols[1], pa.float64()),
                     "nfe": pa.array(cols[2], pa.int64()), "error": pa.array(cols[3], pa.string()),
                     "tflop": pa.array(cols[4], pa.float64())})


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(tracking.time, "monotonic", c)
    return c


def test_progress_counts_rows_and_failure_causes(clock):
    p = tracking.Progress(10)
    p.add(results(("ok", 2.0, 52, None, 3.5), ("ok", None, None, None),
                  ("failed", 9.0, 7, "height: not a multiple of 8", 2.0),
                  ("failed", None, None, metadata.WORKER_DIED + " (ActorDiedError)"),
                  ("failed", None, None, "row_timeout_s: ran past 60 s"), ("failed", None, None, "memory: needs 80 GB"),
                  ("failed", None, None, None)))
    p.add(results())
    assert (p.ok, p.failed, p.seconds, p.nfe) == (2, 5, 2.0, 52)  # a failed row's seconds and calls are not summed
    clock.t += 3600
    m = p.metrics()
    assert (m["rows_ok"], m["rows_failed"], m["rows_done"]) == (2, 5, 7)
    assert (m["rows_worker_died"], m["rows_timed_out"], m["rows_out_of_memory"]) == (1, 1, 1)
    assert m["seconds_per_video"] == 1.0 and m["nfe_per_video"] == 26.0
    assert m["tflop_total"] == 3.5 and m["tflop_per_video"] == 1.75  # ok rows only; one without a count adds none
    assert m["elapsed_seconds"] == 3600 and m["videos_per_hour"] == 2.0


def test_progress_line_eta_and_empty_runs(clock):
    p = tracking.Progress(10)
    assert p.line() == "progress: 0/10 rows (0 ok, 0 failed), 0.0 videos/h, ETA ?"
    m = p.metrics()
    assert m["seconds_per_video"] == 0.0 and m["nfe_per_video"] == 0.0 and m["videos_per_hour"] == 0.0
    p.add(results(("ok", 1.0, 6, None), ("ok", 1.0, 6, None), ("failed", None, None, "prompt: missing")))
    clock.t += 3600
    # 3 rows an hour, 7 left: 2 h 20 min
    assert p.line() == "progress: 3/10 rows (2 ok, 1 failed), 2.0 videos/h, ETA 2:20:00"
    p.add(results(*[("ok", 1.0, 6, None)] * 9))  # more rows than announced: nothing left, never negative
    assert p.line().endswith("ETA 0:00:00") and p.line().startswith("progress: 12/10 rows (11 ok, 1 failed)")


def test_the_final_progress_line_is_not_logged_twice(clock, caplog):
    p = tracking.Progress(2)
    with caplog.at_level(logging.INFO, logger=tracking.logger.name):
        p.add(results(("ok", 1.0, 6, None)))
        p.log()
        p.log()  # a periodic line is logged even when nothing changed
        p.log(final=True)  # the final line would repeat the last one: skipped
        p.add(results(("failed", None, None, "prompt: missing")))
        p.log(final=True)
    lines = [r.getMessage().split(",")[0] + "," + r.getMessage().split(",")[1] for r in caplog.records]
    assert lines == ["progress: 1/2 rows (1 ok, 0 failed)"] * 2 + ["progress: 2/2 rows (1 ok, 1 failed)"]


# ---- job_runtime_env -----------------------------------------------------------------------------------------------
def test_the_job_runtime_env_carries_the_storage_variables_a_submitted_job_has_not_set(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("AWS_", "IVMIX_", "HF_")) or key == "RAY_JOB_CONFIG_JSON_ENV_VAR":
            monkeypatch.delenv(key)
    assert job_runtime_env() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("PATH_NOT_FORWARDED", "x")
    assert job_runtime_env() == {"env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "id"}}
    # `ray job submit --runtime-env-json '{"env_vars": {"AWS_ACCESS_KEY_ID": ...}}'`: Ray refuses that key twice
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"AWS_ACCESS_KEY_ID": "id"}}, "metadata": {}}))
    assert job_runtime_env() == {"env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000"}}


def test_the_heartbeat_speaks_only_while_no_row_comes_back(caplog):
    """A `working:` line per interval without a row back (real time, 50 ms beats); silent once the context ends."""
    p = tracking.Progress(6)
    with caplog.at_level(logging.INFO, logger=tracking.logger.name):
        with tracking.Heartbeat(p, 0.05, pool_rows=4):
            time.sleep(0.5)
        first = [r.getMessage() for r in caplog.records]
        assert len(first) >= 2 and first[0].startswith(
            "working: 0/6 rows done, up to 4 in flight on the actors, no row back yet after "), first
        p.add(results(*[("ok", 1.0, 6, None)] * 4))
        caplog.clear()
        with tracking.Heartbeat(p, 0.05, pool_rows=4):
            time.sleep(0.3)
        assert [r.getMessage() for r in caplog.records][0].startswith(
            "working: 4/6 rows done, up to 2 in flight on the actors, last row back ")
        caplog.clear()
        time.sleep(0.15)
    assert not caplog.records


def test_the_heartbeat_waits_while_rows_keep_coming(caplog):
    p = tracking.Progress(100)
    with caplog.at_level(logging.INFO, logger=tracking.logger.name), tracking.Heartbeat(p, 1.0, pool_rows=4):
        for _ in range(30):  # a row back every 50 ms: never a second without one
            p.add(results(("ok", 1.0, 6, None)))
            time.sleep(0.05)
    assert not caplog.records


def test_the_rows_alone_pass_queues_one_block_per_actor():
    """Pass 2 (jobs/pipeline.py) runs lost rows one at a time: with Ray Data's default of 2 blocks queued per actor, a
    row waiting behind one that kills the actor died with it, twice, and was recorded as a worker death."""
    import ray

    from operators.compute import actor_pool

    kw = dict(size=2, num_gpus=0, num_cpus=1, max_restarts=3, max_task_retries=1)
    assert actor_pool(ray, **kw, tasks_in_flight=1)["compute"].max_tasks_in_flight_per_actor == 1
    assert actor_pool(ray, **kw)["compute"].max_tasks_in_flight_per_actor is None  # batched passes: Ray's default


def test_batched_passes_run_calls_side_by_side_on_an_actor_the_rows_alone_pass_one():
    """compute.concurrent_batches: the batched pass lets that many calls run at once on an actor, each in its own thread
    (Ray Data otherwise runs one call of an actor at a time, however many are queued); the rows-alone pass runs one."""
    import ray

    from operators.compute import actor_pool

    kw = dict(size=1, num_gpus=1, num_cpus=1, max_restarts=3, max_task_retries=1)
    two = actor_pool(ray, **kw, concurrent_calls=2)["compute"]
    assert two.max_concurrent_calls_per_actor == 2 and two.enable_true_multi_threading
    one = actor_pool(ray, **kw, tasks_in_flight=1)["compute"]
    assert one.max_concurrent_calls_per_actor == 1 and not one.enable_true_multi_threading


def timed(*rows) -> pa.Table:
    """Committed ok/failed rows with their timing: (status, worker, started s, finished s, sampler seconds)."""
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    at = [None if r[2] is None else t0 + dt.timedelta(seconds=r[2]) for r in rows]
    return pa.table({"status": [r[0] for r in rows], "seconds": [1.0] * len(rows), "nfe": [2] * len(rows),
                     "error": [None] * len(rows), "tflop": [None] * len(rows), "worker": [r[1] for r in rows],
                     "started_at": pa.array(at, pa.timestamp("us", tz="UTC")),
                     "finished_at": pa.array([t0 + dt.timedelta(seconds=r[3]) for r in rows],
                                             pa.timestamp("us", tz="UTC")),
                     "sampler_seconds": pa.array([r[4] for r in rows], pa.float64())})


def test_progress_measures_how_busy_the_actors_kept_their_devices():
    """sampler_share = device seconds of ok rows / the actors' wall time, each actor from its first device turn to its
    last row's end: worker a 0..10 s with 9 s sampled, worker b 100..110 s with 8 s (the gap between them is no one's
    time); a failed row and a row without timing (a driver-recorded failure) count for neither."""
    p = tracking.Progress(8)
    assert p.metrics()["sampler_share"] == 0.0 and p.metrics()["actor_seconds"] == 0.0
    p.add(timed(("ok", "a", 0.0, 4.0, 3.0), ("ok", "b", 100.0, 105.0, 4.0)))
    p.add(timed(("ok", "a", 3.5, 10.0, 6.0), ("ok", "b", 104.0, 110.0, 4.0), ("failed", "a", 0.0, 30.0, 5.0),
                ("ok", "c", None, 50.0, None)))
    m = p.metrics()
    assert m["actor_seconds"] == 20.0 and m["sampler_share"] == 17.0 / 20.0
    assert m["videos_per_actor_hour"] == 3600.0 * 4 / 20.0 and p.ok == 5
    assert p.throughput_line() == ("actors: sampling and decode 85.0% of their 20.0 s (2 worker(s)), "
                                   "720.0 videos per actor-hour")


def test_a_swallowed_ctrl_c_is_raised_again_until_the_passes_are_left():
    """jobs.pipeline.insistent_interrupt: a KeyboardInterrupt that a library catches is followed by another one in the
    main thread (the run must end on Ctrl-C); once the context is left, SIGINT's handler is the one before it."""
    import os
    import signal

    from jobs.pipeline import insistent_interrupt

    before = signal.getsignal(signal.SIGINT)
    again = False
    try:
        with insistent_interrupt(every=0.05):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass  # what a library under the consume loop might do
            time.sleep(5)  # the run going on
    except KeyboardInterrupt:
        again = True
    assert again and signal.getsignal(signal.SIGINT) is before


def test_a_device_turn_waits_while_two_batches_hold_frames():
    """operators/worker.py: decoded frames stay bounded with three calls per actor. A turn's hold on the frames
    outlives the turn until its videos are encoded (`release`); a third turn waits while two batches hold frames, and
    starts as soon as one lets go; a turn that raises lets go of its own."""
    import threading

    from operators.worker import RowWorker

    worker = RowWorker.__new__(RowWorker)  # the turn needs only the actor's two locks
    worker._device, worker._frames = threading.Lock(), threading.Semaphore(2)
    with worker.device_turn() as first:
        pass
    with worker.device_turn() as second:
        pass
    began = threading.Event()

    def third() -> None:
        with worker.device_turn() as turn:
            began.set()
        turn.release()

    thread = threading.Thread(target=third)
    thread.start()
    assert not began.wait(0.3)  # both earlier batches still hold frames (being encoded)
    first.release()
    first.release()  # idempotent: a second release frees nothing more
    assert began.wait(5)
    thread.join()
    with pytest.raises(RuntimeError):
        with worker.device_turn():
            raise RuntimeError("sampling failed")
    assert worker._frames.acquire(timeout=1) and not worker._frames.acquire(timeout=0.2)  # only `second` holds one
    second.release()
