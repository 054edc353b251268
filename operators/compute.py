"""The one place that knows how this Ray version spells an actor pool (`ActorPoolStrategy` or `concurrency=`).

Ray flipped between `compute=` and `concurrency=` twice (2.9, 2.51); restart caps have no named
parameter in 2.60 and still go through the deprecated `**ray_remote_args`. Callers ask for a fixed pool
here and spread the result into `map_batches`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from typing import Any, Iterator


def actor_pool(ray, *, size: int, num_gpus: float, num_cpus: float, max_restarts: int, max_task_retries: int,
               tasks_in_flight: int | None = None, concurrent_calls: int = 1) -> dict[str, Any]:
    """map_batches kwargs for a fixed-size actor pool with capped restarts. `tasks_in_flight`: blocks queued on one
    actor at a time (None: Ray Data's default, twice `concurrent_calls`); 1 keeps the rows that share an actor with a
    row that kills it out of its death (the rows-alone pass of jobs/pipeline.py). `concurrent_calls` > 1: that many
    calls of the operator run at once on each actor, each in its own thread (Ray Data's `max_concurrent_calls_per_actor`
    with `enable_true_multi_threading`): the operator serialises its device part itself (operators/worker.py
    `device_turn`), so one batch's encode and upload overlap the next batch's sampling."""
    # Ray Data's default is max_restarts=-1 (unlimited): a deterministic crash on one row would loop forever
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
    strategy = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=tasks_in_flight,
                                          max_concurrent_calls_per_actor=concurrent_calls,
                                          enable_true_multi_threading=concurrent_calls > 1)
    return dict(compute=strategy, num_gpus=num_gpus, num_cpus=num_cpus,
                max_restarts=max_restarts, max_task_retries=max_task_retries)


# Ray 2.60 passes Ray Data's map worker its constructor arguments as object refs and logs, from the driver's C++ core
# worker, one error-level line per actor of a pool with max_restarts > 0 (ray-project/ray#53727). Ray Data holds those
# refs for the whole execution, so the note is harmless here; users read it as a failure.
RESTART_NOTE = b"has constructor arguments in the object store and max_restarts > 0"


@contextlib.contextmanager
def without_actor_restart_note(note: bytes = RESTART_NOTE) -> Iterator[None]:
    """Pass the process's stderr (fd 2, which C++ writes to directly) through a filter that drops lines holding
    `note`; everything else reaches the real stderr unchanged, in order. Restored on exit."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()

    def pump() -> None:
        buf = b""
        with os.fdopen(read_fd, "rb", buffering=0) as src:
            while chunk := src.read(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                out = b"".join(line + b"\n" for line in lines if note not in line)
                if out:
                    os.write(saved, out)
        if buf and note not in buf:
            os.write(saved, buf)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump drains and ends
        thread.join(timeout=10)
        os.close(saved)


ERRORED_BLOCK_LOGGER = "ray.data._internal.execution.streaming_executor_state"


class ErroredBlocks(logging.Handler):
    """Counts the blocks Ray Data gave up on while `DataContext.max_errored_blocks` lets the run go on (a batch whose
    actor died past its task retries), and keeps the reason. Ray Data only logs these, with a traceback: while this
    context is open they are counted here instead and the driver says what it does about them."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Ignoring this exception" not in record.getMessage():
            return
        self.count += 1
        err = record.exc_info[1] if record.exc_info else None
        text = " ".join(str(err).split()) if err is not None else record.getMessage()
        self.reasons.append(f"{type(err).__name__ if err is not None else 'error'}: {text[:200]}")
        logging.getLogger(__name__).debug("errored block", exc_info=record.exc_info)

    def summary(self) -> str:
        return self.reasons[0] if self.reasons else "unknown"

    def __enter__(self) -> "ErroredBlocks":
        log = logging.getLogger(ERRORED_BLOCK_LOGGER)
        self._propagate = log.propagate
        log.addHandler(self)
        log.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        log = logging.getLogger(ERRORED_BLOCK_LOGGER)
        log.removeHandler(self)
        log.propagate = self._propagate
