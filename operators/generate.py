"""Ray Data operators for batch generation.

`resolve_rows` (stateless task): validates each manifest row with the CLI's rules, gives it an id,
drops rows already committed. `VideoGenerator` (callable class, one per actor): loads the backbone
once, samples, encodes H.264 mp4, uploads, and returns one small metadata row per input row. Errors
are values: a failing row comes back with status "failed" and its reason; video bytes never enter
Ray's object store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Mapping

import pyarrow as pa

from pipelines.config import BivdiffParams, BivdiffSpec, ModelSpec, resolve_bivdiff_params, resolve_params, spec_json

from . import metadata, storage
from .manifest import COLUMNS, expand_samplers

logger = logging.getLogger(__name__)
INTERNAL = ("_id", "_status", "_error", "_params", "_pair", "_sampler")


def passthrough_columns(table: pa.Table) -> list[str]:
    return [c for c in table.column_names if c not in COLUMNS and c not in INTERNAL]


def resolve_rows(batch: pa.Table, *, defaults: Mapping[str, Any], model: Mapping[str, Any], done: frozenset = frozenset(),
                 duplicate_ids: frozenset = frozenset(), spatial_factor: int = 8, samplers: tuple | None = None,
                 bivdiff: Mapping[str, Any] | None = None, bivdiff_defaults: Mapping[str, Any] | None = None) -> pa.Table:
    """Add _id/_status/_error/_params/_pair; expand A/B groups (one row per sampler); drop rows already committed ok."""
    spec = ModelSpec(**model)
    bspec = BivdiffSpec(**bivdiff) if bivdiff else BivdiffSpec()
    src, resolved = [], []
    for i, row in enumerate(batch.to_pylist()):
        for r in expand_samplers(row, defaults, spec, samplers, spatial_factor, bspec, bivdiff_defaults):
            if r["params_json"]:
                r["sampler"] = json.loads(r["params_json"]).get("sampler")
            if r["status"] == "pending" and (row.get("id") in duplicate_ids or r["id"] in duplicate_ids):
                r.update(status="failed", error=f"id: {row.get('id') or r['id']!r} appears in more than one manifest row; "
                         "ids must be unique", params_json=None)
            if r["status"] == "pending" and r["id"] not in done and row.get("task") is not None:
                missing = _missing_input(json.loads(r["params_json"]))
                if missing:
                    r.update(status="failed", error=missing, params_json=None)
            if not (r["status"] == "pending" and r["id"] in done):
                src.append(i)
                resolved.append(r)
    out = batch.take(pa.array(src, type=pa.int64()))
    for name, key in (("_id", "id"), ("_status", "status"), ("_error", "error"), ("_params", "params_json"), ("_pair", "pair_id"),
                      ("_sampler", "sampler")):
        out = out.append_column(pa.field(name, pa.string()), pa.array([r.get(key) for r in resolved], type=pa.string()))
    return out


def _missing_input(params: Mapping[str, Any]) -> str | None:
    """A BIVDiff row's first input URI that certainly does not exist (checked here, before any GPU work); storage
    errors other than 'not found' are left to the actor, which reads the files anyway."""
    for name in ("source_video", "mask_video", "condition_video"):
        uri = params.get(name)
        if uri is None:
            continue
        try:
            fs, path = storage.filesystem(uri)
            if not fs.exists(path):
                return f"{name}: {uri!r} does not exist"
        except Exception:  # noqa: BLE001 - e.g. no credentials in this task: the actor will say
            continue
    return None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class VideoGenerator:
    """One actor: `__call__` handles a batch of rows. The models named by the job config load on first use, once:
    the generation backbone for prompt rows, the BIVDiff set for rows with a `task`."""

    def __init__(self, model: Mapping[str, Any], output: str, run_id: str, code_version: str, sampler_batch: int = 1,
                 scorer: str | None = None, bivdiff: Mapping[str, Any] | None = None, bivdiff_stage1_batch: int = 8):
        from pipelines.backbones.common import resolve_placement
        from pipelines.cli import quiet_libraries

        quiet_libraries()  # no per-file load bars or advisory warnings in the worker logs the driver prints
        self.spec = ModelSpec(**model)
        self.bivdiff_spec = BivdiffSpec(**bivdiff) if bivdiff else BivdiffSpec(device=self.spec.device, dtype=self.spec.dtype)
        self.model_json, self.bivdiff_json = spec_json(self.spec), spec_json(self.bivdiff_spec)
        self.device = resolve_placement(self.spec.device, self.spec.dtype)[0]
        self._backbone = self._bivdiff = self._scorer = self._scorer_error = None
        self.scorer_source = scorer
        self.fs, self.root = storage.filesystem(output)
        self.run_id, self.code_version, self.sampler_batch = run_id, code_version, sampler_batch
        self.stage1_batch = bivdiff_stage1_batch

    @property
    def backbone(self):
        if self._backbone is None:
            from pipelines.backbones import load_backbone

            self._backbone = load_backbone(self.spec)
        return self._backbone

    @property
    def bivdiff(self):
        if self._bivdiff is None:
            from pipelines.bivdiff.runner import BIVDiff

            self._bivdiff = BIVDiff(self.bivdiff_spec, stage1_batch=self.stage1_batch)
        return self._bivdiff

    @property
    def scorer(self):
        """The CLIP scorer, loaded on first use; a load failure is remembered and raised again for every video (the
        caller turns it into `score_error`, never into a lost video)."""
        if self._scorer is None and self._scorer_error is None:
            from .scoring import ClipScorer

            try:
                self._scorer = ClipScorer(self.scorer_source, self.device)
            except Exception as err:  # noqa: BLE001
                self._scorer_error = f"{type(err).__name__} while loading the scorer: {' '.join(str(err).split())[:300]}"
        if self._scorer_error:
            raise RuntimeError(self._scorer_error)
        return self._scorer

    def _meta(self, rid: str, status: str, error: str | None, params=None, **extra) -> dict:
        kind = extra.pop("kind", None)  # for rows without resolved params
        bv = isinstance(params, BivdiffParams) or kind == "bivdiff"
        row = {"id": rid, "status": status, "error": error, "code_version": self.code_version, "run_id": self.run_id,
               "backbone": f"bivdiff/{self.bivdiff_spec.vdm}" if bv else self.spec.backbone,
               "model_spec": self.bivdiff_json if bv else self.model_json, "finished_at": metadata.now()}
        if params is not None:
            row.update(params.record())
        row.update(extra)
        return row

    def _publish(self, result, rid: str) -> dict:
        """Encode, upload, describe one video."""
        from pipelines.video import contact_sheet, png_bytes, write_mp4

        p = result.params
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "video.mp4")
            size = write_mp4(result.frames, local, p.fps)
            digest = _sha256(local)
            dest = storage.join(metadata.videos_dir(self.root), f"{rid}.mp4")
            storage.put_file(self.fs, local, dest, self.root)
        sheet = storage.join(metadata.contact_dir(self.root), f"{rid}.png")
        storage.put_bytes(self.fs, png_bytes(contact_sheet(result.frames)), sheet, self.root)
        return dict(video_uri=storage.full_uri(self.fs, dest), bytes=size, sha256=digest, contact_uri=storage.full_uri(self.fs, sheet),
                    seconds=result.seconds + time.perf_counter() - start, model_calls=result.total_calls,
                    calls_idm=result.calls["I"], calls_vdm=result.calls["V"], nfe=result.nfe)

    def _sample(self, items: list[tuple[int, str, Any]]) -> dict[int, dict]:
        """Sample a structurally uniform group; on failure fall back to one row at a time."""
        from pipelines.generate import generate

        out: dict[int, dict] = {}
        try:
            results = generate(self.backbone, [p for _, _, p in items])
        except Exception as err:  # noqa: BLE001 - errors become row values
            if len(items) > 1:
                for item in items:
                    out.update(self._sample([item]))
                return out
            i, rid, p = items[0]
            logger.exception("row %s failed", rid)
            return {i: self._meta(rid, "failed", f"{type(err).__name__}: {err}", p)}
        for (i, rid, p), res in zip(items, results):
            out[i] = self._published(rid, res)
        return out

    def _published(self, rid: str, result) -> dict:
        """Publish one sampled video: its ok row, or a failed row saying why writing it failed."""
        try:
            return self._meta(rid, "ok", None, result.params, **self._publish(result, rid), **self._scores(result))
        except Exception as err:  # noqa: BLE001
            logger.exception("publishing %s failed", rid)
            return self._meta(rid, "failed", f"{type(err).__name__} while writing the video: {err}", result.params)

    def _bivdiff_row(self, rid: str, given: dict) -> dict:
        """One BIVDiff row: inputs read and checked first, then the models run; every failure is the row's error."""
        from pipelines.bivdiff.inputs import read_row_inputs

        try:
            params = resolve_bivdiff_params(given)
        except ValueError as err:
            return self._meta(rid, "failed", str(err), prompt=given.get("prompt"), sampler=given.get("sampler"),
                              task=given.get("task"), kind="bivdiff")
        try:
            loaded = read_row_inputs(params)
            result = self.bivdiff.run(params, loaded=loaded)
        except ValueError as err:
            return self._meta(rid, "failed", str(err), params)
        except Exception as err:  # noqa: BLE001 - errors become row values
            logger.exception("row %s failed", rid)
            return self._meta(rid, "failed", f"{type(err).__name__}: {err}", params)
        return self._published(rid, result)

    def _scores(self, result) -> dict:
        """Quality scores of a published video; a scoring failure leaves them null with the reason."""
        if not self.scorer_source:
            return {}
        try:
            return self.scorer.score(result.frames, result.params.prompt)
        except Exception as err:  # noqa: BLE001 - never lose a video to its scores
            logger.exception("scoring failed")
            return {"score_error": f"{type(err).__name__}: {err}"}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.generate import batches

        rows = batch.to_pylist()
        meta: dict[int, dict] = {}
        pending = []
        for i, r in enumerate(rows):
            if r["_status"] != "pending":
                text = {k: r.get(k) if isinstance(r.get(k), str) else None for k in ("prompt", "task")}
                meta[i] = self._meta(r["_id"], "failed", r["_error"], sampler=r.get("_sampler"), **text,
                                     kind="bivdiff" if r.get("task") is not None else None)
                continue
            given = json.loads(r["_params"])
            if given.pop("kind", None) == "bivdiff":
                meta[i] = self._bivdiff_row(r["_id"], given)
                continue
            try:
                params = resolve_params(given, backbone=self.spec.backbone, spatial_factor=self.backbone.spatial_factor)
                self.backbone.check_frames(params.frames)
                pending.append((i, r["_id"], params))
            except ValueError as err:
                meta[i] = self._meta(r["_id"], "failed", str(err), prompt=r.get("prompt"), sampler=given.get("sampler"))
        for group in batches([p for _, _, p in pending], self.sampler_batch):
            meta.update(self._sample([pending[g] for g in group]))
        for i, r in enumerate(rows):
            meta[i]["pair_id"] = r.get("_pair")
        extra = batch.select(passthrough_columns(batch))
        return metadata.to_table([meta[i] for i in range(len(rows))], extra if extra.num_columns else None)
