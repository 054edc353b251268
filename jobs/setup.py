"""The driver's set-up before any Ray work: which model folders the actors load (tiny builds for laptops and tests),
checks that fail fast with exit 2 (a scorer that cannot load), the manifest read once, the plan (what is left to run)
and the planning shortcut for a rerun with nothing left to do. The run as its parts see it is `Run` (frozen: each
stage of the driver makes a new one); its one mutable state, the ids it has recorded, is `Recorded`. Only the driver
(`jobs/`) uses this module."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from jobs import config as job_config
from operators import resume, storage
from operators.kinds import KIND_COLUMNS, Setup, kinds_present
from operators.layout import Layout
from operators.manifest import read_schema
from operators.resolve import Resolver, expand_samplers, resolve_rows
from operators.scoring import ClipScorer, ScoreModels, SubjectScorer
from pipelines.backbones.registry import structure
from pipelines.bivdiff.config import BivdiffSpec
from pipelines.config import PLACEMENT, ModelSpec
from pipelines.fixtures.tiny import ensure_tiny
from pipelines.params import BIVDIFF, CPU_SECONDS_PER_UNIT, GENERATION, SLOW_ON_CPU, cpu_units

logger = logging.getLogger(__name__)
# up to this many manifest rows the driver reads the manifest whole: it checks for work itself before starting Ray and
# hands the rows left to Ray Data (docs/job.md "Resume"); IVMIX_PLAN_IN_DRIVER_ROWS sets another bound (0: never)
PLAN_IN_DRIVER_ROWS = 100_000
PLAN_CHUNK = 256  # rows resolved at a time; the check stops at the first chunk with work in it
COUNT_IN_DRIVER_ROWS = 10_000  # up to this many manifest rows the driver counts the rows to run exactly (~2.5 s)
SIZE_CHECK_ROWS = 10_000  # rows the CPU-size check resolves in the driver (about 1.5 s)


def models(cfg: job_config.JobConfig, bivdiff_rows: bool) -> tuple[ModelSpec, BivdiffSpec, ScoreModels | None]:
    """(generation models, BIVDiff models, the scorers' models or None), tiny sets built into tiny_cache first."""
    model, bivdiff = cfg.model, cfg.bivdiff.spec
    if cfg.tiny:  # build first, then read the folder's layout (which optional parts it has)
        folder = os.path.abspath(ensure_tiny(cfg.tiny, os.path.join(cfg.tiny_cache, cfg.tiny)))
        keep = {k: getattr(model, k) for k in ("vae", "lora", "lora_scale", *PLACEMENT)}
        model = ModelSpec.from_model_dir(cfg.tiny, folder, **keep)
    if cfg.bivdiff.tiny and bivdiff_rows:
        folder = os.path.abspath(ensure_tiny("bivdiff", os.path.join(cfg.tiny_cache, "bivdiff")))
        bivdiff = BivdiffSpec.from_model_dir(folder, vdm=bivdiff.vdm)
    scorer = None
    if cfg.scores.enabled:
        if cfg.scores.tiny:
            scorer = ScoreModels(*(os.path.abspath(ensure_tiny(k, os.path.join(cfg.tiny_cache, k)))
                                   for k in ("clip", "dino")))
        else:
            scorer = ScoreModels(cfg.scores.clip_model, cfg.scores.subject_model)
    return model, bivdiff, scorer


def check_scorer(models: ScoreModels) -> None:
    """Load each scorer model once here, so that a model that cannot load stops the job before any video is made."""
    for key, source, load in (("clip_model", models.clip, ClipScorer), ("subject_model", models.subject,
                                                                        SubjectScorer)):
        if source is None:
            continue
        try:
            load(source, "cpu")
        except Exception as err:  # a missing folder, no hub access, a broken checkpoint
            text = " ".join(str(err).split())[:300]
            raise ValueError(f"scores.{key}: {source!r} cannot be loaded ({type(err).__name__}: {text})") from None


@dataclass(frozen=True)
class Manifest:
    """What the driver knows of the manifest after its one read: row count, its ids and duplicate ids (Arrow, never
    Python sets), the row kinds present, whether it has per-row A/B groups, and (up to PLAN_IN_DRIVER_ROWS rows) the
    rows themselves, for the exact nothing-to-do check of rows whose id is only known after resolving."""

    rows: int
    duplicate_ids: pa.Array  # ids that appear in more than one row
    kinds: tuple[str, ...]
    table: pa.Table | None = None
    ids: pa.ChunkedArray | None = None  # after --limit; None without an id column
    groups: bool = False  # a non-null `samplers` column: ids are <id>-<sampler>


def read_manifest(cfg: job_config.JobConfig) -> Manifest:
    """Check the manifest's schema (ManifestError) and read it once: `id` and the columns that decide a row's kind
    (Arrow, about 25 bytes a row), and every column when it is small enough to plan in the driver."""
    schema, n = read_schema(cfg.manifest)
    fs, path = storage.filesystem(cfg.manifest)
    dataset = pads.dataset(path, filesystem=storage.arrow_filesystem(fs), format="parquet")
    small = n <= int(os.environ.get("IVMIX_PLAN_IN_DRIVER_ROWS", PLAN_IN_DRIVER_ROWS))
    table = dataset.to_table(columns=None if small else [c for c in ("id", "samplers", *KIND_COLUMNS)
                                                         if c in schema.names], use_threads=storage.arrow_threads(fs))
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    ids, dups = None, pa.array([], pa.string())
    if "id" in schema.names:
        ids = table.column("id")
        dups = duplicates(ids)
    groups = "samplers" in schema.names and table.column("samplers").null_count < table.num_rows
    return Manifest(n, dups, kinds_present(table), table if small else None, ids, groups)


def duplicates(ids: pa.ChunkedArray) -> pa.Array:
    """The ids that appear more than once (Arrow): sorted, then neighbours compared (half the memory of a hash
    count on 10M ids)."""
    ids = ids.drop_null()
    if len(ids) < 2:
        return pa.array([], pa.string())
    ordered = ids.take(pc.sort_indices(ids)).combine_chunks()
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    return pc.unique(ordered.slice(1).filter(same))


@dataclass(frozen=True)
class Plan:
    """The manifest rows left to run, decided in Arrow: a row whose manifest id is committed ok is skipped without
    resolving it (one hash anti-join over the whole manifest). `keep` is a mask over the manifest's rows (after
    --limit); `resolve_done` says some kept rows get their id only when resolved (no id column or null ids, A/B
    groups), so the resolve stage must still check them against the committed ids."""

    keep: pa.Array | None  # bool, one per manifest row; None: every row
    pending: int
    resolve_done: bool


def plan(cfg: job_config.JobConfig, manifest: Manifest, done: pa.Array) -> Plan:
    n = min(manifest.rows, cfg.limit or manifest.rows)
    ids = manifest.ids
    groups = bool(cfg.samplers) or manifest.groups  # ids are <id>-<sampler>: known once resolved
    resolve_done = ids is None or groups or ids.null_count > 0
    if ids is None or groups or not len(done):
        return Plan(None, n, resolve_done)
    ids = ids.combine_chunks()
    skip = pc.and_(pc.is_in(ids, value_set=done), pc.invert(pc.is_in(ids, value_set=manifest.duplicate_ids)))
    keep = pc.invert(pc.fill_null(skip, False))
    return Plan(keep, pc.sum(keep).as_py() or 0, resolve_done)


def write_todo(run: "Run", dest: str) -> str:
    """The manifest's rows left to run (`run.plan.keep`), streamed batch by batch into one Parquet file at `dest`
    (this run's scratch): what the Ray stage reads instead of the manifest, so that a rerun of a 10M-row manifest
    with two rows missing resolves two rows."""
    mfs, mpath = storage.filesystem(run.cfg.manifest)
    dataset = pads.dataset(mpath, filesystem=storage.arrow_filesystem(mfs), format="parquet")
    keep, start = run.plan.keep, 0
    limit = min(run.manifest.rows, run.cfg.limit or run.manifest.rows)
    run.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
    with run.fs.open(dest, "wb") as f, pq.ParquetWriter(f, dataset.schema) as writer:
        for batch in dataset.to_batches(batch_size=65536, use_threads=False):
            take = min(batch.num_rows, limit - start)
            if take <= 0:
                break
            part = batch.slice(0, take)
            if keep is not None:
                part = part.filter(keep.slice(start, take))
            start += batch.num_rows
            writer.write_batch(part)
    return storage.full_uri(run.fs, dest)


def committed(cfg: job_config.JobConfig, fs: fsspec.AbstractFileSystem, root: str) -> resume.Committed:
    """What the output prefix holds; with --retry-poisoned, no row counts as poisoned."""
    found = resume.committed(fs, root)
    return replace(found, poisoned=resume.Committed.empty().poisoned) if cfg.compute.retry_poisoned else found


@dataclass(frozen=True)
class Run:
    """One run of the job, as its parts see it: the config, the manifest read once, how rows resolve, the output
    prefix (`layout`: its paths, with this run's scratch once the MLflow run exists), what is committed there and what
    is left to run. Each stage of the driver makes a new one: `replanned` (after a killed run's samples were
    committed), `on_device` (once Ray says where actors run), `started` (the MLflow run's id), `with_todo`."""

    cfg: job_config.JobConfig
    manifest: Manifest
    resolver: Resolver
    fs: fsspec.AbstractFileSystem
    layout: Layout
    committed: resume.Committed  # done / poisoned ids (Arrow) and the shards metadata names
    plan: Plan
    scorer: ScoreModels | None  # the scorers' models, None without scores
    run_name: str
    version: str  # the code version recorded in every row
    device: str = "none"  # "cuda" or "cpu" once Ray has started
    todo: str | None = None  # the planned rows' Parquet in this run's scratch (None: the manifest itself)

    @property
    def root(self) -> str:
        return self.layout.root

    @property
    def run_id(self) -> str:
        """The MLflow run's id ("" before it exists): the run's scratch folder and every row's `run_id`."""
        return self.layout.run

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.manifest.kinds

    @property
    def done(self) -> pa.Array:
        return self.committed.done

    @property
    def planned(self) -> pa.Table | None:
        """The manifest rows left to run, when the driver holds the manifest (up to PLAN_IN_DRIVER_ROWS rows)."""
        table, keep = self.manifest.table, self.plan.keep
        return table if table is None or keep is None else table.filter(keep)

    def replanned(self) -> "Run":
        """After samples of a killed run were packed and committed: what is done now, and what is left to run."""
        found = replace(resume.committed(self.fs, self.root), poisoned=self.committed.poisoned)
        return replace(self, committed=found, plan=plan(self.cfg, self.manifest, found.done))

    def on_device(self, device: str) -> "Run":
        """The resolved device ("cuda" or "cpu") set on every kind's model spec (BIVDiff follows the generation
        model's dtype and decode chunk)."""
        gen = replace(self.resolver.setups[GENERATION].spec, device=device)
        biv = replace(self.resolver.setups[BIVDIFF].spec, device=device, dtype=gen.dtype,
                      decode_chunk=gen.decode_chunk)
        specs = {GENERATION: gen, BIVDIFF: biv}
        setups = {k: Setup(specs[k], s.defaults, s.structure) for k, s in self.resolver.setups.items()}
        return replace(self, device=device, resolver=replace(self.resolver, setups=setups))

    def started(self, run_id: str) -> "Run":
        return replace(self, layout=self.layout.for_run(run_id))

    def with_todo(self) -> "Run":
        """The rows left to run written to this run's scratch (only when the plan skips some rows of a manifest too big
        for the driver to hold)."""
        if self.plan.keep is None or self.manifest.table is not None:
            return self
        return replace(self, todo=write_todo(self, self.layout.todo))


@dataclass
class Recorded:
    """The run's one mutable state: the ids it has recorded so far, as Arrow arrays (the retry passes skip them)."""

    chunks: list[pa.Array] = field(default_factory=list)

    def add(self, ids: pa.Array) -> None:
        self.chunks.append(ids)

    @property
    def ids(self) -> pa.Array | None:
        """Every recorded id, or None before any."""
        return pa.chunked_array(self.chunks, pa.string()).combine_chunks() if self.chunks else None


def resolver(cfg: job_config.JobConfig, model: ModelSpec, bivdiff: BivdiffSpec, kinds: tuple[str, ...]) -> Resolver:
    """The run's row resolver, with each present kind's structural facts read from its model configs (no weights)."""
    structures = {}
    if GENERATION in kinds:
        structures[GENERATION] = structure(model)
    if BIVDIFF in kinds:
        structures[BIVDIFF] = structure(bivdiff.model_spec())
    return Resolver.build(model, bivdiff, defaults=cfg.defaults, bivdiff_defaults=cfg.bivdiff.defaults,
                          limits=cfg.limits, samplers=cfg.samplers, structures=structures)


def duplicate_lines(manifest: Manifest, named: int = 5) -> list[str]:
    """The console's word on ids that several manifest rows share: each such row is recorded failed, and the output
    (and its report and quality figures, which count ids) holds one row per id."""
    dups = manifest.duplicate_ids
    if not len(dups):
        return []
    ids = manifest.ids.combine_chunks()
    rows = pc.sum(pc.is_in(ids, value_set=dups)).as_py()
    shown = ", ".join(repr(i) for i in dups.slice(0, named).to_pylist()) + (", ..." if len(dups) > named else "")
    return [f"manifest: {rows} rows share {len(dups)} id(s) ({shown}); each is recorded failed (ids must be unique), "
            "so the progress line counts those rows and the report and quality figures, one row per id"]


def rows_to_run(run: Run) -> tuple[int, bool]:
    """(the rows this run will record, whether the count is exact): what the console's "row(s) to run" and the
    progress line's total both say (docs/job.md "Console"). A row is an output row: an A/B manifest row counts once
    per sampler, a duplicate or invalid row counts (it is recorded failed). Rows whose id is only known once resolved
    are resolved here with the resolve stage's own function, on manifests up to COUNT_IN_DRIVER_ROWS rows; beyond,
    the count is the rows times the samplers less the committed ids (an estimate), and the nothing-to-do check stops
    at the first chunk with work in it."""
    samplers = len(run.cfg.samplers or [None])
    if not run.plan.pending:
        return 0, True
    if not run.plan.resolve_done:
        return run.plan.pending * samplers, True
    table = run.planned

    def resolved(chunk: pa.Table) -> int:
        return resolve_rows(chunk, run.resolver, done=run.done, duplicate_ids=run.manifest.duplicate_ids).num_rows

    if table is not None and table.num_rows <= COUNT_IN_DRIVER_ROWS:
        return sum(resolved(table.slice(i, PLAN_CHUNK)) for i in range(0, table.num_rows, PLAN_CHUNK)), True
    estimate = max(run.plan.pending * samplers - len(run.done), 0)
    if table is None:
        return max(estimate, 1), False
    work = any(resolved(table.slice(i, PLAN_CHUNK)) for i in range(0, table.num_rows, PLAN_CHUNK))
    return (max(estimate, 1) if work else 0), not work


def slow_on_cpu(run: Run) -> str | None:
    """The warning for a run whose rows are too big for CPU actors (docs/job.md "Console"): how many of the rows left
    (the first SIZE_CHECK_ROWS of a manifest the driver holds) would run past a minute each, the largest, and a
    lower bound of the time from the tiny models' pace. A warning, not a refusal: a user may mean it."""
    table = run.planned
    if run.device != "cpu" or table is None:
        return None
    checked = min(table.num_rows, SIZE_CHECK_ROWS)
    sizes = [r["params"] for row in table.slice(0, checked).to_pylist() for r in expand_samplers(row, run.resolver)
             if r["status"] == "pending" and cpu_units(r["params"]) > SLOW_ON_CPU]
    if not sizes:
        return None
    big = max(sizes, key=cpu_units)
    hours = sum(map(cpu_units, sizes)) * CPU_SECONDS_PER_UNIT / 3600 / run.cfg.compute.num_actors
    of = f" of the first {checked}" if checked < table.num_rows else ""
    return (f"{len(sizes)} row(s){of} run at sizes up to {big.frames} x {big.height}x{big.width}, {big.steps} steps on "
            f"CPU actors: at least {hours:.1f} h with {run.cfg.compute.num_actors} actor(s), even with tiny models; "
            "for a try-out give the config smaller `defaults` (and `bivdiff.defaults`), e.g. {steps: 5, frames: 4, "
            "height: 64, width: 64}")
