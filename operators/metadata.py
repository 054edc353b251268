"""The metadata table: its schema, the driver's commit writer, and the resume reader.

Layout: `OUTPUT/videos/<id>.mp4` and `OUTPUT/metadata/part-<run>-<seq>.parquet`. A part is written
only after every video it lists was uploaded, so a row in a part is the commit marker of its video.
Re-runs add parts; the current state of an id is its newest row (`finished_at`).
"""
from __future__ import annotations

import datetime as dt
import io
import logging
import posixpath
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import params as schema

from . import storage

logger = logging.getLogger(__name__)

# the columns every row has; each kind's parameters (pipelines/params.py) sit between `error` and these
RUN_FIELDS = [
    ("backbone", pa.string()), ("model_spec", pa.string()),
    ("video_uri", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()), ("contact_uri", pa.string()),
    ("seconds", pa.float64()), ("model_calls", pa.int64()), ("calls_idm", pa.int64()), ("calls_vdm", pa.int64()),
    ("nfe", pa.int64()), ("code_version", pa.string()), ("run_id", pa.string()),
    ("worker", pa.string()),  # host:pid of the process that made the row (one actor of the pool, or the driver's task)
    ("finished_at", pa.timestamp("us", tz="UTC")),
    ("pair_id", pa.string()),  # rows of one A/B group (same prompt, seed and initial noise, several samplers)
    ("clipsim", pa.float64()), ("frame_consistency", pa.float64()), ("flicker", pa.float64()),
    ("score_error", pa.string()),  # why the scores are null (the video is kept)
]
SCHEMAS = {kind: pa.schema([("id", pa.string()), ("status", pa.string()), ("error", pa.string()),
                            *schema.metadata_fields(kind), *RUN_FIELDS]) for kind in schema.KINDS}
NAMES = tuple(dict.fromkeys(n for s in SCHEMAS.values() for n in s.names))  # every column of either kind


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def passthrough_name(name: str) -> str:
    """Unknown manifest columns keep their name unless it clashes with a metadata column."""
    return f"manifest_{name}" if name in NAMES else name


def to_table(rows: list[Mapping[str, Any]], extra: pa.Table | None = None, kind: str = schema.GENERATION) -> pa.Table:
    """Metadata rows of one kind (dicts over its columns) plus passthrough manifest columns, aligned by position."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMAS[kind].names} for r in rows], schema=SCHEMAS[kind])
    if extra is not None:
        for name, col in zip(extra.column_names, extra.columns):
            table = table.append_column(passthrough_name(name), col)
    return table


def videos_dir(root: str) -> str:
    return storage.join(root, "videos")


def contact_dir(root: str) -> str:
    return storage.join(root, "contact")


def metadata_dir(root: str) -> str:
    return storage.join(root, "metadata")


class MetadataWriter:
    """Buffers rows in the driver and commits them as Parquet parts (atomic per part)."""

    def __init__(self, fs, root: str, run_tag: str):
        self.fs, self.root, self.run_tag = fs, root, run_tag
        self.buffer: list[pa.Table] = []
        self.seq = 0
        self.parts: list[str] = []
        fs.makedirs(metadata_dir(root), exist_ok=True)

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.buffer.append(table)

    @property
    def pending(self) -> int:
        return sum(t.num_rows for t in self.buffer)

    def flush(self) -> str | None:
        if not self.buffer:
            return None
        table = pa.concat_tables(self.buffer, promote_options="permissive")
        sink = io.BytesIO()
        pq.write_table(table, sink)
        path = storage.join(metadata_dir(self.root), f"part-{self.run_tag}-{self.seq:05d}.parquet")
        storage.put_bytes(self.fs, sink.getvalue(), path, self.root)
        self.buffer, self.seq = [], self.seq + 1
        self.parts.append(path)
        return path


def part_paths(fs, root: str) -> list[str]:
    d = metadata_dir(root)
    if not fs.exists(d):
        return []
    return sorted(p for p in fs.ls(d, detail=False) if posixpath.basename(p).startswith("part-") and p.endswith(".parquet"))


def read_parts(fs, root: str, columns: Iterable[str] | None = None) -> pa.Table | None:
    tables = []
    for p in part_paths(fs, root):
        with fs.open(p, "rb") as f:
            t = pq.read_table(f)
        tables.append(t.select([c for c in columns if c in t.column_names]) if columns else t)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def latest(table: pa.Table) -> pa.Table:
    """One row per id: the newest by finished_at."""
    if table is None or table.num_rows == 0:
        return table
    order = table.sort_by([("id", "ascending"), ("finished_at", "descending")])
    ids = order.column("id").to_pylist()
    keep = [i for i, v in enumerate(ids) if i == 0 or ids[i - 1] != v]
    return order.take(keep)


def read_latest(output: str) -> pa.Table | None:
    """The current metadata of a run folder: one row per id."""
    fs, root = storage.filesystem(output)
    return latest(read_parts(fs, root))


WORKER_DIED = "worker died while generating this row"  # the error of a row that killed its worker twice


def committed(fs, root: str) -> tuple[set[str], set[str]]:
    """(ids whose newest row says ok and whose video is present: what a re-run skips, ids whose newest row says that
    the row killed its worker twice: what a re-run records failed again without running it)."""
    table = read_parts(fs, root, ["id", "status", "error", "finished_at"])
    if table is None:
        return set(), set()
    cur = latest(table)
    ids, status, errors = (cur.column(c).to_pylist() for c in ("id", "status", "error"))
    poisoned = {i for i, s, e in zip(ids, status, errors) if s == "failed" and (e or "").startswith(WORKER_DIED)}
    ok = {i for i, s in zip(ids, status) if s == "ok"}
    vdir = videos_dir(root)
    present = set()
    if fs.exists(vdir):
        present = {posixpath.basename(p)[: -len(".mp4")] for p in fs.ls(vdir, detail=False) if p.endswith(".mp4")}
    missing = ok - present
    if missing:
        logger.warning("%d id(s) marked ok have no video; they will be generated again", len(missing))
    return ok & present, poisoned
