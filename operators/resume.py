"""What an output prefix holds, read back: the committed state a rerun resumes from (`committed`), column scans of the
metadata parts (`scan`), folder listings that never become Python lists (`listing`), and an ok row's media (`media`).
The metadata's schema and its writer are operators/metadata.py; the paths, operators/layout.py.
"""
from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from . import metadata, storage
from .layout import Layout
from .shards import listed, read_sample, shard_name

logger = logging.getLogger(__name__)


def media(fs, root: str, row: Mapping[str, Any], ext: str) -> bytes | None:
    """An ok row's video (`mp4`) or contact sheet (`png`): from its shard (webdataset output) or its own file; None
    when it has none."""
    if row.get("shard_uri"):
        return read_sample(fs, row["shard_uri"], row["shard_offset"]).get(ext)
    path = Layout(root).media(row["id"], ext)
    return fs.cat_file(path) if fs.exists(path) else None


@dataclass(frozen=True)
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
    paths = metadata.part_paths(fs, root)
    if not paths:
        return None
    union = pa.unify_schemas(list(metadata.SCHEMAS.values()))
    schema = pa.schema([pa.field(c, pa.dictionary(pa.int32(), pa.string())) if c in DICTIONARY else union.field(c)
                        for c in columns if c in union.names])  # an Arrow schema
    dataset = pads.dataset(paths, schema=schema, format="parquet", filesystem=storage.arrow_filesystem(fs))
    return dataset.to_table(filter=None if ids is None else pc.field("id").isin(ids))


def listing(fs, folder: str, suffix: str, chunk: int = 200_000):
    """Names under `folder` ending in `suffix` (suffix cut), as Arrow chunks. A local folder is scanned with os.scandir,
    so a listing of millions of videos never becomes a Python list; other filesystems are listed with one `fs.ls`."""
    if storage.is_local(fs):
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


def committed(fs, root: str) -> Committed:
    """Where the output prefix stands (see `Committed`). Rows of webdataset output are present when their shard is;
    rows of files output when `videos/<id>.mp4` is (the listing streamed and anti-joined in Arrow)."""
    table = scan(fs, root, STATE)
    if table is None:
        return Committed.empty()
    shards = frozenset(u for c in table.column("shard_uri").chunks for u in c.dictionary.to_pylist() if u)
    newest = metadata.newest_rows(table)
    if len(newest) < table.num_rows:  # some id has several rows: keep its newest (else every row is its id's newest)
        table = table.take(newest)
    del newest
    on_disk = listed(fs, root) if shards else set()
    there = pa.array(sorted(u for u in shards if shard_name(u) in on_disk), pa.string())
    # per chunk through the dictionary: a shard uri is never expanded to one string per row
    in_shard = pa.chunked_array([pc.is_valid(c) for c in table.column("shard_uri").chunks], pa.bool_())
    shard_there = pa.chunked_array([pc.is_in(c.dictionary, value_set=there).take(c.indices)
                                    for c in table.column("shard_uri").chunks], pa.bool_())
    ok = pc.equal(table["status"], "ok")
    poisoned = table["id"].filter(pc.and_(pc.equal(table["status"], "failed"),
                                          pc.starts_with(pc.fill_null(table["error"], ""), metadata.WORKER_DIED)))
    present = pc.and_(ok, pc.fill_null(shard_there, False))
    filed = pc.and_(ok, pc.invert(in_shard))
    if pc.any(filed).as_py():
        names = pa.chunked_array(list(listing(fs, Layout(root).videos, ".mp4")), pa.string()).combine_chunks()
        present = pc.or_(present, pc.and_(filed, pc.is_in(table["id"], value_set=names)))
    missing = pc.sum(ok).as_py() - pc.sum(present).as_py()
    if missing:
        logger.warning("%d id(s) marked ok have no video; they will be generated again", missing)
    done = table["id"].filter(present).combine_chunks()
    del table, present, ok, filed, in_shard, shard_there  # so that the pool can hand their memory back right here
    pa.default_memory_pool().release_unused()  # the planning that follows peaks 0.35 GB lower at 10M rows
    return Committed(done, poisoned.combine_chunks(), shards)
