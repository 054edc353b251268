"""Damage from outside (docs/reliability.md "Damage from outside"): a metadata part, a shard, a shard's stats or a
video cut or garbled by another tool is found by the next run (its size against what was committed), set aside into
`_corrupt/` with one warning naming it, and its rows are generated again; `python -m jobs.verify` reads everything
once and finds the same damage, and same-length bit rot that sizes cannot show. Local folders and the moto S3 server."""
from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import verify
from operators import integrity, lease, metadata, resume, shards
from operators.layout import Layout
from operators.metadata import read_latest
from operators.storage import filesystem

from .jobutil import job_env, parent_runs, run_job, s3_bucket, tiny_config
from .test_dataset import check_dataset

FILES, WDS = "files", "webdataset"


def _cut(fs, path: str, keep: int | None = None) -> None:
    """Leave the first half of an object (or its first `keep` bytes), as a broken copy does."""
    data = fs.cat_file(path)
    fs.pipe_file(path, data[: len(data) // 2 if keep is None else keep])


def _flip(fs, path: str, at: int) -> None:
    """One byte changed, the length kept (bit rot)."""
    data = bytearray(fs.cat_file(path))
    data[at] ^= 0xFF
    fs.pipe_file(path, bytes(data))


# ---- an output written by the project's writers, media of random bytes (no model: the storage layer alone) ----------
def _row(rid: str, data: bytes, **extra) -> dict:
    return {"id": rid, "status": "ok", "prompt": f"prompt {rid}", "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "finished_at": metadata.now(), **extra}


def _output(tmp_path, fmt: str) -> tuple[object, str, dict[str, list[str]]]:
    """Six ok rows in three metadata parts (two rows each); webdataset: one shard per part. Returns (fs, root, the
    ids of each part in order)."""
    fs, root = filesystem(str(tmp_path / f"out-{fmt}"))
    layout = Layout(root)
    writer = metadata.MetadataWriter(fs, root, "t")
    groups = [[f"v{2 * i}", f"v{2 * i + 1}"] for i in range(3)]
    for i, ids in enumerate(groups):
        media = {rid: os.urandom(3000 + 100 * int(rid[1:])) for rid in ids}
        rows = [_row(rid, media[rid]) for rid in ids]
        if fmt == FILES:
            for rid in ids:
                fs.makedirs(layout.videos, exist_ok=True)
                fs.pipe_file(layout.video(rid), media[rid])
        else:
            uri, offsets, _ = shards.pack(fs, root, f"t-{i:05d}", rows, lambda r: {"mp4": media[r["id"]]}, failed=0,
                                          code_version="test")
            rows = [{**r, "shard_uri": uri, "shard_offset": o} for r, o in zip(rows, offsets)]
        writer.add(metadata.to_table(rows))
        writer.flush()
    return fs, root, {"parts": metadata.part_paths(fs, root), "ids": groups}


def _verify(root: str, *flags: str, capsys) -> tuple[int, str]:
    code = verify.main(["--output", root, *flags])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("fmt", [FILES, WDS])
def test_an_intact_output_passes_both_checks(tmp_path, fmt, capsys):
    fs, root, made = _output(tmp_path, fmt)
    found = resume.committed(fs, root)
    assert sorted(found.done.to_pylist()) == sorted(i for g in made["ids"] for i in g) and found.damage == ()
    code, out = _verify(root, capsys=capsys)
    assert code == 0, out
    objects = "3 shard(s) and 0 video(s)" if fmt == WDS else "0 shard(s) and 6 video(s)"
    assert f"verified 3 metadata part(s), {objects}" in out and "0 damaged, 0 missing" in out


@pytest.mark.parametrize("fmt", [FILES, WDS])
def test_cut_and_garbled_objects_are_found_by_size_set_aside_and_not_done(tmp_path, fmt, capsys):
    fs, root, made = _output(tmp_path, fmt)
    layout, (g0, g1, g2) = Layout(root), made["ids"]
    _cut(fs, made["parts"][0])
    if fmt == FILES:
        _cut(fs, layout.video(g1[0]))
        damaged = {made["parts"][0]: "metadata part", layout.video(g1[0]): "video"}
        lost = {*g0, g1[0]}
    else:
        _cut(fs, layout.shard("t-00001"), keep=5000)
        fs.pipe_file(layout.shard_stats("t-00002"), b'{"shard": "t-00002.tar", "bytes": 12')
        damaged = {made["parts"][0]: "metadata part", **{layout.shard(f"t-0000{i}"): "shard" for i in (1, 2)}}
        lost = {*g0, *g1, *g2}

    found = resume.committed(fs, root)
    assert {d.path: d.what for d in found.damage} == damaged
    assert set(found.done.to_pylist()) == {*g0, *g1, *g2} - lost
    code, out = _verify(root, capsys=capsys)
    assert code == 1 and all(fs.unstrip_protocol(p) in out for p in damaged), out
    assert f"{len(damaged)} damaged, 0 missing" in out

    moved = integrity.set_aside(fs, root, found.damage)
    for path in damaged:
        assert not fs.exists(path) and fs.exists(integrity.aside(path))
    if fmt == WDS:
        assert fs.exists(integrity.aside(layout.shard_stats("t-00002")))
    assert len(moved) == len(damaged) + (2 if fmt == WDS else 0)
    after = resume.committed(fs, root)  # what is left is whole; the lost rows are simply not done
    assert after.damage == () and set(after.done.to_pylist()) == {*g0, *g1, *g2} - lost


@pytest.mark.parametrize("fmt", [FILES, WDS])
def test_same_length_bit_rot_is_found_by_verify_and_repaired(tmp_path, fmt, capsys):
    fs, root, made = _output(tmp_path, fmt)
    layout, rid = Layout(root), made["ids"][1][1]
    target = layout.video(rid) if fmt == FILES else layout.shard("t-00001")
    _flip(fs, target, 2000)  # inside the video (files) / inside the first sample's mp4 (a shard)
    assert resume.committed(fs, root).damage == ()  # sizes cannot show it
    code, out = _verify(root, capsys=capsys)
    assert code == 1 and fs.unstrip_protocol(target) in out and "SHA-256 differs" in out, out

    code, out = _verify(root, "--repair", capsys=capsys)
    assert code == 1 and "set aside 1 object(s)" in out
    assert not fs.exists(target) and fs.exists(integrity.aside(target))
    lost = {rid} if fmt == FILES else set(made["ids"][1])
    assert not lost & set(resume.committed(fs, root).done.to_pylist())
    code, out = _verify(root, capsys=capsys)  # what is gone is reported missing until a run makes it again
    assert code == 1 and "0 damaged" in out and "1 missing" in out, out


def test_repair_refuses_while_a_run_holds_the_output(tmp_path, capsys):
    fs, root, made = _output(tmp_path, FILES)
    _cut(fs, Layout(root).video("v0"))
    held = lease.Lease(fs, root, "night", ttl_s=300).acquire()
    try:
        code = verify.main(["--output", root, "--repair"])
    finally:
        held.release()
    assert code == 2 and "another run is writing" in capsys.readouterr().err
    assert fs.exists(Layout(root).video("v0"))


def test_a_part_whose_footer_reads_but_whose_columns_do_not_is_damaged(tmp_path):
    fs, root, made = _output(tmp_path, FILES)
    path = made["parts"][1]
    data = bytearray(fs.cat_file(path))
    data[4:200] = os.urandom(196)  # the column pages, footer untouched
    fs.pipe_file(path, bytes(data))
    pq.read_metadata(path)  # the footer still opens
    assert [d.path for d in integrity.part_damage(fs, [path])] == [path]


def test_a_daily_fraction_checks_every_object_once_per_cycle():
    names = [f"shard-{i:05d}" for i in range(500)]
    for fraction, days in ((1 / 7, 7), (0.25, 4), (1.0, 1)):
        seen = [n for day in range(737000, 737000 + days) for n in names if verify.chosen(n, fraction, day)]
        assert sorted(seen) == names  # each object exactly once over the cycle
    per_day = [sum(verify.chosen(n, 1 / 7, d) for n in names) for d in range(7)]
    assert min(per_day) > 40 and max(per_day) < 110  # about a seventh each night


# ---- the real job: a damaged output is regenerated by the next run -------------------------------------------------
TINY = {"steps": 2, "frames": 4, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """One SQLite store for the module's runs (its schema is made once); each test reads its newest run."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _damage(fs, root: str, fmt: str, ids: list[str]) -> dict[str, str]:
    """The issue's cases on a real run's output: a cut metadata part, a cut video (files) or a cut shard and an
    unparsable stats file (webdataset). Returns {object path: what}."""
    layout = Layout(root)
    parts = metadata.part_paths(fs, root)
    first = pq.read_table(fs.open(parts[0], "rb")).column("id").to_pylist()
    _cut(fs, parts[0])
    if fmt == FILES:
        victim = next(i for i in ids if i not in first)
        _cut(fs, layout.video(victim))
        return {parts[0]: "metadata part", layout.video(victim): "video"}
    names = sorted(p.rsplit("/", 1)[1][: -len(".tar")] for p in fs.ls(layout.shards, detail=False)
                   if p.endswith(".tar"))
    _cut(fs, layout.shard(names[1]), keep=5000)
    fs.pipe_file(layout.shard_stats(names[2]), b"{not json")
    return {parts[0]: "metadata part", layout.shard(names[1]): "shard", layout.shard(names[2]): "shard"}


@pytest.mark.integration
@pytest.mark.parametrize("store,fmt", [("local", FILES), ("s3", WDS),  # the other two: make test-all (the unit tests
                                       # above cover both formats' checks on a local folder)
                                       pytest.param("local", WDS, marks=pytest.mark.slow),
                                       pytest.param("s3", FILES, marks=pytest.mark.slow)])
def test_the_next_run_regenerates_what_was_damaged(store, fmt, tmp_path, tiny_ad_dir, shared_ray, mlflow_db, request,
                                                   monkeypatch, capsys):
    ids = ["d0", "d1", "d2"]
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ids, "prompt": [f"a lamp number {i}" for i in range(3)], "seed": [0, 1, 2]}),
                   manifest)
    cfg = tiny_config(tmp_path / "job.yaml", os.path.dirname(tiny_ad_dir), defaults=TINY, scores={"enabled": False},
                      compute={"batch_size": 1, "sampler_batch": 1}, commit={"every_rows": 1, "every_seconds": 1},
                      output={"format": fmt, "shard_max_samples": 1})
    env = job_env()
    if store == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        s3_bucket(endpoint, f"damage-{fmt}", monkeypatch)
        out = f"s3://damage-{fmt}/run"
        # and Ray's own Parquet read of the manifest from S3, as for a manifest too big for the driver to hold
        # (docs/job.md "Resume"); the local case hands the driver's rows to Ray Data
        env = job_env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", IVMIX_PLAN_IN_DRIVER_ROWS="0")
    else:
        out = str(tmp_path / "out")
    db = mlflow_db
    args = ("--config", cfg, "--manifest", manifest, "--output", out, "--mlflow-uri", db)
    first = run_job(*args, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    fs, root = filesystem(out)
    fs.invalidate_cache()  # the job wrote through another process
    damaged = _damage(fs, root, fmt, ids)

    code, found = _verify(out, capsys=capsys)
    assert code == 1 and f"{len(damaged)} damaged" in found and all(fs.unstrip_protocol(p) in found for p in damaged)

    with open(cfg) as f:
        text = f.read()
    with open(cfg, "w") as f:
        f.write(text + "verify: {fraction: 1.0}\n")  # the nightly check after the run: everything, here
    second = run_job(*args, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    fs.invalidate_cache()
    warnings = [line for line in second.stderr.splitlines() if "WARNING operators.integrity" in line]
    for path in damaged:  # one warning naming each damaged object
        rel = os.path.relpath(path, root)
        assert sum(rel in line for line in warnings) == 1, (rel, warnings)
        assert fs.exists(integrity.aside(path)) and (damaged[path] == "video" or not fs.exists(path))
    latest = read_latest(out).to_pylist()
    assert sorted(r["id"] for r in latest) == ids and all(r["status"] == "ok" for r in latest)
    if fmt == FILES:
        for r in latest:  # one readable video per id, the one its newest row committed
            assert hashlib.sha256(fs.cat_file(Layout(root).video(r["id"]))).hexdigest() == r["sha256"]
    else:
        check_dataset(fs, root, {r["id"]: r for r in latest})  # each id once, in a whole shard

    code, found = _verify(out, capsys=capsys)
    assert code == 0 and "0 damaged, 0 missing" in found, found
    import mlflow

    tags = parent_runs(mlflow.tracking.MlflowClient(db), "ivmix-demo")[0].data.tags
    assert tags["verify_damaged"] == "0" and tags["verify_missing"] == "0" and tags["verify_objects"] == str(
        len(ids) if fmt == FILES else 3)
    assert tags["verify_fraction"] == "1.0"
