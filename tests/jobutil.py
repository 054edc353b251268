"""Helpers for tests that run the real job and real servers as subprocesses."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
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


def job_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_"))}
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""),  # like an activated venv: `python` and `ray` are ours
               HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    env.update(extra)
    return env


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
    proc = subprocess.Popen(job_cmd(*args), env=job_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
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
    return subprocess.run(job_cmd(*args), env=env or job_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def parent_runs(client, experiment: str) -> list:
    """The job's own runs (not the nested per-sampler runs)."""
    exp = client.get_experiment_by_name(experiment).experiment_id
    return [r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags]
