"""The driver's set-up before any Ray work: which model folders the actors load (tiny builds for laptops and tests),
checks that fail fast with exit 2 (a scorer that cannot load), and the planning shortcut for a rerun with nothing
left to do. Only `jobs/generate.py` calls this module."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

from jobs import config as job_config
from pipelines.bivdiff.config import BivdiffSpec
from pipelines.config import ModelSpec
from pipelines.params import BIVDIFF, GENERATION

logger = logging.getLogger(__name__)
PLAN_IN_DRIVER_ROWS = 100_000  # up to this many manifest rows the driver checks for work itself before starting Ray
PLAN_CHUNK = 256  # rows resolved at a time; the check stops at the first chunk with work in it


def models(cfg: job_config.JobConfig, bivdiff_rows: bool) -> tuple[ModelSpec, BivdiffSpec, str | None]:
    """(generation models, BIVDiff models, CLIP scorer source or None), tiny sets built into tiny_cache first."""
    from pipelines.tiny import ensure_tiny

    model, bivdiff = cfg.model, cfg.bivdiff.spec
    if cfg.tiny:  # build first, then read the folder's layout (which optional parts it has)
        folder = os.path.abspath(ensure_tiny(cfg.tiny, os.path.join(cfg.tiny_cache, cfg.tiny)))
        keep = {k: getattr(model, k) for k in ("vae", "lora", "lora_scale", "dtype", "device", "decode_chunk")}
        model = ModelSpec.from_model_dir(cfg.tiny, folder, **keep)
    if cfg.bivdiff.tiny and bivdiff_rows:
        folder = os.path.abspath(ensure_tiny("bivdiff", os.path.join(cfg.tiny_cache, "bivdiff")))
        bivdiff = BivdiffSpec.from_model_dir(folder, vdm=bivdiff.vdm)
    scorer = None
    if cfg.scores.enabled:
        scorer = (os.path.abspath(ensure_tiny("clip", os.path.join(cfg.tiny_cache, "clip"))) if cfg.scores.tiny
                  else cfg.scores.clip_model)
    return model, bivdiff, scorer


def check_scorer(source: str) -> None:
    """Load the CLIP scorer once here, so that a model that cannot load stops the job before any video is made."""
    from operators.scoring import ClipScorer

    try:
        ClipScorer(source, "cpu")
    except Exception as err:  # noqa: BLE001 - a missing folder, no hub access, a broken checkpoint
        text = " ".join(str(err).split())[:300]
        raise ValueError(f"scores.clip_model: {source!r} cannot be loaded ({type(err).__name__}: {text})") from None


@dataclass
class Manifest:
    """What the driver knows of the manifest after its one read: row count, duplicate ids, the row kinds present, and
    (up to PLAN_IN_DRIVER_ROWS rows, or with --limit) the rows themselves, for the nothing-to-do check."""

    rows: int
    duplicate_ids: set[str]
    kinds: tuple[str, ...]
    table: Any = None


def read_manifest(cfg: job_config.JobConfig) -> Manifest:
    """Check the manifest's schema (ManifestError) and read it once: every column when it is small enough to plan in
    the driver, else only `id` and the columns that decide a row's kind."""
    import pyarrow.dataset as pads

    from operators import storage
    from operators.kinds import KIND_COLUMNS, kinds_present
    from operators.manifest import duplicated, read_schema

    schema, n = read_schema(cfg.manifest)
    fs, path = storage.filesystem(cfg.manifest)
    dataset = pads.dataset(path, filesystem=storage.arrow_filesystem(fs), format="parquet")
    small = n <= PLAN_IN_DRIVER_ROWS
    table = dataset.to_table(columns=None if small else [c for c in ("id", *KIND_COLUMNS) if c in schema.names])
    ids = table.column("id").to_pylist() if "id" in schema.names else []
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    return Manifest(n, duplicated(ids), kinds_present(table), table if small else None)


@dataclass
class RunContext:
    """One run of the job, as its parts see it: the config, the output prefix, how rows resolve, what is done."""

    cfg: job_config.JobConfig
    manifest: Manifest
    resolver: Any  # operators.kinds.Resolver
    fs: Any
    root: str
    done: set[str]
    poisoned: set[str]
    scorer: str | None
    run_name: str
    device: str = "cpu"
    run_id: str = ""
    version: str = ""
    seen: set[str] = field(default_factory=set)  # ids this run has recorded (the retry passes skip them)

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.manifest.kinds

    def with_device(self, device: str) -> "RunContext":
        """The resolved device ("cuda" or "cpu") set on every kind's model spec (BIVDiff follows the generation model's
        dtype and decode chunk)."""
        from operators.kinds import Setup

        gen = replace(self.resolver.setups[GENERATION].spec, device=device)
        biv = replace(self.resolver.setups[BIVDIFF].spec, device=device, dtype=gen.dtype, decode_chunk=gen.decode_chunk)
        specs = {GENERATION: gen, BIVDIFF: biv}
        setups = {k: Setup(specs[k], s.defaults, s.structure) for k, s in self.resolver.setups.items()}
        return replace(self, device=device, resolver=replace(self.resolver, setups=setups))


def resolver(cfg: job_config.JobConfig, model: ModelSpec, bivdiff: BivdiffSpec, kinds: tuple[str, ...]):
    """The run's row resolver, with each present kind's structural facts read from its model configs (no weights)."""
    from operators.kinds import Resolver
    from pipelines.backbones import structure

    structures = {}
    if GENERATION in kinds:
        structures[GENERATION] = structure(model)
    if BIVDIFF in kinds:
        structures[BIVDIFF] = structure(bivdiff.model_spec())
    return Resolver.build(model, bivdiff, defaults=cfg.defaults, bivdiff_defaults=cfg.bivdiff.defaults, limits=cfg.limits,
                          samplers=cfg.samplers, structures=structures)


def anything_to_do(ctx: RunContext) -> bool:
    """Whether some manifest row is not committed ok yet, decided in the driver with the resolve stage's own function
    (same ids) for manifests up to PLAN_IN_DRIVER_ROWS rows; larger ones are left to the Ray stage (True)."""
    from operators.generate import resolve_rows

    table = ctx.manifest.table
    if table is None:
        return True
    return any(resolve_rows(table.slice(i, PLAN_CHUNK), ctx.resolver, done=frozenset(ctx.done),
                            duplicate_ids=frozenset(ctx.manifest.duplicate_ids)).num_rows
               for i in range(0, table.num_rows, PLAN_CHUNK))
