"""Where a CLI's result goes: checked before any model loads, written through fsspec (local paths, `s3://`, ...),
never visible half-written, with the file mode the batch job's files get (0666 less the umask).

A local file is written under a hidden temporary name in its own folder and renamed into place; a remote object is
written in one PUT (S3 makes an object visible only when it is complete)."""
from __future__ import annotations

import os
import tempfile
from typing import Callable

SUFFIXES = {"mp4": ".mp4", "latent": ".npy"}
S3_ATTEMPTS = 10


def filesystem(uri: str):
    """(fs, path) for a URI or local path; S3 takes its endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO and
    other S3-compatible stores) and its credentials from the standard AWS variables."""
    import fsspec

    kwargs = {}
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        kwargs["skip_instance_cache"] = False
        # throttling (503 SlowDown) and dropped connections: the S3 client's own retries, exponential backoff with
        # jitter
        kwargs["config_kwargs"] = {"retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"}}
    return fsspec.core.url_to_fs(uri, **kwargs)


def _fs(uri: str):
    try:
        return filesystem(uri)
    except (ImportError, ValueError) as err:  # unknown protocol, or its package is not installed
        raise ValueError(f"cannot write to {uri!r}: {err}") from None


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def check_output(uri: str, output_type: str, flag: str = "--out") -> None:
    """Raise ValueError (naming `flag`) unless `uri` can take an `output_type` file: the right extension, not a
    folder, and (locally) a folder that exists or can be created and is writable."""
    suffix = SUFFIXES[output_type]
    if not uri or uri.endswith(("/", os.sep)):
        raise ValueError(f"{flag}: give a file name ending in {suffix}, got {uri!r}")
    if not uri.lower().endswith(suffix):
        raise ValueError(f"{flag}: --output-type {output_type} writes a {suffix} file; {uri!r} does not end in "
                         f"{suffix}")
    fs, path = _fs(uri)
    if not is_local(fs):
        bucket = path.split("/")[0]
        try:
            found = fs.exists(bucket)
        except Exception as err:  # noqa: BLE001 - no credentials, no endpoint: say so before any model loads
            raise ValueError(f"{flag}: cannot reach {uri!r} ({type(err).__name__}: {err})") from None
        if not found:
            raise ValueError(f"{flag}: {fs.unstrip_protocol(bucket)!r} does not exist or is not reachable")
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {uri!r} is a folder; give a file name ending in {suffix}")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag}: {probe!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: {probe!r} is not writable")


def write_atomic(uri: str, write: Callable[[str], None]) -> None:
    """`write(local_path)` fills a temporary file that then appears under `uri` whole, or not at all."""
    fs, path = _fs(uri)
    suffix = os.path.splitext(path)[1]
    if is_local(fs):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=folder)
        os.close(fd)
        try:
            write(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the job's files are 0666 & ~umask
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = os.path.join(tmpdir, "out" + suffix)
        write(tmp)
        fs.put_file(tmp, path)
