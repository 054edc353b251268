"""One storage path for local folders, `file://` and `s3://` (fsspec), with atomic commits and bounded retries.

S3 endpoint and credentials come from the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` /
`AWS_ENDPOINT_URL_S3`), so MinIO and other S3-compatible stores work unchanged.

Atomicity: an S3 PUT (single or multipart) becomes visible only when complete, so objects are written
straight to their final key. A local file is written under `OUTPUT/.staging/` and renamed into place.
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import random
import tempfile
import time
import uuid
from typing import Callable, Iterable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# re-exported: one S3 endpoint rule for the CLIs and the job
from pipelines.outputs import filesystem, is_local  # noqa: F401 - re-exported for the job

from .layout import Layout

logger = logging.getLogger(__name__)
T = TypeVar("T")

# forwarded to Ray workers so every process sees the same store (and the same drill hooks, IVMIX_FAULTS)
ENV_VARS = ("IVMIX_FAULTS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "HF_HOME", "HF_HUB_OFFLINE",
            "HF_TOKEN")


def storage_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


def _transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)):
        return False
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or type(err).__name__ in (
        "ClientError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
        "ServerDisconnectedError")


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Bounded retries with exponential backoff and jitter on transient errors."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # classified below
            if attempt == attempts or not _transient(err):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            logger.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(err).__name__, err, attempt,
                           attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def put_file(fs: fsspec.AbstractFileSystem, local_path: str, dest: str, root: str) -> None:
    """Copy a local file to `dest` so that `dest` is never visible half-written."""
    if is_local(fs):
        staging = Layout(root).staging
        fs.makedirs(staging, exist_ok=True)
        fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        tmp = join(staging, f"{uuid.uuid4().hex}-{posixpath.basename(dest)}")
        with_retries(lambda: fs.put_file(local_path, tmp), f"write {tmp}")
        os.replace(tmp, dest)  # atomic rename on one filesystem
        return
    with_retries(lambda: fs.put_file(local_path, dest), f"upload {dest}")


def put_bytes(fs: fsspec.AbstractFileSystem, data: bytes, dest: str, root: str) -> None:
    with tempfile.NamedTemporaryFile(suffix=posixpath.splitext(dest)[1]) as tmp:
        tmp.write(data)
        tmp.flush()
        put_file(fs, tmp.name, dest, root)


def clear_staging(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove leftovers of interrupted local writes (never visible as outputs). One job per output prefix."""
    staging = Layout(root).staging
    if is_local(fs) and fs.exists(staging):
        fs.rm(staging, recursive=True)


def arrow_filesystem(fs: fsspec.AbstractFileSystem):
    """A pyarrow filesystem over an fsspec one (for Ray's read_parquet and pyarrow datasets)."""
    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def arrow_threads(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether a pyarrow scan of `fs` may run on Arrow's thread pool. Only for native files: a pool thread that
    read a Python-backed (fsspec) file can still hold the last reference to one of its buffers after the read has
    returned, and if the interpreter is exiting by then the thread's GIL request aborts the process ("terminate
    called without an active exception", apache/arrow#34314) -- a CLI that did its work exits 134."""
    return is_local(fs)


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: Iterable[str] | None = None) -> pa.Table:
    """One Parquet file as a table, decoded in the calling thread (see `arrow_threads`); with `columns`, only those
    of them the file has."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        wanted = [c for c in columns if c in pf.schema_arrow.names] if columns is not None else None
        return pf.read(columns=wanted, use_threads=False)
