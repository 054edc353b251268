"""The metadata table: its schema, the driver's commit writer, and its reader (one row per id: `read_latest`).

Parts are `OUTPUT/metadata/part-<run>-<seq>.parquet` (operators/layout.py). A part is written only after every video
it lists was uploaded, so a row in a part is the commit marker of its video. Re-runs add parts; the current state of
an id is its newest row (`finished_at`). What a rerun resumes from is read in operators/resume.py.
"""
from __future__ import annotations

import datetime as dt
import io
import logging
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import params

from . import storage
from .layout import Layout, is_part

logger = logging.getLogger(__name__)

# the columns every row has; each kind's parameters (pipelines/params.py) sit between `error` and these
HEAD_FIELDS = [
    ("id", pa.string()),  # the manifest row's id (`<id>-<sampler>` for the rows of an A/B group)
    ("status", pa.string()),  # "ok" (its video is committed) or "failed"
    ("error", pa.string()),  # why the row failed, one readable line (null when ok)
]
RUN_FIELDS = [
    ("backbone", pa.string()),  # the model family that made it ("animatediff", "bivdiff/vidrd", ...)
    ("model_spec", pa.string()),  # the model folders or hub ids it was loaded from (JSON; no device or dtype)
    ("video_uri", pa.string()),  # the mp4's full URI (files output; null with webdataset output: see shard_uri)
    ("bytes", pa.int64()),  # the mp4's size
    ("sha256", pa.string()),  # the mp4's SHA-256 (hex)
    ("contact_uri", pa.string()),  # the contact sheet (lossless PNG of the frames) URI; files output with sheets on
    ("shard_uri", pa.string()),  # webdataset output: the sample's tar and its byte offset
    ("shard_offset", pa.int64()),  # webdataset output: the sample's tar and its byte offset
    ("seconds", pa.float64()),  # wall seconds of sampling, decode and encode (its batch's share)
    ("sampler_seconds", pa.float64()),  # the device part of `seconds`: sampling and decode (its batch's share)
    ("started_at", pa.timestamp("us", tz="UTC")),  # when its batch's device part began (docs/job.md "Throughput")
    ("model_calls", pa.int64()),  # UNet forward calls for this video, both models (a CFG pair counts once)
    ("calls_idm", pa.int64()),  # the image model's share of model_calls
    ("calls_vdm", pa.int64()),  # the video model's share of model_calls
    ("nfe", pa.int64()),  # network evaluations: 2 x model_calls (CFG pairs); BIVDiff's inversion calls once
    ("tflop", pa.float64()),  # its model calls and VAE decode in TFLOP, counted per shape (docs/algorithms.md §10)
    ("code_version", pa.string()),  # the package version + a hash of the project's sources (+ git commit if known)
    ("run_id", pa.string()),  # the run that made it (the MLflow run id when tracked)
    ("worker", pa.string()),  # host:pid of the process that made the row (an actor of the pool, or a driver task)
    ("finished_at", pa.timestamp("us", tz="UTC")),  # when the row was made
    ("pair_id", pa.string()),  # rows of one A/B group (same prompt, seed and initial noise, several samplers)
    ("clipsim", pa.float64()),  # mean CLIP image-text cosine similarity of its frames and prompt (docs/job.md)
    ("frame_consistency", pa.float64()),  # mean CLIP image cosine similarity of consecutive frames
    ("flicker", pa.float64()),  # mean absolute change between consecutive frames (pixels in [0, 1])
    ("subject_consistency", pa.float64()),  # VBench's subject consistency over DINO features of its frames
    ("motion", pa.float64()),  # mean optical-flow magnitude between consecutive frames, pixels per frame
    ("dynamic", pa.bool_()),  # VBench's dynamic-degree rule on that flow (docs/lab.md "Scores")
    ("score_error", pa.string()),  # why the scores are null (the video is kept)
]
SCHEMAS = {kind: pa.schema([*HEAD_FIELDS, *params.metadata_fields(kind), *RUN_FIELDS]) for kind in params.KINDS}
NAMES = tuple(dict.fromkeys(n for s in SCHEMAS.values() for n in s.names))  # every column of either kind
WORKER_DIED = "worker died while generating this row"  # the error of a row that killed its worker twice


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def passthrough_name(name: str) -> str:
    """Unknown manifest columns keep their name unless it clashes with a metadata column."""
    return f"manifest_{name}" if name in NAMES else name


def to_table(rows: list[Mapping[str, Any]], extra: pa.Table | None = None, kind: str = params.GENERATION) -> pa.Table:
    """Metadata rows of one kind (dicts over its columns) plus passthrough manifest columns, aligned by position."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMAS[kind].names} for r in rows],
                                 schema=SCHEMAS[kind])
    if extra is not None:
        for name, col in zip(extra.column_names, extra.columns):
            table = table.append_column(passthrough_name(name), col)
    return table


class MetadataWriter:
    """Buffers rows in the driver and commits them as Parquet parts (atomic per part)."""

    def __init__(self, fs, root: str, run_tag: str):
        self.fs, self.root, self.run_tag = fs, root, run_tag
        self.layout = Layout(root)
        self.buffer: list[pa.Table] = []
        self.seq = 0
        self.parts: list[str] = []
        fs.makedirs(self.layout.metadata, exist_ok=True)

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
        path = self.layout.part(self.run_tag, self.seq)
        storage.put_bytes(self.fs, sink.getvalue(), path, self.root)
        self.buffer, self.seq = [], self.seq + 1
        self.parts.append(path)
        return path


def part_paths(fs, root: str) -> list[str]:
    folder = Layout(root).metadata
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False) if is_part(p))


def read_parts(fs, root: str, columns: Iterable[str] | None = None, paths: list[str] | None = None) -> pa.Table | None:
    """Every metadata part (or `paths`) as one table; with `columns`, only those of them a part has are read."""
    tables = []
    for p in part_paths(fs, root) if paths is None else paths:
        tables.append(storage.read_parquet(fs, p, columns or None))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def newest_rows(table: pa.Table) -> pa.Array:
    """Row indices of each id's newest row (by finished_at), in id order: a sort of the indices and one comparison of
    neighbouring ids, so that only the `id` column is ever copied."""
    order = pc.sort_indices(table.select(["id", "finished_at"]),
                            sort_keys=[("id", "ascending"), ("finished_at", "descending")])
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


