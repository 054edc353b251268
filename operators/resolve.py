"""Row resolution (docs/architecture.md): a manifest row becomes a resolved row, with its id, its kind, its validated
parameters, or the reason it failed. Manifest-level checks (before any model loads) are operators/manifest.py.

`Resolver` is what a run resolves against (built once by the driver, shipped to the resolve tasks); `resolve_row` does
one row, `expand_samplers` one row per sampler of an A/B group, and `resolve_rows` (a stateless Ray Data task) a batch:
it adds the `_`-columns the operators read and drops the rows already committed. A row-level problem (empty prompt,
bad value, unsafe id) makes that row a failed row; it never stops the job.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import params
from pipelines.bivdiff.config import BivdiffSpec
from pipelines.config import ModelSpec
from pipelines.params import BIVDIFF, GENERATION, Limits, Structure

from .kinds import KINDS, Setup, kind_of
from .metadata import WORKER_DIED

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PAIR_COLUMNS = tuple(n for n in params.names(GENERATION) if n not in ("prompt", "sampler"))  # hashed into pair ids
# the resolved row's keys -> the columns `resolve_rows` adds (what the operators read)
RESOLVED = (("_id", "id"), ("_kind", "kind"), ("_status", "status"), ("_error", "error"), ("_params", "params"),
            ("_pair", "pair_id"), ("_sampler", "sampler"))


@dataclass(frozen=True)
class Resolver:
    """How a run resolves manifest rows: per kind its setup, the row limits, the A/B sampler list of the job."""

    setups: Mapping[str, Setup]
    limits: Limits = Limits()
    samplers: tuple[str, ...] | None = None

    @classmethod
    def build(cls, model: ModelSpec | Mapping | None = None, bivdiff: BivdiffSpec | Mapping | None = None, *,
              defaults: Mapping | None = None, bivdiff_defaults: Mapping | None = None,
              limits: Limits | Mapping | None = None, samplers=None,
              structures: Mapping[str, Structure] | None = None) -> "Resolver":
        spec = model if isinstance(model, ModelSpec) else ModelSpec(**(model or {}))
        bspec = bivdiff if isinstance(bivdiff, BivdiffSpec) else BivdiffSpec(**(bivdiff or {}))
        st = structures or {}
        return cls({GENERATION: Setup(spec, dict(defaults or {}), st.get(GENERATION, Structure())),
                    BIVDIFF: Setup(bspec, dict(bivdiff_defaults or {}), st.get(BIVDIFF, Structure()))},
                   limits if isinstance(limits, Limits) else Limits(**(limits or {})),
                   tuple(samplers) if samplers else None)


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
    """-> {"id", "kind", "status": "pending"|"failed", "error", "params", "sampler"} for one manifest row; "params" is
    the resolved parameters (None for a failed row) and "sampler" the resolved preset; a failed row keeps the one it
    asked for (or the default), so that its failure counts against that sampler's success rate."""
    given, kind = row.get("id"), KINDS[kind_of(row)]
    setup = resolver.setups[kind.name]
    try:
        resolved = kind.resolve(row, setup, resolver.limits)
        rid = check_id(given) if given is not None else derived_id({**resolved.record(), **kind.id_salt}, setup.spec)
        return {"id": rid, "kind": kind.name, "status": "pending", "error": None, "params": resolved,
                "sampler": resolved.sampler}
    except ValueError as err:
        # a stable, safe key for the failed row even when the given id itself is the problem
        raw = json.dumps({"id": given, "prompt": row.get("prompt")}, sort_keys=True, default=str)
        safe = isinstance(given, str) and ID_RE.match(given) and ".." not in given
        rid = given if safe else "invalid-" + hashlib.sha256(raw.encode()).hexdigest()[:20]
        sampler = row.get("sampler")
        if not isinstance(sampler, str):
            sampler = setup.defaults.get("sampler") or kind.default_sampler
        return {"id": rid, "kind": kind.name, "status": "failed", "error": str(err), "params": None,
                "sampler": sampler}


def expand_samplers(row: Mapping[str, Any], resolver: Resolver) -> list[dict]:
    """One resolved row per sampler of an A/B group (else one row). Rows of a group share the prompt, the seed
    (so the same initial noise) and `pair_id`; their ids are `<pair_id>-<sampler>`. Only generation rows expand."""
    kind = KINDS[kind_of(row)]
    group = row.get("samplers") or (resolver.samplers if kind.ab_groups else None)
    if not group:
        return [{**resolve_row(row, resolver), "pair_id": None}]
    if not kind.ab_groups:
        return [{**resolve_row(row, resolver), "status": "failed", "params": None, "pair_id": None,
                 "error": "samplers: A/B sampler groups are for generation rows; a BIVDiff row names its preset in "
                          "'sampler'"}]
    if isinstance(group, str) or not all(isinstance(s, str) for s in group) or len(set(group)) != len(group):
        bad = resolve_row({**row, "prompt": None}, resolver)
        return [{**bad, "error": f"samplers: must be a list of distinct preset names, got {group!r}", "pair_id": None}]
    first = resolve_row({**row, "sampler": group[0]}, resolver)
    if first["status"] == "failed":
        return [{**first, "pair_id": None}]
    seed = first["params"].seed  # a preset's own default seed must not split the pair
    pair = row.get("id") or derived_id({"prompt": row.get("prompt"), "samplers": list(group), "seed": seed,
                                        **{k: row.get(k) for k in PAIR_COLUMNS}}, resolver.setups[first["kind"]].spec)
    return [{**resolve_row({**row, "sampler": name, "seed": seed, "id": f"{pair}-{name}"}, resolver), "pair_id": pair}
            for name in group]


def members(ids: list, values) -> list[bool]:
    """Which of `ids` are in `values` (an Arrow string array, or any Python container)."""
    if values is None or len(values) == 0:
        return [False] * len(ids)
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return pc.is_in(pa.array(ids, pa.string()), value_set=values).to_pylist()
    return [i in values for i in ids]


def _column(r: dict, key: str) -> str | None:
    """A resolved row's value as its `_`-column holds it: the parameters as their JSON record (the column between the
    resolve task and the operators), everything else as is."""
    value = r.get(key)
    if key == "params":
        return None if value is None else json.dumps(value.record(), sort_keys=True)
    return value


def resolve_rows(batch: pa.Table, resolver: Resolver, *, done=None, duplicate_ids=None, seen=None,
                 poisoned=None) -> pa.Table:
    """Add _id/_kind/_status/_error/_params/_pair/_sampler; expand A/B groups (one row per sampler); drop rows already
    committed ok (`done`), and rows this run has already recorded (`seen`: the retry passes after a worker died); rows
    that killed their worker twice in an earlier run (`poisoned`) fail again here, without running. The id sets are
    Arrow arrays (jobs/setup.py plans with them) or Python sets."""
    rows, given = [], []  # (source row, resolved row), and the id the manifest row gave
    for i, row in enumerate(batch.to_pylist()):
        for r in expand_samplers(row, resolver):
            rows.append((i, r))
            given.append(row.get("id"))
    ids = [r["id"] for _, r in rows]
    is_seen, is_poisoned, is_done = members(ids, seen), members(ids, poisoned), members(ids, done)
    is_dup = [a or b for a, b in zip(members(ids, duplicate_ids), members([g or "" for g in given], duplicate_ids))]
    src, resolved = [], []
    for k, (i, r) in enumerate(rows):
        if is_seen[k]:
            continue
        if r["status"] == "pending" and is_poisoned[k]:
            r.update(status="failed", params=None,
                     error=f"{WORKER_DIED} in an earlier run; not run again (--retry-poisoned runs it)")
        if r["status"] == "pending" and is_dup[k]:
            r.update(status="failed", error=f"id: {given[k] or r['id']!r} appears in more than one manifest row; "
                     "ids must be unique", params=None)
        if r["status"] == "pending" and not is_done[k]:
            problem = KINDS[r["kind"]].precheck(r["params"])
            if problem:
                r.update(status="failed", error=problem, params=None)
        if not (r["status"] == "pending" and is_done[k]):
            src.append(i)
            resolved.append(r)
    out = batch.take(pa.array(src, type=pa.int64()))
    for name, key in RESOLVED:
        out = out.append_column(pa.field(name, pa.string()),
                                pa.array([_column(r, key) for r in resolved], type=pa.string()))
    return out
