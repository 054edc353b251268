"""WebDataset output (docs/datasets.md "WebDataset shards"): ok rows packed into tar shards
`OUTPUT/shards/{run}-{nnnnn}.tar`.

A sample is the row's members in the WebDataset naming convention, one after another in the tar: `<key>.json` (every
metadata field of the row), `<key>.mp4`, `<key>.txt` (the prompt; a BIVDiff row's `vdm_prompt`) and optionally
`<key>.png` (its contact sheet). `<key>` is the row id with each '.' written `%2E` (WebDataset cuts the key at the first
dot of a member name).

Commit order, so that nothing half-written is ever visible as done: a worker writes its finished sample to this
run's scratch (`OUTPUT/.runs/<run>/samples/`); the driver packs full shards from there (`ShardSink`), puts each tar
whole (one PUT, or a rename on a local disk), writes its stats `shards/{shard}.json`, and only then commits the rows'
metadata with `shard_uri` and `shard_offset` (the byte offset of the sample's first tar header). A shard that no
metadata row names (a driver killed between the PUT and the commit) is removed by the next run on the prefix
(`remove_orphans`), and the samples it held are packed again from the scratch they still sit in (`salvage`).
"""
from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import io
import json
import logging
import os
import posixpath
import tarfile
import tempfile
import time
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from . import integrity, metadata, storage
from .layout import Layout, shard_name

logger = logging.getLogger(__name__)
MEMBERS = ("json", "mp4", "txt", "png")  # in this order inside a sample


def sample_key(rid: str) -> str:
    return rid.replace(".", "%2E")


def row_json(row: Mapping[str, Any]) -> bytes:
    """A row's metadata as the sample's `json` member (timestamps in ISO 8601)."""
    return json.dumps({k: v for k, v in row.items() if k not in ("shard_uri", "shard_offset")}, sort_keys=True,
                      default=lambda v: v.isoformat() if isinstance(v, (dt.datetime, dt.date)) else str(v)
                      ).encode()


def _member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes], float]]) -> list[int]:
    """Write (key, {ext: bytes}, mtime) samples into a local tar; returns each sample's byte offset."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members, mtime in samples:
            offsets.append(tar.offset)
            for ext in MEMBERS:
                if members.get(ext) is not None:
                    _member(tar, f"{key}.{ext}", members[ext], mtime)
    return offsets


def read_sample(fs, shard: str, offset: int) -> dict[str, bytes]:
    """The members of the sample that starts at `offset` in a shard ({ext: bytes}), read without the rest of it."""
    out: dict[str, bytes] = {}
    key = None
    with fs.open(shard, "rb") as f:
        f.seek(offset)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                k, _, ext = posixpath.basename(info.name).partition(".")
                if key is not None and k != key:
                    break
                key = k
                out[ext] = tar.extractfile(info).read()
    return out


def pack(fs, root: str, name: str, rows: list[dict], members: Callable[[dict], dict[str, bytes]], *, failed: int,
         code_version: str) -> tuple[str, list[int], dict]:
    """Pack `rows` (ok metadata rows) into `shards/{name}.tar`, put it whole, then write its stats next to it.
    `members(row)` gives a row's mp4 (and png) bytes. Returns (shard uri, sample offsets, stats)."""
    start = time.perf_counter()
    samples = []
    for row in rows:
        files = members(row)
        stamp = row.get("finished_at")
        caption = row.get("prompt") or row.get("vdm_prompt") or ""  # a BIVDiff row's caption is its VDM prompt
        samples.append((sample_key(row["id"]), {"json": row_json(row), "txt": caption.encode(), **files},
                        stamp.timestamp() if isinstance(stamp, dt.datetime) else time.time()))
    layout = Layout(root)
    dest = layout.shard(name)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"{name}.tar")
        offsets = write_tar(local, samples)
        size = os.path.getsize(local)
        digest = storage.sha256_file(local)
        storage.put_file(fs, local, dest, root)
    finished = [r["finished_at"] for r in rows if isinstance(r.get("finished_at"), dt.datetime)]
    stats = {"shard": f"{name}.tar", "uri": storage.full_uri(fs, dest), "samples": len(rows), "ok": len(rows),
             "failed": failed, "bytes": size, "sha256": digest, "video_bytes": sum(r.get("bytes") or 0 for r in rows),
             "seconds": round(sum(r.get("seconds") or 0.0 for r in rows), 3),
             "pack_seconds": round(time.perf_counter() - start, 3), "code_version": code_version,
             "run_ids": sorted({r.get("run_id") or "" for r in rows}),
             "members": [m for m in MEMBERS if m in samples[0][1]],
             "first_finished_at": min(finished).isoformat() if finished else None,
             "last_finished_at": max(finished).isoformat() if finished else None,
             "written_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.put_bytes(fs, json.dumps(stats, indent=1).encode(), layout.shard_stats(name), root)
    return stats["uri"], offsets, stats


def scratch_members(fs, scratch: Callable[[str], Layout], contact: bool) -> Callable[[dict], dict[str, bytes]]:
    """A finished sample's media from the scratch `scratch(id)` (the layout of the run) its worker left it in."""
    def read(row: dict) -> dict[str, bytes]:
        video, sheet = (scratch(row["id"]).sample(row["id"], ext) for ext in ("mp4", "png"))
        out = {"mp4": storage.with_retries(lambda: fs.cat_file(video), f"read {video}")}
        if contact and fs.exists(sheet):
            out["png"] = fs.cat_file(sheet)
        return out
    return read


class ShardSink:
    """The driver's side of webdataset output: failed rows go straight to the metadata writer; ok rows wait until
    their shard is full (`max_bytes` of video, `max_samples` rows, or `max_seconds` since its first row), are packed
    in a background thread, and are committed (with `shard_uri` / `shard_offset`) once the shard is put. `poll()`
    commits what has been packed; `close()` packs the rest and waits. Commits happen on the caller's thread only."""

    def __init__(self, fs, root: str, writer, tag: str, members: Callable[[dict], dict[str, bytes]], *,
                 code_version: str, max_bytes: int, max_samples: int, max_seconds: float,
                 after_commit: Callable[[list[dict]], None] | None = None):
        self.fs, self.root, self.writer, self.tag, self.members = fs, root, writer, tag, members
        self.code_version = code_version
        self.max_bytes, self.max_samples, self.max_seconds = max_bytes, max_samples, max_seconds
        self.after_commit = after_commit
        self.tables: list[pa.Table] = []  # the open shard's ok rows
        self.samples = self.bytes = self.failed = 0
        self.opened = None
        self.seq = 0
        self.inflight: list[tuple[cf.Future, pa.Table]] = []
        self.pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-pack")
        self.stats: list[dict] = []

    def add(self, table: pa.Table) -> None:
        ok = pc.equal(table["status"], "ok")
        failed = table.filter(pc.invert(ok))
        self.writer.add(failed)
        self.failed += failed.num_rows
        good = table.filter(ok)
        while good.num_rows:  # never more than max_samples in a shard, however the rows arrive
            part, good = good.slice(0, self.max_samples - self.samples), good.slice(self.max_samples - self.samples)
            self.opened = self.opened or time.monotonic()
            self.tables.append(part)
            self.samples += part.num_rows
            self.bytes += pc.sum(part["bytes"]).as_py() or 0
            if good.num_rows:
                self.cut()
        if self.samples and (self.samples >= self.max_samples or self.bytes >= self.max_bytes
                             or time.monotonic() - self.opened >= self.max_seconds):
            self.cut()
        self.poll()

    def cut(self) -> None:
        """Send the open shard to packing."""
        if not self.samples:
            return
        name = f"{self.tag}-{self.seq:05d}"
        self.seq += 1
        table = pa.concat_tables(self.tables, promote_options="permissive")
        future = self.pool.submit(pack, self.fs, self.root, name, table.to_pylist(), self.members,
                                  failed=self.failed, code_version=self.code_version)
        self.inflight.append((future, table))
        self.tables, self.opened = [], None
        self.samples = self.bytes = self.failed = 0

    def poll(self, wait: bool = False) -> None:
        """Commit the rows of every packed shard (all of them with `wait`). A shard that could not be written leaves
        its rows uncommitted (they stay in scratch; the next run packs them) and raises."""
        keep = []
        for future, table in self.inflight:
            if not (wait or future.done()):
                keep.append((future, table))
                continue
            uri, offsets, stats = future.result()
            cols = table.drop_columns([c for c in ("shard_uri", "shard_offset") if c in table.column_names])
            cols = cols.append_column(pa.field("shard_uri", pa.string()),
                                      pa.array([uri] * table.num_rows, pa.string()))
            cols = cols.append_column(pa.field("shard_offset", pa.int64()), pa.array(offsets, pa.int64()))
            self.writer.add(cols)
            self.writer.flush()  # the shard's commit marker
            self.stats.append(stats)
            logger.info("shard %s: %d samples, %.1f MB", stats["shard"], stats["samples"], stats["bytes"] / 1e6)
            if self.after_commit:
                self.after_commit(table.select(["id"]).to_pylist())
        self.inflight = keep

    def close(self) -> None:
        try:
            self.cut()
            self.poll(wait=True)
        finally:
            self.pool.shutdown(wait=True)

    def totals(self) -> dict[str, float]:
        return {"shards": len(self.stats), "shard_samples": sum(s["samples"] for s in self.stats),
                "shard_bytes": sum(s["bytes"] for s in self.stats)}


def listed(fs, root: str, suffix: str = ".tar") -> set[str]:
    """Names of the shard files under `shards/` (without the suffix)."""
    folder = Layout(root).shards
    if not fs.exists(folder):
        return set()
    return {posixpath.basename(p)[: -len(suffix)] for p in fs.ls(folder, detail=False) if p.endswith(suffix)}

def remove_orphans(fs, root: str, committed_uris, keep: bool = False) -> list[str]:
    """Remove shards (and their stats) that no metadata row names: a driver killed between putting a shard and
    committing its rows. With `keep` (a metadata part was found unreadable and set aside: its shards are unnamed too)
    they are set aside instead (operators/integrity.py). Only under the output's lease (one writer)."""
    named = {shard_name(u) for u in committed_uris if u}
    orphans = sorted((listed(fs, root) | listed(fs, root, ".json")) - named)
    layout = Layout(root)
    if keep:
        integrity.set_aside(fs, root, [integrity.Damage(layout.shard(n), "shard", "no readable metadata row names it")
                                       for n in orphans])
        return orphans
    for name in orphans:
        for path in (layout.shard(name), layout.shard_stats(name)):
            if fs.exists(path):
                fs.rm(path)
    if orphans:
        logger.warning("removed %d shard(s) that no metadata row names (a killed run's last shards): %s",
                       len(orphans), ", ".join(orphans[:5]))
    return orphans


def _drop_scratch(fs, scratch: Layout) -> Callable[[list[dict]], None]:
    """After a shard's rows are committed: their media and scratch rows go (best effort; the run's scratch folder
    is removed at its end anyway)."""
    def drop(rows: list[dict]) -> None:
        paths = [scratch.sample(r["id"], ext) for r in rows for ext in ("mp4", "png", "parquet")]
        try:
            fs.rm([p for p in paths if fs.exists(p)])
        except Exception:  # best effort: the run's scratch goes at its end
            logger.warning("could not remove packed samples from scratch", exc_info=True)
    return drop


def run_sink(fs, root: str, writer, tag: str, run_id: str, output, code_version: str) -> ShardSink:
    """The shard sink of a run whose workers leave samples in its own scratch (`output`: the job's OutputConfig)."""
    scratch = Layout(root, run_id)
    return _sink(fs, root, writer, tag, lambda rid: scratch, output, code_version, output.shard_max_seconds,
                 after_commit=_drop_scratch(fs, scratch))


def _sink(fs, root: str, writer, tag: str, scratch: Callable[[str], Layout], output, code_version: str,
          max_seconds: float, after_commit: Callable[[list[dict]], None] | None = None) -> ShardSink:
    """A sink of samples left in scratch, its shards sized by the job's OutputConfig (`output`)."""
    return ShardSink(fs, root, writer, tag, scratch_members(fs, scratch, output.contact_sheets),
                     code_version=code_version, max_bytes=int(output.shard_max_mb * 1e6),
                     max_samples=output.shard_max_samples, max_seconds=max_seconds, after_commit=after_commit)


def salvage(fs, root: str, done, *, code_version: str, output) -> int:
    """Samples that a killed run finished but never committed (their scratch rows `<id>.parquet` under
    `.runs/<run>/samples/`): packed into shards and committed now, instead of generated again; then the dead runs'
    scratch goes. Only under the output's lease (every other run folder belongs to a dead run). Returns the count
    (`output`: the job's OutputConfig)."""
    runs = Layout(root).runs
    if not fs.exists(runs):
        return 0
    tables, where = [], {}
    for run in fs.ls(runs, detail=False):
        scratch = Layout(root, posixpath.basename(run))
        folder = scratch.samples
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            if path.endswith(".parquet"):
                try:
                    t = storage.read_parquet(fs, path)
                except Exception:  # a scratch row cut short by the kill: its sample is made again
                    logger.warning("unreadable scratch row %s", path)
                    continue
                if fs.exists(path[: -len(".parquet")] + ".mp4"):
                    tables.append(t)
                    where[t["id"][0].as_py()] = scratch
    count = 0
    if tables:
        table = pa.concat_tables(tables, promote_options="permissive")
        if len(done):
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=done)))
        if table.num_rows:
            tag = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-salvage"
            writer = metadata.MetadataWriter(fs, root, tag)
            sink = _sink(fs, root, writer, tag, where.__getitem__, output, code_version, float("inf"))
            sink.add(table)
            sink.close()
            count = table.num_rows
            logger.warning("packed %d sample(s) that a killed run finished but never committed", count)
    for run in fs.ls(runs, detail=False):
        fs.rm(run, recursive=True)
    return count
