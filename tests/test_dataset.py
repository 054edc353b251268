"""WebDataset output (docs/datasets.md "Reading a finished run"): a real run's shards read back by webdataset, Hugging
Face datasets and Ray Data with exactly the ok rows; per-shard stats; the export by score; a SIGKILL mid-run and a rerun
leave no partial shard and no duplicate sample; the driver's plan and the metadata's newest-row rule in Arrow."""
import datetime as dt
import glob
import hashlib
import json
import os
import re
import subprocess
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.metadata import read_latest, read_parts
from operators.storage import filesystem

from .jobutil import ROOT, job_cmd, job_env, kill_job_when, mlflow_store, parent_runs, run_job, sha256_file, tiny_config


def tar_samples(path: str) -> dict[str, dict[str, bytes]]:
    """Every sample of a tar by key, read with the standard library alone (the reference reader)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def check_dataset(prefix_fs, root: str, ok: dict[str, dict]) -> list[str]:
    """Shards under root/shards hold exactly the `ok` rows, each once, each member as the metadata says; every shard
    has its stats. Returns the shard paths."""
    tars = sorted(p for p in prefix_fs.ls(f"{root}/shards", detail=False) if p.endswith(".tar"))
    seen: dict[str, str] = {}
    for t in tars:
        local = prefix_fs.cat_file(t)
        path = f"/tmp/{hashlib.sha256(t.encode()).hexdigest()}.tar"
        with open(path, "wb") as f:
            f.write(local)
        stats = json.loads(prefix_fs.cat_file(t[: -len(".tar")] + ".json"))
        samples = tar_samples(path)
        os.remove(path)
        assert stats["samples"] == len(samples) and stats["bytes"] == len(local)
        assert stats["sha256"] == hashlib.sha256(local).hexdigest()
        for key, members in samples.items():
            rid = key.replace("%2E", ".")
            assert rid not in seen, f"sample {rid} is in {seen.get(rid)} and {t}"
            seen[rid] = t
            m = ok[rid]
            assert sorted(members) == ["json", "mp4", "png", "txt"]
            assert hashlib.sha256(members["mp4"]).hexdigest() == m["sha256"] and len(members["mp4"]) == m["bytes"]
            assert members["txt"].decode() == m["prompt"]
            meta = json.loads(members["json"])
            assert {k: meta[k] for k in ("id", "seed", "sampler", "steps", "model_spec", "clipsim", "model_calls")} == \
                {k: m[k] for k in ("id", "seed", "sampler", "steps", "model_spec", "clipsim", "model_calls")}
            assert m["shard_uri"].endswith(t) and m["video_uri"] is None
    assert sorted(seen) == sorted(ok)
    return tars


@pytest.mark.integration
def test_webdataset_run_read_by_three_readers_and_exported_by_score(tmp_path, tiny_cache, shared_ray):
    manifest = tmp_path / "m.parquet"
    ids = ["a1", "a2", "a.3", "a4", "a5", "bad"]
    pq.write_table(pa.table({"id": ids, "prompt": [f"A lantern number {i} over a lake." for i in range(6)],
                             "seed": list(range(6)), "height": pa.array([None] * 5 + [30], pa.int64())}), manifest)
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, output={"shard_max_samples": 2},
                      export={"to": "{output}/filtered/{run}", "min_clipsim": -1.0})
    r = run_job("--config", cfg, "--manifest", str(manifest), "--output", str(out), "--output-format", "webdataset",
                "--mlflow-uri", mlflow_store(db), "--experiment", "wds")
    assert r.returncode == 0, r.stderr[-4000:]
    meta = {m["id"]: m for m in read_latest(str(out)).to_pylist()}
    ok = {i: m for i, m in meta.items() if m["status"] == "ok"}
    assert sorted(ok) == sorted(ids[:5]) and meta["bad"]["status"] == "failed"
    assert not (out / "videos").exists() and not (out / "contact").exists() and not (out / ".runs").exists()

    import fsspec

    fs = fsspec.filesystem("file")
    tars = check_dataset(fs, str(out), ok)
    assert len(tars) == 3  # 5 samples, at most 2 a shard
    stats = [json.loads((out / "shards" / (os.path.basename(t)[:-4] + ".json")).read_text()) for t in tars]
    assert sum(s["failed"] for s in stats) == 1 and all(s["code_version"] == ok["a1"]["code_version"] for s in stats)

    # the offsets in the metadata point at each sample (what the report and the export read)
    from operators.shards import read_sample

    assert read_sample(fs, ok["a.3"]["shard_uri"], ok["a.3"]["shard_offset"])["txt"].decode() == ok["a.3"]["prompt"]

    # the report plays every ok row: its links resolve to copies of the samples' videos (docs/job.md)
    page = (out / "report" / "index.html").read_text()
    links = re.findall(r"<video src='([^']+)'", page)
    assert sorted(links) == sorted(f"videos/{i}.mp4" for i in ok), links
    for i in ok:
        assert sha256_file(str(out / "report" / "videos" / f"{i}.mp4")) == ok[i]["sha256"]

    # webdataset
    import webdataset as wds

    got = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False).decode()}
    assert sorted(got) == sorted(i.replace(".", "%2E") for i in ok)
    assert got["a%2E3"]["json"]["id"] == "a.3" and got["a1"]["txt"] == ok["a1"]["prompt"]

    # Hugging Face datasets
    import datasets

    hf = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf"))
    hf = hf.cast_column("mp4", datasets.Video(decode=False))
    assert sorted(row["id"] for row in hf["json"]) == sorted(ok)
    assert {hashlib.sha256(v["bytes"]).hexdigest() for v in hf["mp4"]} == {m["sha256"] for m in ok.values()}

    # Ray Data (the stats .json files beside the tars are not samples: file_extensions)
    import ray

    ray.init(address=shared_ray, logging_level="ERROR")
    try:
        rows = ray.data.read_webdataset(str(out / "shards"), file_extensions=["tar"]).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["json"]["id"] for r in rows) == sorted(ok)

    # MLflow: the shard totals; the export of the config (every ok row passes clipsim >= -1) linked from the report
    from mlflow.tracking import MlflowClient

    (run,) = parent_runs(MlflowClient(f"sqlite:///{db}"), "wds")
    assert (run.data.metrics["shards"], run.data.metrics["shard_samples"]) == (3, 5)
    assert run.data.metrics["shard_bytes"] == sum(os.path.getsize(t) for t in tars)
    exported = run.data.tags["export_uri"]
    assert exported.startswith(f"file://{out}/filtered/") and run.data.metrics["export_rows"] == 5
    assert f"href='{exported}'" in (out / "report" / "index.html").read_text()

    # python -m jobs.export: a threshold between the scores keeps exactly the rows above it
    scores = sorted(m["clipsim"] for m in ok.values())
    cut = (scores[1] + scores[2]) / 2
    dest = tmp_path / "best"
    r = subprocess.run([os.path.join(os.path.dirname(job_cmd()[0]), "python"), "-m", "jobs.export", "--output",
                        str(out),
                        "--to", str(dest), "--min-clipsim", str(cut), "--shard-max-samples", "2"],
                       cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = {i: m for i, m in ok.items() if m["clipsim"] >= cut}
    assert len(kept) == 3
    exp_meta = {m["id"]: m for m in read_latest(str(dest)).to_pylist()}
    check_dataset(fs, str(dest), {i: {**m, "shard_uri": exp_meta[i]["shard_uri"]} for i, m in kept.items()})
    assert json.loads((dest / "export.json").read_text())["rows"] == 3
    assert not (dest / ".staging").exists()  # the export's local writes leave no empty staging folder
    # a threshold no row passes: exit 0, a dataset without rows, and a line that says so
    none = subprocess.run([os.path.join(os.path.dirname(job_cmd()[0]), "python"), "-m", "jobs.export", "--output",
                           str(out), "--to", str(tmp_path / "none"), "--min-clipsim", "2", "--format", "files"],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert none.returncode == 0 and "export: no row of the 5 ok rows passes" in none.stderr, none.stderr[-3000:]
    assert not (tmp_path / "none" / "videos").exists() and not glob.glob(str(tmp_path / "none" / "metadata" / "*"))
    again = subprocess.run([os.path.join(os.path.dirname(job_cmd()[0]), "python"), "-m", "jobs.export", "--output",
                            str(out),
                            "--to", str(dest)], cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a dataset" in again.stderr


@pytest.mark.integration
def test_killed_webdataset_run_leaves_no_partial_shard_and_no_duplicate(tmp_path, tiny_cache):
    """SIGKILL the driver while shards are being written, rerun: every sample once, in a committed shard; samples the
    killed run finished but never committed are packed by the rerun instead of being generated again."""
    n = 8
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"w{i}" for i in range(n)], "prompt": [f"prompt number {i}" for i in range(n)],
                             "seed": list(range(n))}), manifest)
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, compute={"batch_size": 1, "sampler_batch": 1},
                      defaults={"steps": 10}, output={"format": "webdataset", "shard_max_samples": 2},
                      scores={"enabled": False})  # scores in shards: the test above
    args = ["--config", cfg, "--manifest", str(manifest), "--output", str(out), "--mlflow-uri",
            mlflow_store(tmp_path / 'db')]
    # kill once a shard is committed and the next samples wait in scratch
    kill_job_when(args, lambda: bool(glob.glob(str(out / "metadata" / "part-*"))
                                     and glob.glob(str(out / ".runs" / "*" / "samples" / "*.parquet"))))
    first = read_parts(*filesystem(str(out)))
    assert first is not None and 0 < first.num_rows < n, "the first run was not interrupted mid-job"
    waiting = {os.path.basename(p)[: -len(".parquet")]
               for p in glob.glob(str(out / ".runs" / "*" / "samples" / "*.parquet"))}
    # a shard put by the killed driver that no metadata row names: an orphan the rerun removes
    orphan = out / "shards" / "20000101T000000-deadbeef-00000.tar"
    orphan.write_bytes(b"\0" * 1024)

    r = run_job(*args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not orphan.exists() and not (out / ".runs").exists()
    allrows = read_parts(*filesystem(str(out)))
    ids = allrows.column("id").to_pylist()
    assert sorted(ids) == [f"w{i}" for i in range(n)], "a row was committed twice or not at all"
    ok = {m["id"]: m for m in read_latest(str(out)).to_pylist()}
    import fsspec

    check_dataset(fsspec.filesystem("file"), str(out), ok)
    first_ids, first_run = set(first.column("id").to_pylist()), first.column("run_id")[0].as_py()
    # packed, not generated again: every sample left in scratch keeps the killed run's id (a worker of the killed run
    # may finish one more sample after the driver is gone: it is packed as well)
    salvaged = {i for i, m in ok.items() if m["run_id"] == first_run} - first_ids
    assert waiting - first_ids and waiting - first_ids <= salvaged, "no finished sample waited in scratch at the kill"
    assert f"packed {len(salvaged)} sample(s)" in r.stderr
    # the rows left after the salvage are what the progress line counts to (issue 29, item 9)
    left = re.search(r"(\d+) row\(s\) left to run after the salvage", r.stderr)
    assert left and f"progress: {left[1]}/{left[1]} rows" in r.stderr, r.stderr[-3000:]
    # the killed driver's MLflow run, left RUNNING, is marked KILLED by the rerun (which holds the output's lease)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'db'}")
    runs = {x.info.run_id: x.info.status for x in parent_runs(client, "ivmix-demo")}
    assert runs[first_run] == "KILLED" and sorted(runs.values()) == ["FINISHED", "KILLED"], runs
    assert "marked 1 MLflow run(s) of this output KILLED" in r.stderr


def test_newest_row_and_done_ids_in_arrow(tmp_path, monkeypatch):
    """`latest` keeps each id's newest row (checked against a plain-Python reference); `committed` counts a row done
    only when its shard or video is there; the plan skips done ids without resolving them."""
    from operators import metadata, resume

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = [("a", "failed", 1, None), ("a", "ok", 2, None), ("b", "ok", 1, "file:///x/shards/s-00000.tar"),
            ("c", "ok", 3, None), ("c", "failed", 5, metadata.WORKER_DIED + " (x)"),
            ("d", "ok", 1, "file:///x/shards/gone.tar")]
    table = pa.table({"id": [r[0] for r in rows], "status": [r[1] for r in rows],
                      "error": [r[3] if r[1] == "failed" else None for r in rows],
                      "finished_at": pa.array([t0 + dt.timedelta(seconds=r[2]) for r in rows],
                                              pa.timestamp("us", tz="UTC")),
                      "shard_uri": [r[3] if r[1] == "ok" else None for r in rows]})
    newest = {}
    for r in rows:
        if r[0] not in newest or r[2] > newest[r[0]][2]:
            newest[r[0]] = r
    got = metadata.latest(table)
    assert sorted(zip(got["id"].to_pylist(), got["status"].to_pylist())) == sorted((k, v[1]) for k, v in newest.items())

    root = tmp_path / "x"
    (root / "metadata").mkdir(parents=True)
    (root / "shards").mkdir()
    (root / "videos").mkdir()
    table = table.set_column(4, "shard_uri", pa.array([None if u is None else u.replace("/x/", f"{root}/") for u in
                                                       table["shard_uri"].to_pylist()], pa.string()))
    pq.write_table(table, root / "metadata" / "part-1.parquet")
    (root / "shards" / "s-00000.tar").write_bytes(b"")
    (root / "shards" / "s-00000.json").write_text('{"bytes": 0}')  # a committed shard has its stats
    (root / "videos" / "a.mp4").write_bytes(b"")
    import fsspec

    c = resume.committed(fsspec.filesystem("file"), str(root))
    assert sorted(c.done.to_pylist()) == ["a", "b"]  # d's shard is gone; c's newest row failed
    assert c.poisoned.to_pylist() == ["c"]

    # past the score table's cap, only the rows shown are read whole (resume.scan with the ids pushed down)
    from jobs import quality, report

    current = metadata.latest(resume.scan(fsspec.filesystem("file"), str(root), quality.AGGREGATE))
    pairs = pa.array([None, "p", "p", None], pa.string())
    current = current.set_column(current.schema.get_field_index("pair_id"), "pair_id", pairs)
    monkeypatch.setattr(quality, "SCORE_TABLE_ROWS", 2)
    monkeypatch.setattr(report, "MAX_ROWS", 3)
    assert sorted(quality.shown(current).to_pylist()) == ["a", "b", "d"]  # a, b by id; a, d (no pair), then b (pair p)
    detail = resume.scan(fsspec.filesystem("file"), str(root), quality.COLUMNS, ids=quality.shown(current))
    assert sorted(detail["id"].to_pylist()) == ["a", "a", "b", "d"] and "shard_uri" in detail.column_names

    from collections import Counter

    from jobs.setup import Manifest, duplicates, plan

    given = ["a", "b", "a", None, None, "c", "b", "a"]
    assert sorted(duplicates(pa.chunked_array([given[:3], given[3:]])).to_pylist()) == \
        sorted(k for k, v in Counter(x for x in given if x is not None).items() if v > 1)

    class Cfg:
        samplers, limit = None, None

    m = Manifest(5, pa.array(["b"], pa.string()), ("generation",), None, pa.chunked_array([["a", "b", "b", "e", None]]))
    p = plan(Cfg, m, c.done)
    assert p.keep.to_pylist() == [False, True, True, True, True] and p.pending == 4 and p.resolve_done  # b: duplicate


def test_a_shard_never_holds_more_than_its_max_samples(tmp_path):
    """output.shard_max_samples is a bound however the rows arrive: a batch of 3 ok rows reaching a shard that holds
    one already (with two actor calls at once, batches come back in any order) fills it to 2 and opens the next."""
    import fsspec

    from operators.metadata import MetadataWriter
    from operators.shards import ShardSink

    fs, root = fsspec.filesystem("file"), str(tmp_path)

    def rows(*ids: str) -> pa.Table:
        now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        return pa.table({"id": list(ids), "status": ["ok"] * len(ids), "bytes": pa.array([3] * len(ids), pa.int64()),
                         "prompt": [f"prompt {i}" for i in ids],
                         "finished_at": pa.array([now] * len(ids), pa.timestamp("us", tz="UTC"))})

    sink = ShardSink(fs, root, MetadataWriter(fs, root, "t"), "t", lambda row: {"mp4": b"mp4"}, code_version="x",
                     max_bytes=10**9, max_samples=2, max_seconds=3600)
    sink.add(rows("a"))
    sink.add(rows("b", "c", "d"))
    sink.add(rows("e"))
    sink.close()
    shards = sorted(glob.glob(os.path.join(root, "shards", "*.tar")))
    held = [sorted(m.name.split(".")[0] for m in tarfile.open(s) if m.name.endswith(".json")) for s in shards]
    assert held == [["a", "b"], ["c", "d"], ["e"]]
    meta = {m["id"]: m["shard_uri"] for m in read_latest(root).to_pylist()}
    assert sorted(meta) == ["a", "b", "c", "d", "e"] and len(set(meta.values())) == 3
