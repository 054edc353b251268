"""The batch job end to end on a local Ray with tiny models: outputs, metadata, MLflow, bad input, resume."""
import glob
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.generate import main as job_main
from operators.metadata import read_latest, read_parts
from operators.storage import filesystem
from pipelines.video import read_mp4

from .jobutil import ROOT, job_env, kill_job_when, mlflow_store, parent_runs, run_job, sha256_file, tiny_config


@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
def test_job_end_to_end(tmp_path, tiny_cache):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "id": ["r1", "r2", "r3", "r4", "../../etc", None, "r7"],
        "prompt": ["Two horses race across a field.", "A red kite over a beach.", "Snow on a quiet street.",
                   "A lantern in the sky.", "Hostile id row.", "A row without an id.", None],
        "sampler": [None, "standard", "ivmixed_ad_v1", None, None, None, None],
        "seed": pa.array([1, 5, None, 2, 3, 4, 5], pa.int64()),
        "guidance": pa.array([None, 3.0, None, None, None, None, None], pa.float64()),
        "frames": pa.array([None, None, 4, None, None, None, None], pa.int32()),
        "height": pa.array([None, None, 32, 65, None, None, None], pa.int64()),
        "idm_guidance": [None, None, "6,2,7", None, None, None, None],
        "interval": [None, None, "0..2", None, None, None, None],
        "category": ["animal", "scenery", "scenery", "object", "x", "y", "z"],
        # clashes with a metadata column: passed through renamed
        "status": ["kept", None, None, None, None, None, None],
    }), manifest)
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    # a video uploaded by a killed run but never committed (in no metadata part): regenerated to the same key
    # (docs/job.md "Resume")
    (out / "videos").mkdir(parents=True)
    (out / "videos" / "r1.mp4").write_bytes(b"stale upload from a killed run")
    # two actors share the run (one row per actor call, so that both get rows): 2 x 0.5 CPU + the 1 CPU the capacity
    # check keeps for read tasks; Ray Data hands out rows once both actors are up (its own setting), or the first one
    # up could take all 7
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache,
                      compute={"num_actors": 2, "cpus_per_actor": 0.5, "batch_size": 1})
    r = run_job("--config", cfg, "--manifest", str(manifest), "--output", str(out), "--mlflow-uri", f"sqlite:///{db}",
                "--experiment", "e2e", env=job_env(RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "progress: 7/7 rows (4 ok, 3 failed)" in r.stderr

    meta = read_latest(str(out)).to_pylist()
    by_id = {m["id"]: m for m in meta}
    ok = sorted(i for i, m in by_id.items() if m["status"] == "ok")
    derived = [i for i in ok if i.startswith("h")]
    assert ok == sorted(["r1", "r2", "r3", *derived]) and len(derived) == 1
    workers = {by_id[i]["worker"] for i in ok}  # host:pid of the actor that made each video
    assert len(workers) == 2 and all(w.rsplit(":",
                                              1)[1].isdigit() and int(w.rsplit(":",
                                                                               1)[1]) != os.getpid() for w in workers)
    failed = {i: m["error"] for i, m in by_id.items() if m["status"] == "failed"}
    assert failed["r4"].startswith("height:") and "multiple of the VAE factor 8" in failed["r4"]
    assert failed["r7"].startswith("prompt:")
    hostile = [e for i, e in failed.items() if i.startswith("invalid-")]
    assert len(hostile) == 1 and hostile[0].startswith("id:")

    # docs/datasets.md "Reading a finished run": files output read with Hugging Face datasets through the metadata
    import datasets

    hf = datasets.Dataset(read_latest(str(out))).filter(lambda r: r["status"] == "ok")
    assert sorted(hf["id"]) == ok and all(u.endswith(f"/videos/{i}.mp4") for i, u in zip(hf["id"], hf["video_uri"]))

    # videos: exactly the ok rows (r1's stale upload replaced, no second copy), decodable, with each row's frames and
    # size
    assert sorted(os.listdir(out / "videos")) == sorted(f"{i}.mp4" for i in ok)
    for i in ok:
        m = by_id[i]
        frames, fps = read_mp4(str(out / "videos" / f"{i}.mp4"))
        assert frames.shape == (m["frames"], m["height"], m["width"], 3) and fps == m["fps"]
        assert m["sha256"] == sha256_file(str(out / "videos" / f"{i}.mp4"))
        assert m["bytes"] == os.path.getsize(out / "videos" / f"{i}.mp4")
        assert m["video_uri"] == f"file://{out}/videos/{i}.mp4"
        assert m["run_id"] and m["code_version"].startswith("0.1.0+") and m["seconds"] > 0
        assert m["nfe"] == 2 * m["model_calls"] == 2 * (m["calls_idm"] + m["calls_vdm"])
    # per-row overrides and job defaults resolved as documented
    assert (by_id["r1"]["sampler"], by_id["r1"]["steps"], by_id["r1"]["model_calls"]) == ("ivmixed", 6, 6 + 4 * 5)
    assert (by_id["r2"]["sampler"], by_id["r2"]["guidance"], by_id["r2"]["model_calls"]) == ("standard", 3.0, 6)
    assert (by_id["r3"]["variant"], by_id["r3"]["frames"], by_id["r3"]["height"], by_id["r3"]["idm_guidance"],
            by_id["r3"]["interval"], by_id["r3"]["seed"]) == (
        "down:IV-IV@labels=legacy_ad", 4, 32, "karras(6,2,7)", "0..2", 23523)
    assert by_id["r3"]["model_calls"] == 6 + 4 * 3
    assert by_id["r1"]["category"] == "animal" and by_id["r1"]["manifest_status"] == "kept"
    # nothing outside the output prefix, nothing left half-written
    assert not (tmp_path / "etc").exists() and not (out / ".staging").exists()
    # MLflow's artifacts sit beside its SQLite file (mlartifacts/), never in the current folder
    assert sorted(os.listdir(tmp_path)) == sorted(["m.parquet", "out", "mlflow.db", "job.yaml", "mlartifacts"])

    # MLflow: one run with the resolved config, tags, metrics and artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = parent_runs(client, "e2e")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["rows_ok"] == 4 and run.data.metrics["rows_failed"] == 3
    # ivmixed 6 steps: 6 + 4 x 5 calls (r1 and the derived-id row), standard 6 (r2), ivmixed_ad_v1 interval 0..2:
    # 6 + 4 x 3
    assert run.data.metrics["nfe_per_video"] == 2 * (26 + 6 + 18 + 26) / 4 == sum(by_id[i]["nfe"] for i in ok) / 4
    assert run.data.metrics["videos_per_hour"] > 0
    assert run.data.params["defaults.steps"] == "6" and run.data.params["model.backbone"] == "animatediff"
    assert run.data.tags["manifest"] == str(manifest) and run.data.tags["ray_submission_id"] == "local"
    assert run.info.run_id == by_id["r1"]["run_id"]
    arts = ({a.path for a in client.list_artifacts(run.info.run_id, "config")}
            | {a.path for a in client.list_artifacts(run.info.run_id, "metadata")})
    assert arts == {"config/job_config.yaml", "metadata/metadata.parquet"}
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    tags = run.data.tags
    assert (tags["git_sha"], tags["code_version"], tags["backbone"], tags["job_status"]) == (
        head or "unknown", by_id["r1"]["code_version"], "animatediff", "FINISHED")
    metrics = run.data.metrics
    assert metrics["seconds_per_video"] == pytest.approx(sum(by_id[i]["seconds"] for i in ok) / 4, rel=1e-6)
    # one actor: the rows ran one after another
    assert metrics["elapsed_seconds"] >= sum(by_id[i]["seconds"] for i in ok)

    # docs/job.md "Exit status": --fail-on-error exits 1 when a row failed; the committed rows are not generated again
    r = run_job("--config", cfg, "--manifest", str(manifest), "--output", str(out), "--mlflow-uri", f"sqlite:///{db}",
                "--experiment", "e2e", "--fail-on-error")
    assert r.returncode == 1 and "progress: 3/3 rows (0 ok, 3 failed)" in r.stderr, r.stderr[-3000:]
    assert sorted(os.listdir(out / "videos")) == sorted(f"{i}.mp4" for i in ok)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("prompt\nA cat\n"), "not readable as Parquet"),
    (lambda p: pq.write_table(pa.table({"text": ["a"]}), p), "no 'prompt' column"),
    (lambda p: pq.write_table(pa.table({"prompt": ["a"], "steps": ["5"]}), p), "column 'steps' has type string"),
    (lambda p: pq.write_table(pa.table({"prompt": ["a"], "image_model": ["/x"]}), p), "job config only"),
])
def test_bad_manifests_fail_before_anything_is_written(tmp_path, tiny_cache, make, message, capsys):
    manifest = tmp_path / "m.parquet"
    make(manifest)
    out = tmp_path / "out"
    rc = job_main(["--config", tiny_config(tmp_path / "job.yaml", tiny_cache), "--manifest", str(manifest),
                   "--output", str(out), "--mlflow-uri", f"sqlite:///{tmp_path / 'db.sqlite'}"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert not out.exists() and not (tmp_path / "db.sqlite").exists()


@pytest.mark.parametrize("yaml_extra, message", [
    ({"compute": {"num_actor": 2}}, "unknown key"),
    ({"defaults": {"height": 65}}, "height"),
    ({"defaults": {"stepz": 4}}, "unknown key"),
    ({"bogus": 1}, "unknown top-level"),
])
def test_bad_configs_fail_with_the_key(tmp_path, tiny_cache, yaml_extra, message, capsys):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["a"]}), manifest)
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, **yaml_extra)
    rc = job_main(["--config", cfg, "--manifest", str(manifest), "--output", str(tmp_path / "out")])
    assert rc == 2 and message in capsys.readouterr().err


@pytest.mark.integration
# make test runs the same kill and rerun with webdataset output (test_dataset.py); this is files output
@pytest.mark.slow
def test_killed_job_resumes_exactly_once(tmp_path, tiny_cache):
    """Kill the driver (and its local Ray) mid-run, rerun: one video per row, committed rows not redone."""
    n = 10
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"v{i:02d}" for i in range(n)], "prompt": [f"prompt number {i}" for i in range(n)],
                             "seed": list(range(n))}), manifest)
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, compute={"batch_size": 1, "sampler_batch": 1},
                      defaults={"steps": 12}, commit={"every_rows": 1, "every_seconds": 1})
    args = ["--config", cfg, "--manifest", str(manifest), "--output", str(out), "--mlflow-uri",
            mlflow_store(tmp_path / 'db')]
    fs, root = filesystem(str(out))
    kill_job_when(args, lambda: len(glob.glob(str(out / "metadata" / "part-*"))) >= 2, poll=0.1)
    first = read_parts(fs, root)
    assert first is not None, "the first run committed nothing before the kill"
    committed = set(first.column("id").to_pylist())
    assert 0 < len(committed) < n, f"the first run was not interrupted mid-job ({len(committed)} of {n} committed)"

    r = run_job(*args)
    assert r.returncode == 0, r.stderr[-4000:]
    allrows = read_parts(fs, root)
    ids = allrows.column("id").to_pylist()
    assert sorted(set(ids)) == [f"v{i:02d}" for i in range(n)]
    assert all(ids.count(i) == 1 for i in set(ids)), "a row was committed twice"
    assert sorted(os.listdir(out / "videos")) == [f"v{i:02d}.mp4" for i in range(n)]
    assert not (out / ".staging").exists()
    for m in read_latest(str(out)).to_pylist():
        assert m["status"] == "ok" and m["sha256"] == sha256_file(str(out / "videos" / f"{m['id']}.mp4"))
    assert f"{n - len(committed)}/{n - len(committed)} rows" in r.stderr  # the rerun did only what was missing

    # a third run finds nothing to do, and says so without starting Ray
    r = run_job(*args)
    assert (r.returncode == 0 and "nothing to do: every row is committed ok" in r.stderr
            and "starting Ray" not in r.stderr)
    assert read_parts(fs, root).num_rows == n


def test_capacity_check_refuses_pools_that_cannot_run(caplog):
    from jobs.config import ComputeConfig
    from jobs.pipeline import check_capacity

    check_capacity(ComputeConfig(num_actors=1, cpus_per_actor=1), {"CPU": 2}, "cpu")
    with pytest.raises(ValueError, match="reading the manifest"):
        check_capacity(ComputeConfig(num_actors=2, cpus_per_actor=1), {"CPU": 2}, "cpu")  # silent hang otherwise
    with pytest.raises(ValueError, match="reading the manifest"):
        check_capacity(ComputeConfig(num_actors=2, cpus_per_actor=0.75), {"CPU": 2}, "cpu")  # seen hanging too
    check_capacity(ComputeConfig(num_actors=2, cpus_per_actor=0.5), {"CPU": 2}, "cpu")
    with pytest.raises(ValueError, match="GPUs"):
        check_capacity(ComputeConfig(num_actors=4, cpus_per_actor=1), {"CPU": 64, "GPU": 2}, "cuda")
    # an autoscaling cluster may start with no GPU workers at all: warn, don't refuse
    with caplog.at_level("WARNING", logger="jobs.generate"):
        check_capacity(ComputeConfig(num_actors=4, cpus_per_actor=1, autoscaling=True), {"CPU": 1}, "cuda")
    assert "cluster is smaller than the pool right now (autoscaling expected)" in caplog.text and "GPU" in caplog.text


@pytest.mark.integration
@pytest.mark.usefixtures("shared_ray")
def test_a_pool_that_cannot_run_exits_2_before_anything_is_written(tmp_path, tiny_cache):
    """docs/job.md "Config": exit 2 for a pool the cluster cannot hold (64 one-CPU actors on this machine's Ray),
    through the real job, before a video or a metadata part exists."""
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": ["A red kite over a beach."]}), manifest)
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    cfg = tiny_config(tmp_path / "job.yaml", tiny_cache, compute={"num_actors": 64, "cpus_per_actor": 1})
    r = run_job("--config", cfg, "--manifest", str(manifest), "--output", str(out), "--mlflow-uri", mlflow_store(db))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "compute: 64 actors x 1 CPU leave less than" in r.stderr
    assert not (out / "videos").exists() and not (out / "metadata").exists()

