"""Helpers for tests that run the real job and real servers as subprocesses (their fixtures: tests/conftest.py)."""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# the session's Ray (`ray start --head`, tests/conftest.py `shared_ray`) while a test that asked for it runs: job_env
# points the job at it through RAY_ADDRESS; None: each job starts its own local Ray, as a user's first run does
SHARED_RAY: str | None = None
# the session id of that Ray's processes (`ray start` runs in a session of its own): what tells its actors from those
# of another pytest-xdist worker's Ray on the same machine
SHARED_RAY_SESSION: int | None = None


def session_processes(pattern: str, session: int) -> list[int]:
    """Pids of the processes in `session` whose command line contains `pattern` (`pgrep -s SID -f PATTERN`)."""
    out = subprocess.run(["pgrep", "-s", str(session), "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ports() -> list[str]:
    """`ray start` flags for every port Ray would otherwise take at its fixed default (the dashboard agent's, the
    metrics', the runtime-env agent's, the client server's): a head started with them runs beside another Ray on the
    machine (the session's, a job's local one, another pytest-xdist worker's) instead of failing to serve jobs."""
    flags = []
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--ray-client-server-port"):
        flags += [flag, str(free_port())]
    return flags


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers; `proc`: the server's process, whose exit ends the wait at once."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with status {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as err:  # answering at all (e.g. 401 behind token auth) means it is up
            if err.code < 500:
                return
            time.sleep(0.3)
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def wait_port(port: int, timeout: float = 60.0) -> None:
    """Until something listens on 127.0.0.1:port (a bare connection: no request a server would count)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def job_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_"))}
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""),  # like an activated venv: `python` and `ray` are ours
               HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    if SHARED_RAY:
        env["RAY_ADDRESS"] = SHARED_RAY
    env.update(extra)
    return env


def start_server(cmd: list[str], env: dict, log, cwd: str | None = None) -> subprocess.Popen:
    """A server in its own process group, its output in `log`; `stop_server` ends the group."""
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


def stop_server(proc: subprocess.Popen, grace: float = 20) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def s3_bucket(endpoint: str, bucket: str, monkeypatch):
    """Create `bucket` on the endpoint, point this process's AWS settings at it, return an s3fs filesystem."""
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDS.items() if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    for k, v in {**CREDS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})


def tiny_config(path, tiny_cache: str, **overrides) -> str:
    """jobs/configs/tiny.yaml with the session's prebuilt tiny models and small sizes."""
    with open(os.path.join(ROOT, "jobs", "configs", "tiny.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["tiny_cache"] = tiny_cache
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def job_cmd(*args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "jobs", "generate.py"), *args]


def kill_job_when(args: list[str], ready, timeout: float = 300, poll: float = 0.05) -> None:
    """Start the job, then SIGKILL it and the local Ray it started (its process group) once `ready()` holds, it has
    ended, or `timeout` seconds passed."""
    env = {k: v for k, v in job_env().items() if k != "RAY_ADDRESS"}  # its own Ray, killed with it
    proc = subprocess.Popen(job_cmd(*args), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(poll)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_job(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(job_cmd(*args), env=env or job_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def parent_runs(client, experiment: str) -> list:
    """The job's own runs (not the nested per-sampler runs)."""
    exp = client.get_experiment_by_name(experiment).experiment_id
    return [r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags]


_MLFLOW_TEMPLATE: list[str] = []  # an empty SQLite store with MLflow's schema, made once per test process


def mlflow_store(path) -> str:
    """The URI of a new MLflow SQLite store at `path`: a copy of an empty one whose schema was made once in this
    process (about 2 s of MLflow's migrations per new store on 2 cores). A test of a store the job creates itself
    passes a plain `sqlite:///` URI instead (test_job_local's end-to-end run, the new-user tests)."""
    if not _MLFLOW_TEMPLATE:
        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="ivmix-mlflow-")
        atexit.register(shutil.rmtree, folder, True)
        template = os.path.join(folder, "mlflow.db")
        MlflowClient(f"sqlite:///{template}").search_experiments()  # makes the schema
        _MLFLOW_TEMPLATE.append(template)
    shutil.copyfile(_MLFLOW_TEMPLATE[0], path)
    return f"sqlite:///{path}"
