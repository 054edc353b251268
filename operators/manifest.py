"""Prompt manifests: the checks of a manifest as a whole, before any model loads.

The schema is documented in `datasets/README.md`. A manifest-level problem (not Parquet, no `prompt`
column, a known column of the wrong type) raises `ManifestError` with what to fix. Rows are resolved one by one in
operators/resolve.py, where a row-level problem makes that row a failed row.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from pipelines import params

from .storage import arrow_filesystem, filesystem

# column -> accepted Arrow kinds: every parameter's (pipelines/params.py), plus the row id and the A/B sampler list
COLUMNS: dict[str, tuple[str, ...]] = {"id": ("string",), **params.manifest_columns(), "samplers": ("list<string>",)}
# a manifest may not choose models or files: these columns are refused by name
FORBIDDEN = ("backbone", "base", "motion_adapter", "image_model", "vae", "lora", "model", "model_dir", "checkpoint")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message says what to fix."""


def _kind(t: pa.DataType) -> str:
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "floating"
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_kind(t.value_type)}>"
    return str(t)


def check_schema(schema: pa.Schema) -> None:
    """Raise ManifestError listing every problem with the manifest's columns."""
    problems = []
    if "prompt" not in schema.names and "task" not in schema.names:
        problems.append(f"it has no 'prompt' column (columns: {', '.join(schema.names) or 'none'}); add a string "
                        "column 'prompt' (or 'task' + 'source_video' for BIVDiff rows)")
    for name in schema.names:
        if name in FORBIDDEN:
            problems.append(f"column '{name}' would choose a model per row; models are set by the job config only — "
                            "drop it")
        elif name in COLUMNS:
            kind = _kind(schema.field(name).type)
            if kind != "null" and kind not in COLUMNS[name]:
                want = " or ".join(COLUMNS[name])
                problems.append(f"column '{name}' has type {schema.field(name).type}; expected {want}")
    if len(set(schema.names)) != len(schema.names):
        problems.append("column names repeat")
    if problems:
        raise ManifestError("bad manifest: " + "; ".join(problems))


def read_schema(uri: str) -> tuple[pa.Schema, int]:
    """Schema and row count of a Parquet file or folder of Parquet files, without reading the data."""
    fs, path = filesystem(uri)
    try:
        if not fs.exists(path):
            raise ManifestError(f"manifest {uri!r} does not exist")
        dataset = pads.dataset(path, filesystem=arrow_filesystem(fs), format="parquet")
        files = dataset.files
        if not files:
            raise ManifestError(f"manifest {uri!r} holds no Parquet files")
        schema = dataset.schema
        rows = sum(f.metadata.num_rows for f in dataset.get_fragments())
    except ManifestError:
        raise
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"manifest {uri!r} is not readable as Parquet ({str(err).splitlines()[0]}); "
                            "write it with pandas.DataFrame.to_parquet or pyarrow.parquet.write_table") from None
    check_schema(schema)
    return schema, rows
