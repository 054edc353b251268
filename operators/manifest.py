"""Prompt manifests: schema checks (before any model loads), row ids, per-row resolution.

The schema is documented in `datasets/README.md`. A manifest-level problem (not Parquet, no `prompt`
column, a known column of the wrong type) raises `ManifestError` with what to fix. A row-level problem
(empty prompt, bad value, unsafe id) makes that row a failed row; it never stops the job.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

import pyarrow as pa

from pipelines import params as schema

from .kinds import KINDS, Resolver, kind_of

# column -> accepted Arrow kinds: every parameter's (pipelines/params.py), plus the row id and the A/B sampler list
COLUMNS: dict[str, tuple[str, ...]] = {"id": ("string",), **schema.manifest_columns(), "samplers": ("list<string>",)}
# a manifest may not choose models or files: these columns are refused by name
FORBIDDEN = ("backbone", "base", "motion_adapter", "image_model", "vae", "lora", "model", "model_dir", "checkpoint")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
        problems.append(f"it has no 'prompt' column (columns: {', '.join(schema.names) or 'none'}); add a string column "
                        "'prompt' (or 'task' + 'source_video' for BIVDiff rows)")
    for name in schema.names:
        if name in FORBIDDEN:
            problems.append(f"column '{name}' would choose a model per row; models are set by the job config only — drop it")
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
    import pyarrow.dataset as pads

    from .storage import arrow_filesystem, filesystem

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


def check_id(value: Any) -> str:
    if not isinstance(value, str) or not ID_RE.match(value) or ".." in value:
        raise ValueError(f"id: must be 1-128 letters, digits, '.', '_' or '-', start with a letter or digit and "
                         f"contain no '..'; got {value!r}")
    return value


def derived_id(params_record: Mapping[str, Any], model) -> str:
    """Deterministic id from the prompt, every resolved parameter and the model set."""
    blob = json.dumps({"params": params_record, "model": model.fingerprint()}, sort_keys=True, default=str)
    return "h" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def resolve_row(row: Mapping[str, Any], resolver: Resolver) -> dict:
    """-> {"id", "kind", "status": "pending"|"failed", "error", "params_json", "sampler"} for one manifest row;
    "sampler" is the resolved preset, and a failed row keeps the one it asked for (or the default), so that its failure
    counts against that sampler's success rate."""
    given, kind = row.get("id"), KINDS[kind_of(row)]
    setup = resolver.setups[kind.name]
    try:
        params = kind.resolve(row, setup, resolver.limits)
        record = params.record()
        rid = check_id(given) if given is not None else derived_id({**record, **kind.id_salt}, setup.spec)
        return {"id": rid, "kind": kind.name, "status": "pending", "error": None,
                "params_json": json.dumps(record, sort_keys=True), "sampler": params.sampler}
    except ValueError as err:
        # a stable, safe key for the failed row even when the given id itself is the problem
        raw = json.dumps({"id": given, "prompt": row.get("prompt")}, sort_keys=True, default=str)
        rid = given if isinstance(given, str) and ID_RE.match(given) and ".." not in given else "invalid-" + hashlib.sha256(raw.encode()).hexdigest()[:20]
        sampler = row.get("sampler")
        if not isinstance(sampler, str):
            sampler = setup.defaults.get("sampler") or kind.default_sampler
        return {"id": rid, "kind": kind.name, "status": "failed", "error": str(err), "params_json": None, "sampler": sampler}


def expand_samplers(row: Mapping[str, Any], resolver: Resolver) -> list[dict]:
    """One resolved row per sampler of an A/B group (else one row). Rows of a group share the prompt, the seed
    (so the same initial noise) and `pair_id`; their ids are `<pair_id>-<sampler>`. Only generation rows expand."""
    group = row.get("samplers") or (resolver.samplers if KINDS[kind_of(row)].ab_groups else None)
    if not group:
        return [{**resolve_row(row, resolver), "pair_id": None}]
    if not KINDS[kind_of(row)].ab_groups:
        return [{**resolve_row(row, resolver), "status": "failed", "params_json": None, "pair_id": None,
                 "error": "samplers: A/B sampler groups are for generation rows; a BIVDiff row names its preset in 'sampler'"}]
    if isinstance(group, str) or not all(isinstance(s, str) for s in group) or len(set(group)) != len(group):
        bad = resolve_row({**row, "prompt": None}, resolver)
        return [{**bad, "error": f"samplers: must be a list of distinct preset names, got {group!r}", "pair_id": None}]
    first = resolve_row({**row, "sampler": group[0]}, resolver)
    if first["status"] == "failed":
        return [{**first, "pair_id": None}]
    seed = json.loads(first["params_json"])["seed"]  # a preset's own default seed must not split the pair
    pair = row.get("id") or derived_id({"prompt": row.get("prompt"), "samplers": list(group), "seed": seed,
                                        **{k: row.get(k) for k in PAIR_COLUMNS}}, resolver.setups[first["kind"]].spec)
    return [{**resolve_row({**row, "sampler": name, "seed": seed, "id": f"{pair}-{name}"}, resolver), "pair_id": pair}
            for name in group]


PAIR_COLUMNS = tuple(n for n in schema.names(schema.GENERATION) if n not in ("prompt", "sampler"))  # hashed into pair ids
