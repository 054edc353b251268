"""Build a filtered dataset from a finished run: its ok rows whose scores pass the thresholds, in the same layout as a
run's output (docs/datasets.md "Filtering by score"): WebDataset shards with their stats and Parquet metadata, or files.

    python -m jobs.export --output s3://bucket/runs/2026-11-24 --to s3://bucket/datasets/2026-11-24-clip30 \\
        --min-clipsim 0.30 --format webdataset

A row without the score a threshold asks for does not pass it. DEST must not hold a dataset already. The job runs the
same export at its end when its config has an `export` section, and the run's report links the result.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from dataclasses import asdict, dataclass, fields

import pyarrow as pa
import pyarrow.compute as pc

from operators import metadata, shards, storage
from operators.layout import Layout
from operators.resume import media

logger = logging.getLogger("jobs.export")
THRESHOLDS = (("min_clipsim", "clipsim", pc.greater_equal),
              ("min_frame_consistency", "frame_consistency", pc.greater_equal),
              ("max_flicker", "flicker", pc.less_equal),
              ("min_subject_consistency", "subject_consistency", pc.greater_equal),
              ("min_motion", "motion", pc.greater_equal))


@dataclass(frozen=True)
class Filter:
    min_clipsim: float | None = None
    min_frame_consistency: float | None = None
    max_flicker: float | None = None
    min_subject_consistency: float | None = None
    min_motion: float | None = None  # pixels per frame (docs/lab.md "Scores"): static clips out

    @classmethod
    def of(cls, source) -> "Filter":
        """The thresholds of anything that holds them under these names (the job config's `export`, parsed flags)."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})

    def describe(self) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in asdict(self).items() if v is not None) or "no score threshold"


def select(table: pa.Table, flt: Filter) -> pa.Table:
    """The ok rows of a run's current metadata that pass every threshold."""
    mask = pc.equal(table["status"], "ok")
    for key, column, op in THRESHOLDS:
        bound = getattr(flt, key)
        if bound is not None:
            values = table[column] if column in table.column_names else pa.nulls(table.num_rows, pa.float64())
            mask = pc.and_(mask, pc.fill_null(op(values, bound), False))
    return table.filter(mask)


def export(output: str, dest: str, flt: Filter, *, fmt: str = "webdataset", shard_max_mb: float = 256.0,
           shard_max_samples: int = 1000, contact_sheets: bool = True, code_version: str = "") -> dict:
    """Write the filtered dataset to `dest`; returns its summary (also written to `dest/export.json`)."""
    table = metadata.read_latest(output)
    if table is None:
        raise ValueError(f"--output: no metadata under {output}")
    dfs, droot = storage.filesystem(dest)
    out_layout = Layout(droot)
    if metadata.part_paths(dfs, droot) or shards.listed(dfs, droot):
        raise ValueError(f"--to: {dest} already holds a dataset; export to a new prefix")
    sfs, sroot = storage.filesystem(output)
    rows = select(table, flt)
    tag = f"export-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    writer = metadata.MetadataWriter(dfs, droot, tag)

    def members(row: dict) -> dict[str, bytes]:
        out = {"mp4": media(sfs, sroot, row, "mp4")}
        png = media(sfs, sroot, row, "png") if contact_sheets else None
        return {**out, **({"png": png} if png else {})}

    stats: list[dict] = []
    if fmt == "webdataset":  # the sample is in the shard now: the source's file uris are not carried over
        for name in ("video_uri", "contact_uri"):
            rows = rows.set_column(rows.schema.get_field_index(name), name, pa.nulls(rows.num_rows, pa.string()))
        sink = shards.ShardSink(dfs, droot, writer, tag, members, code_version=code_version or "export",
                                max_bytes=int(shard_max_mb * 1e6), max_samples=shard_max_samples,
                                max_seconds=float("inf"))
        for batch in rows.to_batches(max_chunksize=shard_max_samples):
            sink.add(pa.Table.from_batches([batch], rows.schema))
        sink.close()
        stats = sink.stats
    else:
        out = []
        for row in rows.to_pylist():
            files = members(row)
            video = out_layout.video(row["id"])
            storage.put_bytes(dfs, files["mp4"], video, droot)
            sheet = out_layout.contact_sheet(row["id"])
            if files.get("png"):
                storage.put_bytes(dfs, files["png"], sheet, droot)
            out.append({**row, "video_uri": storage.full_uri(dfs, video), "shard_uri": None, "shard_offset": None,
                        "contact_uri": storage.full_uri(dfs, sheet) if files.get("png") else None})
        if out:
            writer.add(pa.Table.from_pylist(out, schema=rows.schema))
        writer.flush()
    summary = {"source": output, "to": storage.full_uri(dfs, droot), "format": fmt, "filter": asdict(flt),
               "describe": flt.describe(),
               "rows": rows.num_rows, "ok_rows": int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0),
               "shards": [s["uri"] for s in stats], "bytes": sum(s["bytes"] for s in stats),
               "written_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.put_bytes(dfs, json.dumps(summary, indent=1).encode(), out_layout.export, droot)
    storage.clear_staging(dfs, droot)  # every write is in place: no empty .staging/ left in the dataset
    if summary["rows"]:
        logger.info("export: %d of %d ok rows (%s) -> %s", summary["rows"], summary["ok_rows"], flt.describe(),
                    summary["to"])
    else:
        logger.warning("export: no row of the %d ok rows passes %s; the dataset at %s has no rows",
                       summary["ok_rows"], flt.describe(), summary["to"])
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="a finished run's output prefix (local folder or fsspec URI)")
    ap.add_argument("--to", required=True, help="where the filtered dataset goes (a new prefix)")
    ap.add_argument("--format", choices=["webdataset", "files"], default="webdataset",
                    help="webdataset: tar shards (default); files: one mp4 per row")
    ap.add_argument("--min-clipsim", type=float)
    ap.add_argument("--min-frame-consistency", type=float)
    ap.add_argument("--max-flicker", type=float)
    ap.add_argument("--min-subject-consistency", type=float)
    ap.add_argument("--min-motion", type=float, help="mean optical-flow magnitude, pixels per frame")
    ap.add_argument("--shard-max-mb", type=float, default=256.0)
    ap.add_argument("--shard-max-samples", type=int, default=1000)
    ap.add_argument("--no-contact-sheets", action="store_true", help="leave the png members out")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flt = Filter.of(args)
    try:
        export(args.output, args.to, flt, fmt=args.format, shard_max_mb=args.shard_max_mb,
               shard_max_samples=args.shard_max_samples, contact_sheets=not args.no_contact_sheets)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
