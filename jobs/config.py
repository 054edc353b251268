"""The job's configuration: YAML file + command line merged into one frozen, validated object.

Unknown keys are errors (a typo must not silently fall back to a default); per-row defaults are
validated with the same rules as manifest rows and the CLI.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as section

from pipelines import params, presets
from pipelines.bivdiff.config import BivdiffSpec, resolve_bivdiff_params
from pipelines.config import PLACEMENT, ModelSpec, resolve_params
from pipelines.params import Limits

MODEL_KEYS = tuple(f.name for f in fields(ModelSpec))
BIVDIFF_MODEL_KEYS = tuple(f.name for f in fields(BivdiffSpec) if f.name not in PLACEMENT)
DEFAULT_KEYS = params.names(params.GENERATION)
BIVDIFF_DEFAULT_KEYS = tuple(k for k in params.names(params.BIVDIFF) if k not in ("task", "source_video", "mask_video",
                                                                                   "condition_video"))


SECTION = ConfigDict(extra="forbid")  # pydantic: an unknown key is an error, types and bounds are checked
PositiveInt, Positive = Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]
NonNegativeInt, NonNegative = Annotated[int, Field(ge=0)], Annotated[float, Field(ge=0)]


@section(frozen=True, config=SECTION)
class ComputeConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"  # cuda: a GPU per actor; cpu: CPU actors; auto: cuda if any GPU
    num_actors: PositiveInt = 1  # fixed-size pool (GPU pools that autoscale ramp slowly)
    batch_size: PositiveInt = 1  # rows per actor call (Ray batch); videos are heavy, keep it small
    sampler_batch: PositiveInt = 1  # rows sampled together in one batched sampler call inside an actor
    concurrent_batches: PositiveInt = 3  # batches an actor holds: one samples, one is encoded, one uploads
    cpus_per_actor: Positive = 1.0  # leave CPUs for read/resolve tasks (without one they hang)
    max_restarts: NonNegativeInt = 16  # restarts of one actor over the run
    max_task_retries: NonNegativeInt = 1  # a batch whose worker died runs once more, then its rows alone
    autoscaling: bool = False  # the cluster adds nodes on demand: a pool bigger than today's cluster only warns
    memory_budget_gb: Positive | None = None  # what one sampler call may allocate; None: 90% of the free device memory
    row_timeout_s: Positive | None = None  # a row running longer fails and its actor is replaced; None: from its size
    retry_poisoned: bool = False  # rerun rows that killed their worker twice in an earlier run (else: failed again)


@section(frozen=True, config=SECTION)
class CommitConfig:
    every_rows: NonNegativeInt = 16  # rows per metadata part (a part is its videos' commit marker; 0: every batch)
    every_seconds: NonNegative = 60.0  # ...or this long since the last part, whichever comes first
    progress_seconds: NonNegative = 30.0  # progress line + MLflow metrics (0: every batch); heartbeat while none
    lease_ttl_s: Positive = 300.0  # a run's lease on its output prefix goes stale this long after its last heartbeat


@section(frozen=True, config=SECTION)
class OutputConfig:
    """How a run writes its videos (docs/datasets.md "WebDataset shards"); YAML `output: {uri: ..., format: ...}`."""

    format: Literal["files", "webdataset"] = "files"  # files: videos/<id>.mp4; webdataset: tar shards under shards/
    shard_max_mb: Positive = 256.0  # webdataset: a shard is cut at this much video...
    shard_max_samples: PositiveInt = 1000  # ...or this many samples...
    shard_max_seconds: Positive = 3600.0  # ...or this long after its first sample, whichever comes first
    contact_sheets: bool = True  # a contact-sheet PNG per video: contact/<id>.png (files) or a png member (webdataset)


@section(frozen=True, config=SECTION)
class ExportConfig:
    """A filtered dataset built at the end of the run (jobs/export.py), linked from the report."""

    to: str | None = None  # where it goes, "{output}" and "{run}" replaced (e.g. "{output}/filtered/{run}"); None: none
    format: Literal["files", "webdataset"] = "webdataset"
    min_clipsim: float | None = None  # the ok rows kept: at least this CLIPSIM...
    min_frame_consistency: float | None = None  # ...at least this frame consistency...
    max_flicker: float | None = None  # ...at most this flicker...
    min_subject_consistency: float | None = None  # ...at least this subject consistency...
    min_motion: float | None = None  # ...at least this motion, pixels per frame (a row without the score is left out)


@section(frozen=True, config=SECTION)
class VerifyConfig:
    """After each run: `python -m jobs.verify` over a share of the output (jobs/verify.py), damage set aside."""

    fraction: Annotated[float, Field(ge=0, le=1)] = 0.0  # shards/videos read back per run (bucket by date); 1/7: weekly
    workers: PositiveInt = 8  # objects read in parallel


@section(frozen=True, config=SECTION)
class ScoresConfig:
    enabled: bool = False  # CLIPSIM, frame and subject consistency, flicker and motion per video, in the actor
    clip_model: str = presets.DEFAULT_CLIP_MODEL  # hub id or local folder
    subject_model: str | None = presets.DEFAULT_SUBJECT_MODEL  # DINO for subject consistency: hub id, folder or null
    tiny: bool = False  # build tiny random CLIP and DINO models offline (tests, demo) instead of the two above


@section(frozen=True, config=SECTION)
class LabConfig:
    """The paired comparison of every sampler with one reference (jobs/paired.py, docs/lab.md)."""

    reference: str = "standard"  # the sampler every other is compared with, A/B group by A/B group


@section(frozen=True, config=SECTION)
class RegressionConfig:
    baseline: str | None = None  # an MLflow run id, or "last": the newest finished run of this experiment
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.05  # relative worsening of a group's mean (or success rate)


@dataclass(frozen=True)
class BivdiffSection:
    """Manifest rows with a `task` are BIVDiff rows (docs/algorithms.md §8): the models that serve them (loaded by an
    actor only when such a row reaches it; device and dtype follow `model`) and their per-row defaults."""

    spec: BivdiffSpec = BivdiffSpec()
    tiny: bool = False  # build the tiny BIVDiff model set (`python -m pipelines.fixtures.tiny bivdiff`) into tiny_cache
    defaults: Mapping[str, Any] = field(default_factory=dict)
    stage1_batch: int = 8  # frames per stage-1 pipeline call for rows with noise shared/per_frame


def _bivdiff_section(raw: Any, limits: Limits) -> BivdiffSection:
    if raw is not None and not isinstance(raw, Mapping):
        raise ValueError("config 'bivdiff': must be a mapping")
    raw = _keys("bivdiff", raw, (*BIVDIFF_MODEL_KEYS, "tiny", "defaults", "stage1_batch"))
    tiny, defaults = bool(raw.pop("tiny", False)), dict(raw.pop("defaults", None) or {})
    stage1_batch = raw.pop("stage1_batch", 8)
    if isinstance(stage1_batch, bool) or not isinstance(stage1_batch, int) or stage1_batch < 1:
        raise ValueError(f"bivdiff.stage1_batch: must be an integer >= 1, got {stage1_batch!r}")
    if tiny and set(raw) - {"vdm"}:
        raise ValueError(f"config 'bivdiff': 'tiny' builds its own models; drop {sorted(set(raw) - {'vdm'})}")
    _keys("bivdiff.defaults", defaults, BIVDIFF_DEFAULT_KEYS)
    try:
        spec = BivdiffSpec(**raw)
        resolve_bivdiff_params({"task": "external", "source_video": "validation.npy"}, defaults, limits=limits)
    except ValueError as err:
        raise ValueError(f"config 'bivdiff': {err}") from None
    return BivdiffSection(spec=spec, tiny=tiny, defaults=defaults, stage1_batch=stage1_batch)


@dataclass(frozen=True)
class JobConfig:
    manifest: str
    output: str
    model: ModelSpec
    tiny: str | None = None  # build tiny random models of this backbone (offline) and use them
    tiny_cache: str = ".cache/tiny"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    compute: ComputeConfig = ComputeConfig()
    commit: CommitConfig = CommitConfig()
    mlflow_uri: str = ""  # load(): --mlflow-uri, mlflow.uri, $MLFLOW_TRACKING_URI, else default_mlflow_uri()
    experiment: str = "ivmix"
    run_name: str | None = None
    limit: int | None = None
    fail_on_error: bool = False
    samplers: tuple[str, ...] | None = None  # A/B: every row once per sampler (a manifest `samplers` column wins)
    scores: ScoresConfig = ScoresConfig()
    regression: RegressionConfig = RegressionConfig()
    bivdiff: BivdiffSection = BivdiffSection()
    limits: Limits = Limits()
    layout: OutputConfig = OutputConfig()  # YAML `output:` as a mapping (uri + these keys), --output-format
    export: ExportConfig = ExportConfig()
    verify: VerifyConfig = VerifyConfig()
    lab: LabConfig = LabConfig()

    def record(self) -> dict:
        """Plain nested values (for the resolved-config artifact and MLflow params)."""
        out = asdict(self)
        out["defaults"] = dict(self.defaults)
        out["bivdiff"]["defaults"] = dict(self.bivdiff.defaults)
        return out


def default_mlflow_uri() -> str:
    """An embedded SQLite store in one per-user folder ($IVMIX_HOME, default ~/.local/share/ivmix), not the current
    folder: under `ray job submit` that is a temporary working dir, and nightly history must outlive it."""
    home = os.environ.get("IVMIX_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "ivmix")
    return f"sqlite:///{os.path.abspath(home)}/mlflow.db"


def _section(name: str, raw: Any, cls, overrides: Mapping[str, Any] | None = None) -> Any:
    """A config section (YAML < command line) through its pydantic dataclass; ValueError 'section.key: reason'."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ValueError(f"config '{name}': must be a mapping")
    try:
        return cls(**{**(raw or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}})
    except ValidationError as err:
        errors = err.errors()
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "unexpected_keyword_argument")
        if unknown:
            known = [f.name for f in fields(cls)]
            raise ValueError(f"config '{name}': unknown key(s) {unknown}; known: {known}") from None
        e = errors[0]
        raise ValueError(f"{name}.{e['loc'][0]}: {e['msg'][0].lower()}{e['msg'][1:]}, got {e['input']!r}") from None


def _keys(name: str, raw: Any, known) -> dict:
    unknown = sorted(set(raw or {}) - set(known))
    if unknown:
        raise ValueError(f"config{f' {name!r}' if name else ''}: unknown {'top-level ' if not name else ''}key(s) "
                         f"{unknown}; known: {list(known)}")
    return dict(raw or {})


TOP_KEYS = ("model", "tiny", "tiny_cache", "defaults", "compute", "commit", "mlflow", "manifest", "output", "limit",
            "fail_on_error", "samplers", "scores", "regression", "bivdiff", "limits", "export", "verify", "lab")


def load(args: argparse.Namespace) -> JobConfig:
    """YAML (if --config) < command line. Raises ValueError naming the bad key."""
    raw: dict[str, Any] = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise ValueError(f"--config: {args.config!r} is not a file")
        with open(args.config) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"--config: {args.config!r} must hold a YAML mapping")
    _keys("", raw, TOP_KEYS)
    cli = {k: getattr(args, k, None) for k in ("device", "num_actors", "batch_size", "sampler_batch")}
    compute = _section("compute", raw.get("compute"), ComputeConfig,
                       {**cli, "retry_poisoned": getattr(args, "retry_poisoned", None) or None})
    commit = _section("commit", raw.get("commit"), CommitConfig)
    model_raw = _keys("model", raw.get("model"), MODEL_KEYS)
    tiny, tiny_cache = raw.get("tiny"), raw.get("tiny_cache", ".cache/tiny")
    model_raw["device"] = compute.device if compute.device != "auto" else model_raw.get("device", "auto")
    if tiny:
        others = sorted(k for k in model_raw if k in ("base", "motion_adapter", "image_model"))
        if others:
            raise ValueError(f"config: 'tiny' builds its own models; drop model keys {others}")
        model_raw.pop("backbone", None)
        model = ModelSpec.from_model_dir(tiny, os.path.join(tiny_cache, tiny), **model_raw)
    else:
        model = ModelSpec(**model_raw)
    limits = _section("limits", raw.get("limits"), Limits)  # its own errors name the key: limits.max_height: ...
    defaults = _keys("defaults", raw.get("defaults"), DEFAULT_KEYS)
    try:
        resolve_params({"prompt": "validation"}, defaults, backbone=model.backbone, limits=limits)
    except ValueError as err:
        raise ValueError(f"config 'defaults': {err}") from None
    mlflow_raw = _keys("mlflow", raw.get("mlflow"), ("uri", "experiment"))
    out_raw = raw.get("output")
    out_raw = dict(out_raw) if isinstance(out_raw, Mapping) else {"uri": out_raw}
    layout = _section("output", {k: v for k, v in out_raw.items() if k != "uri"}, OutputConfig,
                      {"format": getattr(args, "output_format", None)})
    manifest, output = args.manifest or raw.get("manifest"), args.output or out_raw.get("uri")
    if not manifest:
        raise ValueError("--manifest: required (a Parquet file or folder, local path or fsspec URI)")
    if not output:
        raise ValueError("--output: required (a folder or fsspec URI prefix)")
    limit = args.limit if args.limit is not None else raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit: must be an integer >= 1, got {limit!r}")
    scores = _section("scores", raw.get("scores"), ScoresConfig, {"enabled": getattr(args, "scores", None) or None})
    regression = _section("regression", raw.get("regression"), RegressionConfig,
                          {"baseline": getattr(args, "baseline", None),
                           "threshold": getattr(args, "regression_threshold", None)})
    export = _section("export", raw.get("export"), ExportConfig)
    verify = _section("verify", raw.get("verify"), VerifyConfig)
    lab = _section("lab", raw.get("lab"), LabConfig)
    thresholds = [getattr(export, f.name) for f in fields(ExportConfig) if f.name.startswith(("min_", "max_"))]
    if export.to and not scores.enabled and any(t is not None for t in thresholds):
        raise ValueError("export: score thresholds need scores (set scores.enabled or pass --scores)")
    if regression.baseline and not scores.enabled:
        raise ValueError("regression: a baseline comparison needs scores (set scores.enabled or pass --scores)")
    return JobConfig(
        bivdiff=_bivdiff_section(raw.get("bivdiff"), limits), samplers=_samplers(getattr(args, "samplers", None) or
                                                                                 raw.get("samplers"), model.backbone),
        scores=scores, regression=regression, manifest=manifest, output=output.rstrip("/"), model=model, tiny=tiny,
        tiny_cache=tiny_cache, limits=limits, layout=layout, export=export, verify=verify, lab=lab, defaults=defaults,
        compute=compute,
        commit=commit, mlflow_uri=(args.mlflow_uri or mlflow_raw.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
                                   or default_mlflow_uri()),
        experiment=args.experiment or mlflow_raw.get("experiment") or JobConfig.experiment,
        run_name=args.run_name, limit=limit, fail_on_error=bool(args.fail_on_error or raw.get("fail_on_error", False)))


def _samplers(samplers: Any, backbone: str) -> tuple[str, ...] | None:
    """The A/B preset list (`--samplers a,b` or a YAML list): distinct presets that run on this backbone."""
    if isinstance(samplers, str):
        samplers = [s.strip() for s in samplers.split(",") if s.strip()]
    if samplers is None:
        return None
    if not samplers or len(set(samplers)) != len(samplers) or any(s not in presets.PRESETS for s in samplers):
        raise ValueError(f"--samplers: distinct preset names from {sorted(presets.PRESETS)}, got {samplers!r}")
    foreign = [s for s in samplers if presets.PRESETS[s].backbones and backbone not in presets.PRESETS[s].backbones]
    if foreign:
        raise ValueError(f"--samplers: {', '.join(foreign)} reproduce(s) another backbone's code "
                         f"({', '.join('/'.join(presets.PRESETS[s].backbones) for s in foreign)}); the {backbone} "
                         "backbone takes " + ", ".join(n for n, p in presets.PRESETS.items()
                                                       if not p.backbones or backbone in p.backbones))
    return tuple(samplers)
