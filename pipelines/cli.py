"""What both single-video CLIs share: checks of model sources before loading, one-line model errors, a quiet
console (the libraries' load bars and advisory warnings off), the per-step progress bar, exit codes."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Callable, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_CODES = "exit status: 0 written; 2 bad input or a model that cannot be loaded (one 'error: <what>: <why>' line); 1 a crash"
# a hub repository id: "name" or "org/name" (what huggingface_hub accepts); anything else must be an existing path
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def check_source(name: str, value: str | None) -> None:
    """A model source is an existing file/folder or a hub id; a mistyped local path fails here, before loading."""
    if value is None or os.path.exists(os.path.expanduser(value)):
        return
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value
    if looks_local or not HUB_ID.match(value) or "--" in value or ".." in value:
        raise ValueError(f"{name}: {value!r} is not an existing file or folder (nor a hub id such as 'org/name')")


def tiny_kind(folder: str) -> str | None:
    """The model kind a `python -m pipelines.tiny KIND DIR` folder holds (its tiny.json), or None for other folders."""
    try:
        with open(os.path.join(folder, "tiny.json")) as f:
            return json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def load_models(load: Callable[[], T]) -> T:
    """Run a model loader; whatever it raises becomes one ValueError line (the CLI prints `error: ...`, exit 2)."""
    try:
        return load()
    except ValueError as err:
        if type(err) is ValueError and re.match(r"^[\w.-]+: ", str(err)):  # our own checks name the parameter
            raise
        raise ValueError(_one_line(err)) from err
    except Exception as err:  # noqa: BLE001 - a missing repo, a wrong folder, a bad checkpoint: all input problems
        logger.debug("model loading failed", exc_info=True)
        raise ValueError(_one_line(err)) from err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"models: could not be loaded ({type(err).__name__}: {text[:400]})"


def quiet_libraries() -> None:
    """Silence what a user would read as failure or noise: the libraries' per-file load bars, advisory warnings
    (a missing optional torchvision, diffusers' dtype-cast note, tokenizer length notes) and the S3 clients' INFO lines.
    Our own log lines (progress, truncated prompts, results) stay; Ray's are the job's business (jobs/generate.py)."""
    for name in ("aiobotocore", "botocore", "s3fs", "fsspec", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def progress_bar(total: int, desc: str, quiet: bool):
    """A per-step bar on stderr (step, model calls so far, ETA), as diffusers pipelines show; `quiet` hides it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=quiet, file=sys.stderr, dynamic_ncols=True)
