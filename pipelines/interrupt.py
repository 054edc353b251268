"""How a command's process ends. Ctrl-C while it is still importing its libraries (torch, diffusers, Ray: seconds on a
small machine): one line and exit status 130, not a chained import traceback (docs/sample.md and docs/job.md, exit
status). Standard library only, so that a command's `__main__` module can install it before its heavy imports; the
command's `main()` hands SIGINT back to Python (`loaded`), where its own `except KeyboardInterrupt` says the same line.
A command that finished leaves at once (`exit_now`)."""
from __future__ import annotations

import atexit
import os
import signal
import sys

CLI = "interrupted; nothing half-written was left"  # the single-video CLIs write outputs whole or not at all
JOB = "interrupted; rerun the same command to resume"  # the job commits as it goes and resumes


def while_loading(module: str, message: str) -> None:
    """Install the handler when `module` (the caller's `__name__`) runs as the program, not when it is imported."""
    if module != "__main__":
        return

    def leave(signum, frame) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(130)  # nothing has started yet: no file, lease or run to close

    leave.while_loading = True
    signal.signal(signal.SIGINT, leave)


def loaded() -> None:
    """The libraries are in: Ctrl-C raises KeyboardInterrupt again (only if `while_loading` installed its handler)."""
    if getattr(signal.getsignal(signal.SIGINT), "while_loading", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_now(code: int) -> None:
    """End a finished command with `code` once its exit handlers (Ray's shutdown, logging's flush) have run, without
    Python's teardown of the loaded libraries: about 2 s of native finalizers (torch, Ray's core worker) on 2 cores,
    after every file the command writes is closed."""
    atexit._run_exitfuncs()  # CPython's own exit step, run here so that none is skipped
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
