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
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import params as schema

from . import storage

logger = logging.getLogger(__name__)

# the columns every row has; each kind's parameters (pipelines/params.py) sit between `error` and these
RUN_FIELDS = [
    ("backbone", pa.string()), ("model_spec", pa.string()),
    ("video_uri", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()), ("contact_uri", pa.string()),
    ("shard_uri", pa.string()), ("shard_offset", pa.int64()),  # webdataset output: the sample's tar and its byte offset
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


def media(fs, root: str, row: Mapping[str, Any], ext: str) -> bytes | None:
    """An ok row's video (`mp4`) or contact sheet (`png`): from its shard (webdataset output) or its own file; None
    when it has none."""
    if row.get("shard_uri"):
        from .shards import read_sample

        return read_sample(fs, row["shard_uri"], row["shard_offset"]).get(ext)
    path = storage.join(videos_dir(root) if ext == "mp4" else contact_dir(root), f"{row['id']}.{ext}")
    return fs.cat_file(path) if fs.exists(path) else None


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


def read_parts(fs, root: str, columns: Iterable[str] | None = None, paths: list[str] | None = None) -> pa.Table | None:
    """Every metadata part (or `paths`) as one table; with `columns`, only those of them a part has are read."""
    tables = []
    for p in part_paths(fs, root) if paths is None else paths:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            tables.append(pf.read(columns=[c for c in columns if c in pf.schema_arrow.names] if columns else None))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def newest_rows(table: pa.Table) -> pa.Array:
    """Row indices of each id's newest row (by finished_at), in id order: a sort of the indices and one comparison of
    neighbouring ids, so that only the `id` column is ever copied."""
    order = pc.sort_indices(table.select(["id", "finished_at"]), sort_keys=[("id", "ascending"), ("finished_at", "descending")])
    ids = table.column("id").take(order).combine_chunks()
    first = pc.fill_null(pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)), True)
    return order.filter(pa.concat_arrays([pa.array([True]), first]))


def latest(table: pa.Table) -> pa.Table:
    """One row per id: the newest by finished_at."""
    if table is None or table.num_rows == 0:
        return table
    return table.take(newest_rows(table))


def read_latest(output: str) -> pa.Table | None:
    """The current metadata of a run folder: one row per id."""
    fs, root = storage.filesystem(output)
    return latest(read_parts(fs, root))


@dataclass
class Committed:
    """What an output prefix holds, as Arrow arrays (never Python sets: a 10M-row output is planned in about 1 GB):
    `done` the ids whose newest row says ok and whose video (or shard) is present, what a rerun skips; `poisoned` the
    ids whose newest row says the row killed its worker twice, what a rerun records failed again without running it;
    `shards` the shard uris that metadata rows name."""

    done: pa.Array
    poisoned: pa.Array
    shards: frozenset = frozenset()

    @classmethod
    def empty(cls) -> "Committed":
        return cls(pa.array([], pa.string()), pa.array([], pa.string()))


STATE = ("id", "status", "error", "finished_at", "shard_uri")  # the columns that say where each row stands
DICTIONARY = ("shard_uri",)  # read dictionary-encoded: one shard's uri is shared by up to shard_max_samples rows


def scan(fs, root: str, columns: Iterable[str], ids=None) -> pa.Table | None:
    """`columns` of every part (null where a part lacks one, written before the column existed), only the rows whose
    id is in `ids` when given: one threaded pyarrow scan with the filter pushed down, so that a 10M-row output is never
    read whole."""
    import pyarrow.dataset as pads

    paths = part_paths(fs, root)
    if not paths:
        return None
    union = pa.unify_schemas(list(SCHEMAS.values()))
    schema = pa.schema([pa.field(c, pa.dictionary(pa.int32(), pa.string())) if c in DICTIONARY else union.field(c)
                        for c in columns if c in union.names])
    dataset = pads.dataset(paths, schema=schema, format="parquet", filesystem=storage.arrow_filesystem(fs))
    return dataset.to_table(filter=None if ids is None else pc.field("id").isin(ids))


def listing(fs, folder: str, suffix: str, chunk: int = 200_000):
    """Names under `folder` ending in `suffix` (suffix cut), as Arrow chunks. A local folder is scanned with os.scandir,
    so a listing of millions of videos never becomes a Python list; other filesystems are listed with one `fs.ls`."""
    if storage.is_local(fs):
        import os

        if not os.path.isdir(folder):
            return
        buf = []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(suffix):
                    buf.append(entry.name[: -len(suffix)])
                    if len(buf) >= chunk:
                        yield pa.array(buf, pa.string())
                        buf = []
        if buf:
            yield pa.array(buf, pa.string())
        return
    if not fs.exists(folder):
        return
    names = [posixpath.basename(p) for p in fs.ls(folder, detail=False)]
    for i in range(0, len(names), chunk):
        yield pa.array([n[: -len(suffix)] for n in names[i:i + chunk] if n.endswith(suffix)], pa.string())


WORKER_DIED = "worker died while generating this row"  # the error of a row that killed its worker twice


def committed(fs, root: str) -> Committed:
    """Where the output prefix stands (see `Committed`). Rows of webdataset output are present when their shard is;
    rows of files output when `videos/<id>.mp4` is (the listing streamed and anti-joined in Arrow)."""
    from .shards import listed, shard_name

    table = scan(fs, root, STATE)
    if table is None:
        return Committed.empty()
    shards = frozenset(u for c in table.column("shard_uri").chunks for u in c.dictionary.to_pylist() if u)
    newest = newest_rows(table)
    if len(newest) < table.num_rows:  # some id has several rows: keep its newest (else every row is its id's newest)
        table = table.take(newest)
    del newest
    on_disk = listed(fs, root) if shards else set()
    there = pa.array(sorted(u for u in shards if shard_name(u) in on_disk), pa.string())
    # per chunk through the dictionary: a shard uri is never expanded to one string per row
    in_shard = pa.chunked_array([pc.is_valid(c) for c in table.column("shard_uri").chunks], pa.bool_())
    shard_there = pa.chunked_array([pc.is_in(c.dictionary, value_set=there).take(c.indices) for c in table.column("shard_uri").chunks],
                                   pa.bool_())
    ok = pc.equal(table["status"], "ok")
    poisoned = table["id"].filter(pc.and_(pc.equal(table["status"], "failed"),
                                          pc.starts_with(pc.fill_null(table["error"], ""), WORKER_DIED)))
    present = pc.and_(ok, pc.fill_null(shard_there, False))
    filed = pc.and_(ok, pc.invert(in_shard))
    if pc.any(filed).as_py():
        names = pa.chunked_array(list(listing(fs, videos_dir(root), ".mp4")), pa.string()).combine_chunks()
        present = pc.or_(present, pc.and_(filed, pc.is_in(table["id"], value_set=names)))
    missing = pc.sum(ok).as_py() - pc.sum(present).as_py()
    if missing:
        logger.warning("%d id(s) marked ok have no video; they will be generated again", missing)
    done = table["id"].filter(present).combine_chunks()
    del table, present, ok, filed, in_shard, shard_there  # so that the pool can hand their memory back right here
    pa.default_memory_pool().release_unused()  # the planning that follows peaks 0.35 GB lower at 10M rows
    return Committed(done, poisoned.combine_chunks(), shards)
