"""The driver's set-up before any Ray work: which model folders the actors load (tiny builds for laptops and tests),
checks that fail fast with exit 2 (a scorer that cannot load), and the planning shortcut for a rerun with nothing
left to do. Only `jobs/generate.py` calls this module."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict

from jobs import config as job_config
from pipelines.config import BivdiffSpec, ModelSpec

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


def anything_to_do(cfg: job_config.JobConfig, n_rows: int, model: ModelSpec, bivdiff: BivdiffSpec, done: set[str],
                   ids_dup: set[str]) -> bool:
    """Whether some manifest row is not committed ok yet, decided in the driver with the resolve stage's own function
    (same ids) for manifests up to PLAN_IN_DRIVER_ROWS rows; larger ones are left to the Ray stage (True)."""
    import pyarrow.dataset as pads

    from operators import storage
    from operators.generate import resolve_rows

    if n_rows > PLAN_IN_DRIVER_ROWS:
        return True
    fs, path = storage.filesystem(cfg.manifest)
    table = pads.dataset(path, filesystem=storage.arrow_filesystem(fs), format="parquet").to_table()
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    kwargs = dict(defaults=dict(cfg.defaults), model=asdict(model), done=frozenset(done), duplicate_ids=frozenset(ids_dup),
                  samplers=cfg.samplers, bivdiff=asdict(bivdiff), bivdiff_defaults=dict(cfg.bivdiff.defaults),
                  limits=asdict(cfg.limits))
    return any(resolve_rows(table.slice(i, PLAN_CHUNK), **kwargs).num_rows for i in range(0, table.num_rows, PLAN_CHUNK))
