"""The job against real servers started here: an S3 endpoint (moto's server mode, as s3fs tests itself)
reachable from the Ray workers, and an `mlflow server` over SQLite."""
import hashlib
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .jobutil import (
    BIN,
    CREDS,
    free_port,
    job_env,
    parent_runs,
    run_job,
    s3_bucket,
    start_server,
    stop_server,
    tiny_config,
    wait_http,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = start_server([os.path.join(BIN, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1"], job_env(), log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=120)
        yield url
    finally:
        stop_server(proc)
        log.close()


def test_job_writes_to_s3_and_logs_to_an_mlflow_server(s3_endpoint, mlflow_server, tmp_path, tiny_ad_dir, monkeypatch,
                                                       shared_ray):
    """The job on S3 with webdataset output and an MLflow server; its shards read by docs/datasets.md's three readers
    ("Datasets") through the S3 endpoint. (Files output on S3: tests/test_reliability.py, through a fault proxy.)"""
    fs = s3_bucket(s3_endpoint, "ivmix", monkeypatch)
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b", "c", "bad"],
                             "prompt": ["A cat on a sofa.", "Waves on a rock.", "A red kite.",
                                                                   "Bad row."],
                             "height": pa.array([None, 48, None, 30], pa.int64())}), sink)
    fs.pipe("ivmix/prompts/nightly.parquet", sink.getvalue())

    cfg = tiny_config(tmp_path / "job.yaml", os.path.dirname(tiny_ad_dir), output={"shard_max_samples": 2})
    env = job_env(**CREDS, AWS_ENDPOINT_URL=s3_endpoint)
    args = ("--config", cfg, "--manifest", "s3://ivmix/prompts/nightly.parquet", "--output",
            "s3://ivmix/runs/2026-11-24",
            "--output-format", "webdataset", "--mlflow-uri", mlflow_server, "--experiment", "nightly")
    r = run_job(*args, env=env)
    assert r.returncode == 0, r.stderr[-5000:]

    fs.invalidate_cache()
    from operators.metadata import read_latest
    from operators.shards import read_sample

    meta = {m["id"]: m for m in read_latest("s3://ivmix/runs/2026-11-24").to_pylist()}
    ok = sorted(i for i, m in meta.items() if m["status"] == "ok")
    assert ok == ["a", "b", "c"] and meta["b"]["height"] == 48
    assert meta["bad"]["status"] == "failed" and meta["bad"]["error"].startswith("height:")
    urls = sorted({meta[i]["shard_uri"] for i in ok})  # the committed shards
    assert len(urls) == 2 and sorted(f"s3://{p}" for p in fs.glob("ivmix/runs/2026-11-24/shards/*.tar")) == urls
    assert not fs.exists("ivmix/runs/2026-11-24/videos") and not fs.exists("ivmix/runs/2026-11-24/.runs")
    sample = read_sample(fs, meta["a"]["shard_uri"], meta["a"]["shard_offset"])
    assert len(sample["mp4"]) == meta["a"]["bytes"] and hashlib.sha256(sample["mp4"]).hexdigest() == meta["a"]["sha256"]

    import fsspec
    import webdataset as wds
    from webdataset.gopen import gopen_schemes

    monkeypatch.setitem(gopen_schemes, "s3", lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open())
    assert sorted(s["json"]["id"] for s in wds.WebDataset(urls, shardshuffle=False).decode()) == ok

    import datasets

    # the tests run with HF_HUB_OFFLINE=1 (no hub here), which datasets applies to every remote URL, s3:// included
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hf = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", cache_dir=str(tmp_path / "hf"),
                               storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert sorted(j["id"] for j in hf["json"]) == ok

    import pyarrow.fs as pafs
    import ray

    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, access_key="testing", secret_key="testing",
                           region="us-east-1",
                           scheme="http")
    ray.init(address=shared_ray, logging_level="ERROR")
    try:
        rows = ray.data.read_webdataset("ivmix/runs/2026-11-24/shards/", filesystem=s3,
                                        file_extensions=["tar"]).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["json"]["id"] for r in rows) == ok

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = parent_runs(client, "nightly")
    assert run.data.metrics["rows_ok"] == 3 and run.data.metrics["rows_failed"] == 1 and run.data.metrics["shards"] == 2
    assert run.data.tags["output"] == "s3://ivmix/runs/2026-11-24"
    assert {"config", "metadata", "report", "scores"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # the report's videos in MLflow come out of the shards, under report/videos/ where the page links them
    # (docs/job.md: a webdataset run's report plays copies of its videos)
    assert "report/index.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert len(client.list_artifacts(run.info.run_id, "report/videos")) == 3

    # rerun: nothing regenerated, the failed row retried (and failing again)
    r = run_job(*args, env=env)
    assert r.returncode == 0 and "progress: 1/1 rows (0 ok, 1 failed)" in r.stderr
    fs.invalidate_cache()
    assert sorted(f"s3://{p}" for p in fs.glob("ivmix/runs/2026-11-24/shards/*.tar")) == urls


def test_aws_endpoint_url_s3_wins_over_aws_endpoint_url(s3_endpoint, monkeypatch):
    """docs/job.md "Object storage": the S3 endpoint comes from AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (the AWS
    SDKs' own precedence)."""
    import s3fs

    from pipelines.outputs import filesystem

    ours = s3_bucket(s3_endpoint, "precedence", monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    fs, path = filesystem("s3://precedence/a.txt")
    fs.pipe_file(path, b"written through AWS_ENDPOINT_URL_S3")
    assert ours.cat_file("precedence/a.txt") == b"written through AWS_ENDPOINT_URL_S3"

