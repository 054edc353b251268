"""Row kinds: the one place that tells a generation row from a BIVDiff row (README "Architecture").

A manifest row with a non-null `task` is a BIVDiff edit of `source_video`; every other row generates a video from its
prompt. Everything kind-specific hangs off `KINDS`: how a row resolves, how its record turns back into parameters,
which Ray Data operator runs it, its metadata columns (`pipelines/params.py`), what it may check before any GPU work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pipelines import presets
from pipelines.bivdiff.config import BivdiffParams, BivdiffSpec, resolve_bivdiff_params
from pipelines.config import GenParams, ModelSpec, resolve_params
from pipelines.params import BIVDIFF, GENERATION, Limits, Structure


KIND_COLUMNS = ("task",)  # the manifest columns that decide a row's kind


def kind_of(row: Mapping[str, Any]) -> str:
    return BIVDIFF if row.get("task") is not None else GENERATION


def kinds_present(table) -> tuple[str, ...]:
    """The kinds among a manifest table's rows, as `kind_of` decides them, counted on the column (no Python rows)."""
    task = table.column("task") if "task" in table.column_names else None
    found = {GENERATION} if task is None or task.null_count else set()
    if task is not None and task.null_count < len(task):
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
    name: str
    resolve: Callable[[Mapping[str, Any], Setup, Limits], Any]
    params: type
    operator: str  # class name in operators/generate.py
    ab_groups: bool  # whether a row may expand into one row per sampler (A/B)
    default_sampler: str
    precheck: Callable[[Any], str | None] = lambda params: None  # a reason to fail before any GPU work, or None
    id_salt: Mapping[str, str] = field(default_factory=dict)  # hashed into derived ids (ids made before stay stable)
    backbone_name: Callable[[Any], str] = lambda spec: spec.backbone  # the metadata's `backbone`


def _missing_input(p: BivdiffParams) -> str | None:
    """A BIVDiff row's first input URI that certainly does not exist; storage errors other than 'not found' are left
    to the actor, which reads the files anyway."""
    from .storage import filesystem

    for name in ("source_video", "mask_video", "condition_video"):
        uri = getattr(p, name)
        if uri is None:
            continue
        try:
            fs, path = filesystem(uri)
            if not fs.exists(path):
                return f"{name}: {uri!r} does not exist"
        except Exception:  # noqa: BLE001 - e.g. no credentials in this task: the actor will say
            continue
    return None


KINDS: dict[str, RowKind] = {
    GENERATION: RowKind(GENERATION, lambda row, s, lim: resolve_params(row, s.defaults, backbone=s.spec.backbone,
                                                                          structure=s.structure, limits=lim),
                        GenParams, "VideoGenerator", True, presets.DEFAULT_SAMPLER),
    BIVDIFF: RowKind(BIVDIFF, lambda row, s, lim: resolve_bivdiff_params(row, s.defaults, structure=s.structure, limits=lim),
                     BivdiffParams, "BivdiffGenerator", False, presets.BIVDIFF_DEFAULTS["sampler"], _missing_input,
                     {"kind": BIVDIFF}, lambda spec: f"bivdiff/{spec.vdm}"),
}


@dataclass(frozen=True)
class Resolver:
    """How a run resolves manifest rows (built once by the driver, shipped to the resolve tasks): per kind its setup,
    the row limits, the A/B sampler list of the job."""

    setups: Mapping[str, Setup]
    limits: Limits = Limits()
    samplers: tuple[str, ...] | None = None

    @classmethod
    def build(cls, model: ModelSpec | Mapping | None = None, bivdiff: BivdiffSpec | Mapping | None = None, *,
              defaults: Mapping | None = None, bivdiff_defaults: Mapping | None = None, limits: Limits | Mapping | None = None,
              samplers=None, structures: Mapping[str, Structure] | None = None) -> "Resolver":
        spec = model if isinstance(model, ModelSpec) else ModelSpec(**(model or {}))
        bspec = bivdiff if isinstance(bivdiff, BivdiffSpec) else BivdiffSpec(**(bivdiff or {}))
        st = structures or {}
        return cls({GENERATION: Setup(spec, dict(defaults or {}), st.get(GENERATION, Structure())),
                    BIVDIFF: Setup(bspec, dict(bivdiff_defaults or {}), st.get(BIVDIFF, Structure()))},
                   limits if isinstance(limits, Limits) else Limits(**(limits or {})), tuple(samplers) if samplers else None)
