"""The job's configuration: YAML file + command line merged into one frozen, validated object.

Unknown keys are errors (a typo must not silently fall back to a default); per-row defaults are
validated with the same rules as manifest rows and the CLI.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

import yaml

from pipelines import params as schema
from pipelines import presets
from pipelines.config import PLACEMENT, BivdiffSpec, Limits, ModelSpec, resolve_bivdiff_params, resolve_params

MODEL_KEYS = tuple(f.name for f in fields(ModelSpec))
BIVDIFF_MODEL_KEYS = tuple(f.name for f in fields(BivdiffSpec) if f.name not in PLACEMENT)
DEFAULT_KEYS = tuple(k for k in schema.names(schema.GENERATION) if k != "prompt")  # a job-wide prompt makes no sense
BIVDIFF_DEFAULT_KEYS = tuple(k for k in schema.names(schema.BIVDIFF) if k not in ("task", "source_video", "mask_video",
                                                                                   "condition_video"))


@dataclass(frozen=True)
class ComputeConfig:
    device: str = "auto"  # "cuda": one GPU per actor; "cpu": CPU actors (laptops, tests); "auto": cuda if the cluster has GPUs
    num_actors: int = 1  # fixed-size pool (GPU pools that autoscale ramp slowly: ecosystem pain point 1)
    batch_size: int = 1  # rows per actor call (Ray batch); videos are heavy, keep it small
    sampler_batch: int = 1  # rows sampled together in one batched sampler call inside an actor
    cpus_per_actor: float = 1.0  # leave CPUs for read/resolve tasks (pain point 3)
    max_restarts: int = 16  # restarts of one actor over the run (each batch is retried at most max_task_retries times)
    max_task_retries: int = 1  # a batch whose worker died runs once more; then its rows run one at a time (README)
    autoscaling: bool = False  # the cluster adds nodes on demand: a pool bigger than today's cluster only warns
    memory_budget_gb: float | None = None  # what one sampler call may allocate; None: 90% of what the device has free
    row_timeout_s: float | None = None  # a row running longer fails and its actor is replaced; None: from its size
    retry_poisoned: bool = False  # rerun rows that killed their worker twice in an earlier run (else: failed again)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"compute.device: must be auto, cuda or cpu, got {self.device!r}")
        for name in ("num_actors", "batch_size", "sampler_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"compute.{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise ValueError("compute.max_restarts / max_task_retries: must be >= 0")
        for name in ("memory_budget_gb", "row_timeout_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"compute.{name}: must be a number > 0 (or absent), got {v!r}")


@dataclass(frozen=True)
class CommitConfig:
    every_rows: int = 16  # rows per metadata part (a part is the commit marker of its videos)
    every_seconds: float = 60.0  # ...or this long since the last part, whichever comes first
    progress_seconds: float = 30.0  # progress log line / MLflow progress metrics
    lease_ttl_s: float = 300.0  # a run's lease on its output prefix goes stale this long after its last heartbeat


@dataclass(frozen=True)
class ScoresConfig:
    enabled: bool = False  # CLIPSIM, frame consistency and flicker per video, in the generating actor
    clip_model: str = presets.DEFAULT_CLIP_MODEL  # hub id or local folder
    tiny: bool = False  # build a tiny random CLIP offline (tests, demo) instead of clip_model


@dataclass(frozen=True)
class RegressionConfig:
    baseline: str | None = None  # an MLflow run id, or "last": the newest finished run of this experiment
    threshold: float = 0.05  # relative worsening of a group's mean score (or success rate) that counts as a regression

    def __post_init__(self) -> None:
        if not (0 < self.threshold < 1):
            raise ValueError(f"regression.threshold: must be in (0, 1), got {self.threshold!r}")


@dataclass(frozen=True)
class BivdiffSection:
    """Manifest rows with a `task` are BIVDiff rows (docs/algorithms.md §8): the models that serve them (loaded by an actor
    only when such a row reaches it; device and dtype follow `model`) and their per-row defaults."""

    spec: BivdiffSpec = BivdiffSpec()
    tiny: bool = False  # build the tiny BIVDiff model set (`python -m pipelines.tiny bivdiff`) into tiny_cache
    defaults: Mapping[str, Any] = field(default_factory=dict)
    stage1_batch: int = 8  # frames per stage-1 pipeline call for rows with noise shared/per_frame


def _bivdiff_section(raw: Any, limits: Limits) -> BivdiffSection:
    if raw is None:
        return BivdiffSection()
    if not isinstance(raw, Mapping):
        raise ValueError("config 'bivdiff': must be a mapping")
    raw = dict(raw)
    extra = ("tiny", "defaults", "stage1_batch")
    unknown = sorted(set(raw) - set(BIVDIFF_MODEL_KEYS) - set(extra))
    if unknown:
        raise ValueError(f"config 'bivdiff': unknown key(s) {unknown}; known: {[*BIVDIFF_MODEL_KEYS, *extra]}")
    tiny, defaults = bool(raw.pop("tiny", False)), dict(raw.pop("defaults", None) or {})
    stage1_batch = raw.pop("stage1_batch", 8)
    if isinstance(stage1_batch, bool) or not isinstance(stage1_batch, int) or stage1_batch < 1:
        raise ValueError(f"config 'bivdiff.stage1_batch': must be an integer >= 1, got {stage1_batch!r}")
    if tiny and set(raw) - {"vdm"}:
        raise ValueError(f"config 'bivdiff': 'tiny' builds its own models; drop {sorted(set(raw) - {'vdm'})}")
    unknown = sorted(set(defaults) - set(BIVDIFF_DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"config 'bivdiff.defaults': unknown key(s) {unknown}; known: {list(BIVDIFF_DEFAULT_KEYS)}")
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


def _section(name: str, raw: Any, cls) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ValueError(f"config '{name}': must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"config '{name}': unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**raw)
    except TypeError as err:
        raise ValueError(f"config '{name}': {err}") from None


TOP_KEYS = ("model", "tiny", "tiny_cache", "defaults", "compute", "commit", "mlflow", "manifest", "output", "limit",
            "fail_on_error", "samplers", "scores", "regression", "bivdiff", "limits")


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
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"config: unknown top-level key(s) {unknown}; known: {list(TOP_KEYS)}")
    compute = _section("compute", raw.get("compute"), ComputeConfig)
    cli_compute = {k: getattr(args, k) for k in ("device", "num_actors", "batch_size", "sampler_batch") if getattr(args, k, None) is not None}
    if getattr(args, "retry_poisoned", False):
        cli_compute["retry_poisoned"] = True
    compute = replace(compute, **cli_compute)
    commit = _section("commit", raw.get("commit"), CommitConfig)
    model_raw = dict(raw.get("model") or {})
    unknown = sorted(set(model_raw) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"config 'model': unknown key(s) {unknown}; known: {list(MODEL_KEYS)}")
    tiny = raw.get("tiny")
    tiny_cache = raw.get("tiny_cache", ".cache/tiny")
    device = "cpu" if compute.device == "cpu" else ("cuda" if compute.device == "cuda" else model_raw.get("device", "auto"))
    model_raw["device"] = device
    if tiny:
        others = sorted(k for k in model_raw if k in ("base", "motion_adapter", "image_model"))
        if others:
            raise ValueError(f"config: 'tiny' builds its own models; drop model keys {others}")
        model_raw.pop("backbone", None)
        model = ModelSpec.from_model_dir(tiny, os.path.join(tiny_cache, tiny), **model_raw)
    else:
        model = ModelSpec(**model_raw)
    limits = _section("limits", raw.get("limits"), Limits)  # its own errors name the key: limits.max_height: ...
    defaults = dict(raw.get("defaults") or {})
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS) - {"prompt"})
    if unknown:
        raise ValueError(f"config 'defaults': unknown key(s) {unknown}; known: {list(DEFAULT_KEYS)}")
    try:
        resolve_params({"prompt": "validation"}, defaults, backbone=model.backbone, limits=limits)
    except ValueError as err:
        raise ValueError(f"config 'defaults': {err}") from None
    mlflow_raw = dict(raw.get("mlflow") or {})
    unknown = sorted(set(mlflow_raw) - {"uri", "experiment"})
    if unknown:
        raise ValueError(f"config 'mlflow': unknown key(s) {unknown}; known: ['uri', 'experiment']")
    manifest = args.manifest or raw.get("manifest")
    output = args.output or raw.get("output")
    if not manifest:
        raise ValueError("--manifest: required (a Parquet file or folder, local path or fsspec URI)")
    if not output:
        raise ValueError("--output: required (a folder or fsspec URI prefix)")
    limit = args.limit if args.limit is not None else raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit: must be an integer >= 1, got {limit!r}")
    scores = _section("scores", raw.get("scores"), ScoresConfig)
    if getattr(args, "scores", False):
        scores = replace(scores, enabled=True)
    regression = _section("regression", raw.get("regression"), RegressionConfig)
    if getattr(args, "baseline", None):
        regression = replace(regression, baseline=args.baseline)
    if getattr(args, "regression_threshold", None) is not None:
        regression = replace(regression, threshold=args.regression_threshold)
    if regression.baseline and not scores.enabled:
        raise ValueError("regression: a baseline comparison needs scores (set scores.enabled or pass --scores)")
    samplers = getattr(args, "samplers", None) or raw.get("samplers")
    if isinstance(samplers, str):
        samplers = [s.strip() for s in samplers.split(",") if s.strip()]
    if samplers is not None:
        unknown = [s for s in samplers if s not in presets.PRESETS]
        if unknown or len(set(samplers)) != len(samplers) or not samplers:
            raise ValueError(f"--samplers: distinct preset names from {sorted(presets.PRESETS)}, got {samplers!r}")
        foreign = [s for s in samplers if presets.PRESETS[s].backbones and model.backbone not in presets.PRESETS[s].backbones]
        if foreign:
            raise ValueError(f"--samplers: {', '.join(foreign)} reproduce(s) another backbone's code "
                             f"({', '.join('/'.join(presets.PRESETS[s].backbones) for s in foreign)}); the {model.backbone} "
                             "backbone takes " + ", ".join(n for n, p in presets.PRESETS.items()
                                                        if not p.backbones or model.backbone in p.backbones))
        samplers = tuple(samplers)
    return JobConfig(
        bivdiff=_bivdiff_section(raw.get("bivdiff"), limits),
        samplers=samplers, scores=scores, regression=regression,
        manifest=manifest, output=output.rstrip("/"), model=model, tiny=tiny, tiny_cache=tiny_cache, limits=limits,
        defaults=defaults, compute=compute, commit=commit,
        mlflow_uri=args.mlflow_uri or mlflow_raw.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(),
        experiment=args.experiment or mlflow_raw.get("experiment") or JobConfig.experiment,
        run_name=args.run_name, limit=limit,
        fail_on_error=bool(args.fail_on_error or raw.get("fail_on_error", False)),
    )
