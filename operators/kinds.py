"""Row kinds: the one place that tells a generation row from a BIVDiff row (docs/architecture.md).

A manifest row with a non-null `task` is a BIVDiff edit of `source_video`; every other row generates a video from its
prompt. Everything kind-specific hangs off `KINDS`: how a row resolves (operators/resolve.py), the Ray Data operator
that runs it (operators/actors.py: its parameter class and the metadata's `backbone`), its metadata columns
(`pipelines/params.py`), what it may check before any GPU work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import presets
from pipelines.bivdiff.config import BivdiffParams, resolve_bivdiff_params
from pipelines.config import resolve_params
from pipelines.params import BIVDIFF, GENERATION, Limits, Structure

from .actors import BivdiffGenerator, VideoGenerator
from .storage import filesystem
from .worker import RowWorker

KIND_COLUMNS = ("task",)  # the manifest columns that decide a row's kind


def kind_of(row: Mapping[str, Any]) -> str:
    return BIVDIFF if row.get("task") is not None else GENERATION


def of_kind(batch: pa.Table, kind: str) -> pa.Table:
    """The rows of a resolved batch (its `_kind` column) of one kind: a Ray Data task of the job, so this module
    imports no model library (tests/test_architecture.py)."""
    return batch.filter(pc.equal(batch["_kind"], kind))


def bivdiff_rows(table) -> int:
    """How many of a manifest table's rows are BIVDiff rows (a `task`, as `kind_of` decides), counted on the column."""
    return table.num_rows - table.column("task").null_count if "task" in table.column_names else 0


def kinds_present(table) -> tuple[str, ...]:
    """The kinds among a manifest table's rows, as `kind_of` decides them, counted on the column (no Python rows)."""
    bivdiff = bivdiff_rows(table)
    found = {GENERATION} if "task" not in table.column_names or bivdiff < table.num_rows else set()
    if bivdiff:
        found.add(BIVDIFF)
    return tuple(k for k in (GENERATION, BIVDIFF) if k in found)


@dataclass(frozen=True)
class Setup:
    """What one kind's rows resolve against: its model set, the job's per-row defaults, the models' structure."""

    spec: Any  # ModelSpec | BivdiffSpec
    defaults: Mapping[str, Any] = field(default_factory=dict)
    structure: Structure = Structure()


@dataclass(frozen=True)
class RowKind:
    operator: type[RowWorker]  # the Ray Data operator (callable class) that runs the kind's rows
    resolve: Callable[[Mapping[str, Any], Setup, Limits], Any]
    ab_groups: bool  # whether a row may expand into one row per sampler (A/B)
    default_sampler: str
    precheck: Callable[[Any], str | None] = lambda params: None  # a reason to fail before any GPU work, or None
    id_salt: Mapping[str, str] = field(default_factory=dict)  # hashed into derived ids (ids made before stay stable)

    @property
    def name(self) -> str:
        return self.operator.kind


def _missing_input(p: BivdiffParams) -> str | None:
    """A BIVDiff row's first input URI that certainly does not exist; storage errors other than 'not found' are left
    to the actor, which reads the files anyway."""
    for name in ("source_video", "mask_video", "condition_video"):
        uri = getattr(p, name)
        if uri is None:
            continue
        try:
            fs, path = filesystem(uri)
            if not fs.exists(path):
                return f"{name}: {uri!r} does not exist"
        except Exception:  # e.g. no credentials in this task: the actor will say
            continue
    return None


KINDS: dict[str, RowKind] = {k.name: k for k in (
    RowKind(VideoGenerator, lambda row, s, lim: resolve_params(row, s.defaults, backbone=s.spec.backbone,
                                                               structure=s.structure, limits=lim),
            True, presets.DEFAULT_SAMPLER),
    RowKind(BivdiffGenerator, lambda row, s, lim: resolve_bivdiff_params(row, s.defaults, structure=s.structure,
                                                                         limits=lim),
            False, presets.BIVDIFF_DEFAULTS["sampler"], _missing_input, {"kind": BIVDIFF}),
)}
