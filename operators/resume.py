"""What an output prefix holds, read back: the committed state a rerun resumes from (`committed`), column scans of the
metadata parts (`scan`, `readable_scan`), folder listings with sizes that never become Python lists (`listing`), and an
ok row's media (`media`). What it finds damaged is set aside by operators/integrity.py.
The metadata's schema and its writer are operators/metadata.py; the paths, operators/layout.py.
"""
from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from . import integrity, metadata, storage
from .integrity import Damage
from .layout import Layout
from .shards import read_sample, shard_name

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
    `done` the ids whose newest row says ok and whose video (or shard) is present and whole, what a rerun skips;
    `poisoned` the ids whose newest row says the row killed its worker twice, what a rerun records failed again without
    running it; `shards` the shard uris that metadata rows name; `damage` the committed objects that cannot be trusted
    (operators/integrity.py), set aside under the lease before the run writes."""

    done: pa.Array
    poisoned: pa.Array
    shards: frozenset = frozenset()
    damage: tuple[Damage, ...] = ()

    @classmethod
    def empty(cls) -> "Committed":
        return cls(pa.array([], pa.string()), pa.array([], pa.string()))


# the columns that say where each row stands (`bytes`: the size its video was committed with)
STATE = ("id", "status", "error", "finished_at", "shard_uri", "bytes")
DICTIONARY = ("shard_uri",)  # read dictionary-encoded: one shard's uri is shared by up to shard_max_samples rows


def scan(fs, root: str, columns: Iterable[str], ids=None, paths: list[str] | None = None) -> pa.Table | None:
    """`columns` of every part (or of `paths`; null where a part lacks one, written before the column existed), only
    the rows whose id is in `ids` when given: one pyarrow scan with the filter pushed down, so that a 10M-row
    output is never read whole (on Arrow's threads for local files only: `storage.arrow_threads`)."""
    paths = metadata.part_paths(fs, root) if paths is None else paths
    if not paths:
        return None
    union = pa.unify_schemas(list(metadata.SCHEMAS.values()))
    schema = pa.schema([pa.field(c, pa.dictionary(pa.int32(), pa.string())) if c in DICTIONARY else union.field(c)
                        for c in columns if c in union.names])  # an Arrow schema
    dataset = pads.dataset(paths, schema=schema, format="parquet", filesystem=storage.arrow_filesystem(fs))
    return dataset.to_table(filter=None if ids is None else pc.field("id").isin(ids),
                            use_threads=storage.arrow_threads(fs))


def readable_scan(fs, root: str, columns: Iterable[str]) -> tuple[pa.Table | None, list[Damage]]:
    """`scan` of the parts that read, and the ones that do not: the parts are checked one by one only when the scan of
    all of them fails, so an intact output costs nothing more."""
    columns = list(columns)
    try:
        return scan(fs, root, columns), []
    except (pa.ArrowInvalid, OSError):
        paths = metadata.part_paths(fs, root)
        damage = integrity.part_damage(fs, paths, columns)
        if not damage:
            raise
        bad = {d.path for d in damage}
        return scan(fs, root, columns, paths=[p for p in paths if p not in bad]), damage


def listing(fs, folder: str, suffix: str, chunk: int = 200_000):
    """Names under `folder` ending in `suffix` (suffix cut) and their sizes, as Arrow chunks (names, sizes). A local
    folder is scanned with os.scandir, so a listing of millions of videos never becomes a Python list; other
    filesystems are listed with one `fs.ls` (its detail carries the sizes)."""
    if storage.is_local(fs):
        if not os.path.isdir(folder):
            return
        names, lengths = [], []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(suffix) and entry.is_file():
                    names.append(entry.name[: -len(suffix)])
                    lengths.append(entry.stat().st_size)
                    if len(names) >= chunk:
                        yield pa.array(names, pa.string()), pa.array(lengths, pa.int64())
                        names, lengths = [], []
        if names:
            yield pa.array(names, pa.string()), pa.array(lengths, pa.int64())
        return
    if not fs.exists(folder):
        return
    found = [(posixpath.basename(e["name"]), e.get("size")) for e in fs.ls(folder, detail=True)
             if e.get("type") != "directory" and e["name"].endswith(suffix)]
    for i in range(0, len(found), chunk):
        part = found[i:i + chunk]
        yield (pa.array([n[: -len(suffix)] for n, _ in part], pa.string()),
               pa.array([s for _, s in part], pa.int64()))


def sizes(fs, folder: str, suffix: str) -> pa.Table:
    """`listing` as one table (name, size)."""
    chunks = list(listing(fs, folder, suffix))
    return pa.table({"name": pa.chunked_array([n for n, _ in chunks], pa.string()),
                     "size": pa.chunked_array([s for _, s in chunks], pa.int64())})


def committed(fs, root: str) -> Committed:
    """Where the output prefix stands (see `Committed`). Rows of webdataset output are present when their shard is
    there, its stats read and its size is the one they committed; rows of files output when `videos/<id>.mp4` is there
    with the size its row committed (the listing streamed and joined in Arrow). A metadata part that does not read is
    left out, its rows not done (operators/integrity.py)."""
    table, damage = readable_scan(fs, root, STATE)
    if table is None:
        return replace(Committed.empty(), damage=tuple(damage))
    shards = frozenset(u for c in table.column("shard_uri").chunks for u in c.dictionary.to_pylist() if u)
    newest = metadata.newest_rows(table)
    if len(newest) < table.num_rows:  # some id has several rows: keep its newest (else every row is its id's newest)
        table = table.take(newest)
    del newest
    ok = pc.equal(table["status"], "ok")
    in_shard = pa.chunked_array([pc.is_valid(c) for c in table.column("shard_uri").chunks], pa.bool_())
    present = untrusted = pc.and_(ok, pa.scalar(False))  # ok rows found whole / found damaged
    if shards:
        on_disk = dict(zip(*(c.to_pylist() for c in sizes(fs, Layout(root).shards, ".tar").columns)))
        bad = integrity.shard_damage(fs, root, [n for n in _live_shards(table, ok) if n in on_disk], on_disk)
        damage += bad
        broken = {shard_name(d.path) for d in bad}
        there = pa.array(sorted(u for u in shards if shard_name(u) in on_disk and shard_name(u) not in broken),
                         pa.string())
        gone = pa.array(sorted(u for u in shards if shard_name(u) in broken), pa.string())
        present = pc.and_(ok, pc.fill_null(_in_dictionary(table, there), False))
        untrusted = pc.and_(ok, pc.fill_null(_in_dictionary(table, gone), False))
    poisoned = table["id"].filter(pc.and_(pc.equal(table["status"], "failed"),
                                          pc.starts_with(pc.fill_null(table["error"], ""), metadata.WORKER_DIED)))
    filed = pc.and_(ok, pc.invert(in_shard))
    if pc.any(filed).as_py():
        listed_videos = sizes(fs, Layout(root).videos, ".mp4").combine_chunks()
        at = pc.index_in(table["id"], value_set=listed_videos["name"])
        size = listed_videos["size"].take(at)
        # a row committed before `bytes` existed has none: its video's presence is all that can be checked
        same = pc.fill_null(pc.equal(size, table["bytes"]), True)
        there = pc.and_(filed, pc.is_valid(at))
        present = pc.or_(present, pc.and_(there, same))
        cut = pc.and_(there, pc.invert(same))
        if pc.any(cut).as_py():
            untrusted = pc.or_(untrusted, cut)
            wrong = table.filter(cut).select(["id", "bytes"]).append_column("size", size.filter(cut))
            damage += [integrity.Damage(Layout(root).video(r["id"]), "video",
                                        f"it is {r['size']} bytes, its row says {r['bytes']}")
                       for r in wrong.to_pylist()]
    missing = pc.sum(ok).as_py() - pc.sum(present).as_py() - pc.sum(untrusted).as_py()
    if missing:
        logger.warning("%d id(s) marked ok have no video; they will be generated again", missing)
    done = table["id"].filter(present).combine_chunks()
    del table, present, ok, filed, in_shard, untrusted  # so that the pool can hand their memory back right here
    pa.default_memory_pool().release_unused()  # the planning that follows peaks 0.35 GB lower at 10M rows
    return Committed(done, poisoned.combine_chunks(), shards, tuple(damage))


def _in_dictionary(table: pa.Table, values: pa.Array) -> pa.ChunkedArray:
    """Per row: whether its (dictionary-encoded) shard_uri is one of `values`, decided on each chunk's dictionary."""
    return pa.chunked_array([pc.is_in(c.dictionary, value_set=values).take(c.indices)
                             for c in table.column("shard_uri").chunks], pa.bool_())


def _live_shards(table: pa.Table, ok) -> set[str]:
    """The names of the shards that some id's newest ok row names (an older row may name a shard set aside)."""
    named = table.filter(pc.and_(ok, pc.is_valid(table["shard_uri"]))).column("shard_uri")
    return {shard_name(u) for c in named.chunks for u in c.dictionary.take(pc.unique(c.indices)).to_pylist()}
