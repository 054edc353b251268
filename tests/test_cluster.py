"""`ray job submit` against a cluster the test starts with `ray start --head`."""
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import tempfile

import pyarrow.parquet as pq
import pytest

from operators.metadata import read_latest

from .jobutil import BIN, ROOT, free_port, job_env, mlflow_store, own_ports, parent_runs, tiny_config, wait_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory):
    """Ray 2.5x+ clusters use token auth: the head and every client share one token."""
    token = tmp_path_factory.mktemp("raytoken") / "auth_token"
    token.write_text(secrets.token_hex(32))
    return job_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))


def _wait_for_job_agent(address: str, env: dict, timeout: float = 180) -> None:
    """The dashboard answers before the head's job agent has registered; until then a submission fails with Ray's
    "No available agent to submit job, please try again later" (seen on a loaded machine). Submit a no-op job until
    one is accepted and has finished."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run([os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--", "true"], env=env,
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return
        if "No available agent" not in r.stdout + r.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"the cluster's job agent did not come up: {(r.stdout + r.stderr)[-2000:]}")
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, cluster_env):
    """A head node owned by this fixture: `ray start --block` in its own process group, stopped by signalling
    that group (never `ray stop`, which would kill every Ray on the machine)."""
    # a short temp dir, as Ray's socket paths must be (under pytest-xdist's folders they pass its 107-byte limit)
    temp = pathlib.Path(tempfile.mkdtemp(prefix="ivmix-cluster-"))
    dash, gcs = free_port(), free_port()
    start = [os.path.join(BIN, "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
             "--temp-dir", str(temp), "--disable-usage-stats", *own_ports()]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(start, env=cluster_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", timeout=120, proc=proc)
        _wait_for_job_agent(f"http://127.0.0.1:{dash}", cluster_env)
        yield f"http://127.0.0.1:{dash}"
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):  # `ray start --block` ignores SIGTERM for ~30 s
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submitted_to_a_ray_cluster(ray_cluster, cluster_env, tmp_path, tiny_ad_dir):
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    cfg = tiny_config(tmp_path / "job.yaml", os.path.dirname(tiny_ad_dir), scores={"enabled": False})
    manifest = os.path.join(ROOT, "datasets", "examples", "smoke.parquet")
    cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", ray_cluster, "--working-dir", ROOT,
           "--submission-id", "ivmix-test-smoke", "--entrypoint-num-cpus", "0", "--",
           "python", "jobs/generate.py", "--config", cfg, "--manifest", manifest, "--output", str(out),
           "--mlflow-uri", mlflow_store(db), "--experiment", "cluster"]
    env = dict(cluster_env)
    env.pop("PYTHONPATH")  # the job must find the project through its uploaded working dir
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert "succeeded" in r.stdout + r.stderr
    meta = read_latest(str(out))
    assert sorted(meta.column("id").to_pylist()) == sorted(pq.read_table(manifest).column("id").to_pylist())
    assert set(meta.column("status").to_pylist()) == {"ok"}
    assert len(os.listdir(out / "videos")) == 5

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = parent_runs(client, "cluster")
    assert run.data.tags["ray_submission_id"] == "ivmix-test-smoke"
    assert run.data.metrics["rows_ok"] == 5


def test_nightly_script_makes_a_dated_run_that_a_rerun_resumes(ray_cluster, cluster_env, tmp_path, tiny_ad_dir):
    """infra/nightly.sh against the real cluster: a partial first night, then a rerun that completes it."""
    db = tmp_path / "mlflow.db"
    env = dict(cluster_env)
    env.pop("PYTHONPATH")
    env.update(PATH=f"{BIN}:{env['PATH']}", RAY_ADDRESS=ray_cluster, RUN_DATE="2026-11-24", EXPERIMENT="nightly",
               MANIFEST=os.path.join(ROOT, "datasets", "examples", "smoke.parquet"), OUTPUT_ROOT=str(tmp_path / "runs"),
               CONFIG=tiny_config(tmp_path / "job.yaml", os.path.dirname(tiny_ad_dir), scores={"enabled": False}),
               EXTRA_ARGS=f"--limit 2 --mlflow-uri {mlflow_store(db)}")
    script = os.path.join(ROOT, "infra", "nightly.sh")
    r = subprocess.run([script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = tmp_path / "runs" / "2026-11-24"
    assert len(os.listdir(out / "videos")) == 2

    env["EXTRA_ARGS"] = f"--mlflow-uri sqlite:///{db}"
    r = subprocess.run([script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "nightly-2026-11-24-0 ended SUCCEEDED" in r.stdout and "submitting nightly-2026-11-24-1" in r.stdout
    from operators.metadata import read_parts
    from operators.storage import filesystem

    ids = read_parts(*filesystem(str(out))).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 5  # the first night's two rows were not redone
    assert len(os.listdir(out / "videos")) == 5
