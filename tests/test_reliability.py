"""One row can never sink a run: bounded parameters, the memory pre-check, a row that kills every worker it lands on,
a straggler, an actor killed from outside, two drivers on one output, a throttling and connection-cutting object
store, a node lost. Real Ray (local, or a multi-node `ray.cluster_utils.Cluster`), real moto server, no mocks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.metadata import read_latest, read_parts
from operators.storage import filesystem
from pipelines.config import resolve_params
from pipelines.params import Limits

from . import jobutil
from .jobutil import (
    CREDS,
    ROOT,
    free_port,
    job_cmd,
    job_env,
    mlflow_store,
    parent_runs,
    run_job,
    s3_bucket,
    session_processes,
    sha256_file,
    start_server,
    stop_server,
    tiny_config,
    wait_port,
)

TINY = {"steps": 2, "frames": 4, "height": 32, "width": 32}


def _manifest(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_every_size_parameter_is_bounded():
    with pytest.raises(ValueError, match=r"^height: at most 2048 \(limits.max_height\), got 100000$"):
        resolve_params({"prompt": "x", "height": 100000, "width": 100000})
    with pytest.raises(ValueError, match=r"^frames: at most 256"):
        resolve_params({"prompt": "x", "frames": 10_000})
    with pytest.raises(ValueError, match=r"^frames: 128 x 1024 x 1024 = 134,217,728 pixels exceed limits.max_pixels"):
        resolve_params({"prompt": "x", "frames": 128, "height": 1024, "width": 1024})
    raised = Limits(max_pixels=2**28)  # a job config's `limits:` can raise them
    assert resolve_params({"prompt": "x", "frames": 128, "height": 1024, "width": 1024}, limits=raised).frames == 128
    with pytest.raises(ValueError, match="limits.max_steps: must be an integer >= 1"):
        Limits(max_steps=0)


@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
def test_poison_rows_and_a_straggler_never_sink_the_run(tmp_path, tiny_cache):
    """Among ordinary rows: one that kills every worker it lands on, one that stalls, one too big for the memory
    budget, one over the size bounds. The run ends 0 with every ordinary row ok; a rerun makes no new video."""
    rows = [{"id": f"ok-{i}", "prompt": f"A calm lake number {i}."} for i in range(4)]
    rows[1:1] = [{"id": "kill", "prompt": "POISON: a row that kills its worker."}]
    rows[3:3] = [{"id": "slow", "prompt": "SLOW: a row that stalls."}]
    rows += [{"id": "big", "prompt": "A row too big for the budget.", "height": 512, "width": 512},
             {"id": "huge", "prompt": "A row over the bounds.", "height": 100000, "width": 100000}]
    manifest = _manifest(tmp_path / "m.parquet", [{"height": None, "width": None, **r} for r in rows])
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, defaults=TINY, scores={"enabled": False},
                      compute={"batch_size": 2, "sampler_batch": 1, "memory_budget_gb": 0.05, "row_timeout_s": 5,
                               "max_task_retries": 1}, commit={"progress_seconds": 2})
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    env = job_env(IVMIX_FAULTS="kill=POISON;sleep=SLOW:120")
    args = ("--config", cfg, "--manifest", manifest, "--output", str(out), "--mlflow-uri", mlflow_store(db),
            "--experiment", "r")
    start = time.monotonic()
    r = run_job(*args, env=env)
    first_s = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-5000:]
    meta = {m["id"]: m for m in read_latest(str(out)).to_pylist()}
    assert {i: meta[i]["status"] for i in meta} == {**{f"ok-{i}": "ok" for i in range(4)}, "kill": "failed",
                                                    "slow": "failed", "big": "failed", "huge": "failed"}
    assert (meta["kill"]["error"].startswith("worker died while generating this row (")
            and meta["kill"]["sampler"] == "ivmixed")
    assert meta["slow"]["error"].startswith("row_timeout_s: still running after 5 s; its worker was ended and replaced")
    assert (meta["big"]["error"].startswith("memory: 4 frames at 512x512 need about ")
            and "compute.memory_budget_gb" in meta["big"]["error"])
    assert meta["huge"]["error"] == "height: at most 2048 (limits.max_height), got 100000"
    assert sorted(os.listdir(out / "videos")) == [f"ok-{i}.mp4" for i in range(4)]
    assert "running their rows again one at a time on fresh actors" in r.stderr
    assert "in flight on the actors, last row back " in r.stderr  # the heartbeat through the stall and restarts
    ids = read_parts(*filesystem(str(out))).column("id").to_pylist()
    assert sorted(ids) == sorted(meta)  # exactly one committed row per id
    assert not (out / ".runs").exists() and not (out / "_lease.json").exists()  # scratch and lease gone at the end

    from mlflow.tracking import MlflowClient

    (run,) = parent_runs(MlflowClient(f"sqlite:///{db}"), "r")
    m = run.data.metrics
    assert (m["rows_ok"], m["rows_failed"], m["rows_worker_died"], m["rows_timed_out"], m["rows_out_of_memory"]) == (
        4, 4, 1, 1, 1)

    videos = {p: sha256_file(str(out / "videos" / p)) for p in os.listdir(out / "videos")}
    start = time.monotonic()
    # the rows left go through the todo file in the run's scratch and Ray's Parquet read, as for a manifest too big
    # for the driver to hold (docs/job.md "Resume")
    r = run_job(*args, env={**env, "IVMIX_PLAN_IN_DRIVER_ROWS": "0"})
    rerun_s = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-5000:]
    again = {m["id"]: m for m in read_latest(str(out)).to_pylist()}
    assert again["kill"]["error"].startswith("worker died while generating this row in an earlier run; not run again")
    assert {p: sha256_file(str(out / "videos" / p)) for p in os.listdir(out / "videos")} == videos  # no new video
    print(f"first run {first_s:.0f} s, rerun {rerun_s:.0f} s")


def _actor_pids() -> list[int]:
    """The actors of the session's Ray (not those of another test process's Ray)."""
    return session_processes("MapWorker", jobutil.SHARED_RAY_SESSION)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
def test_an_actor_killed_mid_run_is_replaced_and_the_run_completes(tmp_path, tiny_cache):
    n = 6
    manifest = _manifest(tmp_path / "m.parquet",
                         [{"id": f"v{i}", "prompt": f"prompt {i}", "seed": i} for i in range(n)])
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, defaults={**TINY, "steps": 8}, scores={"enabled": False},
                      compute={"batch_size": 1, "sampler_batch": 1}, commit={"every_rows": 1, "every_seconds": 1})
    out = tmp_path / "out"
    proc = subprocess.Popen(job_cmd("--config", cfg, "--manifest", manifest, "--output", str(out), "--mlflow-uri",
                                    mlflow_store(tmp_path / 'db')), env=job_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: (out / "metadata").exists() and os.listdir(out / "metadata"), 240, "no row committed")
        pids = _wait_for(_actor_pids, 30, "no actor process")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        at_kill = read_parts(*filesystem(str(out))).num_rows
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-4000:]
    assert at_kill < n  # the kill came mid-run
    meta = read_latest(str(out)).to_pylist()
    assert sorted(m["id"] for m in meta) == [f"v{i}" for i in range(n)] and all(m["status"] == "ok" for m in meta)
    ids = read_parts(*filesystem(str(out))).column("id").to_pylist()
    assert len(ids) == n and sorted(os.listdir(out / "videos")) == [f"v{i}.mp4" for i in range(n)]


@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
def test_a_second_driver_on_the_same_output_refuses(tmp_path, tiny_cache):
    n = 6
    manifest = _manifest(tmp_path / "m.parquet", [{"id": f"v{i}", "prompt": f"prompt {i}"} for i in range(n)])
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, defaults={**TINY, "steps": 8}, scores={"enabled": False},
                      compute={"batch_size": 1, "sampler_batch": 1})
    out = tmp_path / "out"
    common = ("--config", cfg, "--manifest", manifest, "--output", str(out), "--mlflow-uri",
              mlflow_store(tmp_path / 'db'))
    first = subprocess.Popen(job_cmd(*common, "--run-name", "first-night"), env=job_env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: (out / "_lease.json").exists(), 120, "the first driver took no lease")
        second = run_job(*common, "--run-name", "second-night")
        _, err = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "error: --output: another run is writing" in second.stderr and "run first-night on" in second.stderr
    assert first.returncode == 0, err[-4000:]
    ids = read_parts(*filesystem(str(out))).column("id").to_pylist()
    assert sorted(ids) == [f"v{i}" for i in range(n)]  # one committed row per id, all from the first driver
    assert all(m["status"] == "ok" for m in read_latest(str(out)).to_pylist())


@pytest.mark.heavy
def test_a_stale_lease_is_taken_over_and_a_fresh_one_is_not(tmp_path):
    from operators.lease import Lease, LeaseHeld

    fs, root = filesystem(str(tmp_path / "out"))
    fs.makedirs(root)
    stale = {"token": "x", "run": "crashed", "host": "h", "pid": 1, "heartbeat": time.time() - 1000, "ttl_s": 300}
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(stale))
    lease = Lease(fs, root, "mine", ttl_s=300).acquire()
    try:
        with pytest.raises(LeaseHeld, match="run mine on"):
            Lease(fs, root, "other", ttl_s=300).acquire()
    finally:
        lease.release()
    assert not (tmp_path / "out" / "_lease.json").exists()
    # a fresh lease whose holder ran on this host and is gone (a killed driver) is taken at once
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    fresh = {**stale, "host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(fresh))
    Lease(fs, root, "next", ttl_s=300).acquire().release()


@pytest.fixture
def faulty_s3(s3_endpoint, tmp_path_factory):
    """The session's moto server and, in front of it, the fault-injecting proxy (every 4th request 503 SlowDown,
    every 7th PUT cut): (direct URL, proxied URL)."""
    logs = tmp_path_factory.mktemp("faulty")
    proxy_port = free_port()
    with open(logs / "proxy.log", "w") as log:
        proxy = start_server([sys.executable, os.path.join(ROOT, "tests", "faultproxy.py"), "--upstream", s3_endpoint,
                              "--port", str(proxy_port), "--every-503", "4", "--cut-put", "7"], job_env(), log)
        try:
            wait_port(proxy_port)
            yield s3_endpoint, f"http://127.0.0.1:{proxy_port}"
        finally:
            stop_server(proxy)


@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
def test_uploads_survive_throttling_and_cut_connections(faulty_s3, tmp_path, tiny_cache, monkeypatch):
    direct, proxied = faulty_s3
    fs = s3_bucket(direct, "flaky", monkeypatch)
    n = 8
    manifest = _manifest(tmp_path / "m.parquet", [{"id": f"v{i}", "prompt": f"prompt {i}"} for i in range(n)])
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, defaults=TINY, compute={"batch_size": 2, "sampler_batch": 2})
    r = run_job("--config", cfg, "--manifest", manifest, "--output", "s3://flaky/run", "--mlflow-uri",
                mlflow_store(tmp_path / 'db'), env=job_env(**CREDS, AWS_ENDPOINT_URL=proxied))
    assert r.returncode == 0, r.stderr[-5000:]
    stats = subprocess.run(["curl", "-s", "-X", "STATS", proxied], capture_output=True, text=True).stdout
    assert "'503': 0" not in stats and "'cut': 0" not in stats, stats  # faults were injected
    meta = read_latest("s3://flaky/run").to_pylist()  # read straight from moto (this process's settings)
    assert sorted(m["id"] for m in meta) == [f"v{i}" for i in range(n)] and all(m["status"] == "ok" for m in meta)
    import hashlib

    for m in meta:
        data = fs.cat_file(f"flaky/run/videos/{m['id']}.mp4")
        assert len(data) == m["bytes"] and hashlib.sha256(data).hexdigest() == m["sha256"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_node_lost_mid_run(tmp_path, tiny_cache):
    """Two worker nodes (ray.cluster_utils.Cluster); the node that hosts the actor is removed mid-run: the run ends
    on the other node with one committed ok row and one video per id."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        n = 8
        manifest = _manifest(tmp_path / "m.parquet", [{"id": f"v{i}", "prompt": f"prompt {i}"} for i in range(n)])
        cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, defaults={**TINY, "steps": 8}, scores={"enabled": False},
                          compute={"batch_size": 1, "sampler_batch": 1, "cpus_per_actor": 1},
                          commit={"every_rows": 1, "every_seconds": 1})
        out = tmp_path / "out"
        proc = subprocess.Popen(job_cmd("--config", cfg, "--manifest", manifest, "--output", str(out), "--mlflow-uri",
                                        mlflow_store(tmp_path / 'db')), env=job_env(RAY_ADDRESS=cluster.address),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _wait_for(lambda: (out / "metadata").exists() and os.listdir(out / "metadata"), 300, "no row committed")
            ray.init(address=cluster.address)
            from ray.util.state import list_actors

            alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "MapWorker" in a.class_name]
            host = next(node for node in nodes if node.node_id == alive[0].node_id)
            at_removal = read_parts(*filesystem(str(out))).num_rows
            cluster.remove_node(host)
            _, err = proc.communicate(timeout=500)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            ray.shutdown()
        assert proc.returncode == 0, err[-4000:]
        assert at_removal < n  # the node went mid-run
        ids = read_parts(*filesystem(str(out))).column("id").to_pylist()
        assert sorted(ids) == [f"v{i}" for i in range(n)]
        assert all(m["status"] == "ok" for m in read_latest(str(out)).to_pylist())
        assert sorted(os.listdir(out / "videos")) == [f"v{i}.mp4" for i in range(n)]
    finally:
        cluster.shutdown()


@pytest.mark.heavy
def test_a_batch_that_cannot_fit_is_split_and_a_row_that_cannot_fit_fails(tmp_path, tiny_ad_dir):
    """The memory pre-check in the operator itself (called as Ray Data calls it): a budget between what one row and
    what two rows need splits the batch (both ok); a budget under one row fails each row with both numbers."""
    from dataclasses import asdict

    from operators.actors import VideoGenerator
    from operators.resolve import Resolver, resolve_rows
    from pipelines import memory
    from pipelines.config import ModelSpec

    spec = asdict(ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="float32"))
    resolver = Resolver.build(spec, defaults=TINY)
    batch = resolve_rows(pa.table({"id": ["a", "b"], "prompt": ["one", "two"]}), resolver)
    probe = VideoGenerator(resolver, str(tmp_path / "probe"), "run", "test")
    one, two = (memory.estimate(probe.models, b, 4, 32, 32).total for b in (1, 2))
    assert one < two
    split = VideoGenerator(resolver, str(tmp_path / "split"), "run", "test", sampler_batch=2,
                           memory_budget_gb=(one + two) / 2 / 2**30)
    assert [r["status"] for r in split(batch).to_pylist()] == ["ok", "ok"]
    tight = VideoGenerator(resolver, str(tmp_path / "tight"), "run", "test", sampler_batch=2,
                           memory_budget_gb=one / 2 / 2**30)
    rows = tight(batch).to_pylist()
    assert [r["status"] for r in rows] == ["failed", "failed"] and all(
        r["error"].startswith("memory: 4 frames at 32x32 need about ") and "compute.memory_budget_gb" in r["error"]
        for r in rows)
    assert not (tmp_path / "tight" / "videos").exists()


@pytest.mark.heavy
def test_a_failed_batch_frees_its_tensors_before_the_rows_are_retried_alone(tmp_path, tiny_ad_dir, monkeypatch):
    """A batched call that runs out of memory: the single-row retries start only after the failed call's tensors are
    gone (no live traceback holds them), so the retry does not meet the same out-of-memory."""
    import weakref
    from dataclasses import asdict

    import torch

    import pipelines.generate as gen_module
    from operators.actors import VideoGenerator
    from operators.resolve import Resolver, resolve_rows
    from pipelines.config import ModelSpec

    real, held, alive_at_retry = gen_module.generate, [], []

    def generate(backbone, rows, **kw):
        if len(rows) > 1:
            activations = torch.zeros(1 << 20)  # what the failed call had allocated
            held.append(weakref.ref(activations))
            raise RuntimeError("CUDA out of memory (simulated)")
        alive_at_retry.append(held[0]() is not None)
        return real(backbone, rows, **kw)

    monkeypatch.setattr(gen_module, "generate", generate)
    spec = asdict(ModelSpec.from_model_dir("animatediff", tiny_ad_dir, device="cpu", dtype="float32"))
    resolver = Resolver.build(spec, defaults=TINY)
    batch = resolve_rows(pa.table({"id": ["a", "b"], "prompt": ["one", "two"]}), resolver)
    rows = VideoGenerator(resolver, str(tmp_path / "out"), "run", "test", sampler_batch=2)(batch).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"] and alive_at_retry == [False, False]
