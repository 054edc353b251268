"""Ray Data operators for batch generation.

`resolve_rows` (stateless task): validates each manifest row with the CLI's rules, gives it an id,
drops rows already committed. `VideoGenerator` (callable class, one per actor): loads the backbone
once, samples, encodes H.264 mp4, uploads, and returns one small metadata row per input row. Errors
are values: a failing row comes back with status "failed" and its reason; video bytes never enter
Ray's object store.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import signal
import socket
import tempfile
import threading
import time
import traceback
from typing import Any, Mapping

import pyarrow as pa

from pipelines.config import (BivdiffParams, BivdiffSpec, Limits, ModelSpec, resolve_bivdiff_params, resolve_params,
                              spec_json)

from . import metadata, storage
from .manifest import COLUMNS, expand_samplers

logger = logging.getLogger(__name__)
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # evaluated in each worker process that imports this module
INTERNAL = ("_id", "_status", "_error", "_params", "_pair", "_sampler")


def passthrough_columns(table: pa.Table) -> list[str]:
    return [c for c in table.column_names if c not in COLUMNS and c not in INTERNAL]


def resolve_rows(batch: pa.Table, *, defaults: Mapping[str, Any], model: Mapping[str, Any], done: frozenset = frozenset(),
                 duplicate_ids: frozenset = frozenset(), spatial_factor: int = 8, samplers: tuple | None = None,
                 bivdiff: Mapping[str, Any] | None = None, bivdiff_defaults: Mapping[str, Any] | None = None,
                 limits: Mapping[str, Any] | None = None, seen: frozenset = frozenset(),
                 poisoned: frozenset = frozenset()) -> pa.Table:
    """Add _id/_status/_error/_params/_pair/_sampler; expand A/B groups (one row per sampler); drop rows already
    committed ok, and rows this run has already recorded (`seen`: the retry passes after a worker died); rows that
    killed their worker twice in an earlier run (`poisoned`) fail again here, without running."""
    spec = ModelSpec(**model)
    bspec = BivdiffSpec(**bivdiff) if bivdiff else BivdiffSpec()
    lim = Limits(**(limits or {}))
    src, resolved = [], []
    for i, row in enumerate(batch.to_pylist()):
        for r in expand_samplers(row, defaults, spec, samplers, spatial_factor, bspec, bivdiff_defaults, limits=lim):
            if r["id"] in seen:
                continue
            if r["status"] == "pending" and r["id"] in poisoned:
                r.update(status="failed", params_json=None,
                         error=f"{metadata.WORKER_DIED} in an earlier run; not run again (--retry-poisoned runs it)")
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


class Recorder:
    """Builds the metadata rows of one run: the row's own values plus who made it (backbone, model set, code, run)."""

    def __init__(self, model: Mapping[str, Any], bivdiff: Mapping[str, Any] | None, run_id: str, code_version: str):
        self.spec = ModelSpec(**model)
        self.bivdiff_spec = BivdiffSpec(**bivdiff) if bivdiff else BivdiffSpec(device=self.spec.device, dtype=self.spec.dtype,
                                                                             decode_chunk=self.spec.decode_chunk)
        self.model_json, self.bivdiff_json = spec_json(self.spec), spec_json(self.bivdiff_spec)
        self.run_id, self.code_version = run_id, code_version

    def row(self, rid: str, status: str, error: str | None, params=None, **extra) -> dict:
        kind = extra.pop("kind", None)  # for rows without resolved params
        bv = isinstance(params, BivdiffParams) or kind == "bivdiff"
        row = {"id": rid, "status": status, "error": error, "code_version": self.code_version, "run_id": self.run_id,
               "worker": WORKER,
               "backbone": f"bivdiff/{self.bivdiff_spec.vdm}" if bv else self.spec.backbone,
               "model_spec": self.bivdiff_json if bv else self.model_json, "finished_at": metadata.now()}
        if params is not None:
            row.update(params.record())
        row.update(extra)
        return row

    def unresolved(self, r: Mapping[str, Any], error: str) -> dict:
        """A failed row from a resolved manifest row (the `_`-columns of `resolve_rows`) that never reached a model."""
        text = {k: r.get(k) if isinstance(r.get(k), str) else None for k in ("prompt", "task")}
        return self.row(r["_id"], "failed", error, sampler=r.get("_sampler"), **text,
                        kind="bivdiff" if r.get("task") is not None else None)


def lost_rows(batch: pa.Table, *, model: Mapping[str, Any], bivdiff: Mapping[str, Any] | None, run_id: str,
              code_version: str, reason: str) -> pa.Table:
    """Rows whose batch killed its worker in the batched pass and again when run alone: recorded failed with `reason`
    (a stateless task, no model). Rows that were already failed keep their own error."""
    rec = Recorder(model, bivdiff, run_id, code_version)
    rows = [rec.unresolved(r, r["_error"] if r["_status"] != "pending" else reason) for r in batch.to_pylist()]
    for out, r in zip(rows, batch.to_pylist()):
        out["pair_id"] = r.get("_pair")
    extra = batch.select(passthrough_columns(batch))
    return metadata.to_table(rows, extra if extra.num_columns else None)


def drill_faults() -> dict[str, tuple[str, float]]:
    """Drill hooks for reliability tests and fire drills: IVMIX_FAULTS="kill=TEXT;sleep=TEXT:SECONDS" makes a row whose
    prompt contains TEXT kill its worker process (SIGKILL, as the kernel's OOM killer would) or stall. Unset: none."""
    out = {}
    for part in filter(None, (os.environ.get("IVMIX_FAULTS") or "").split(";")):
        kind, _, arg = part.partition("=")
        text, _, seconds = arg.partition(":")
        out[kind.strip()] = (text, float(seconds or 0))
    return out


class VideoGenerator:
    """One actor: `__call__` handles a batch of rows. The models named by the job config load on first use, once:
    the generation backbone for prompt rows, the BIVDiff set for rows with a `task`. Before a batched call it checks
    the estimated memory against what the device has free (splitting the batch, or failing a row that cannot fit);
    a row that runs past its timeout marks itself and ends this worker (Ray replaces it; the retry records the row
    failed)."""

    def __init__(self, model: Mapping[str, Any], output: str, run_id: str, code_version: str, sampler_batch: int = 1,
                 scorer: str | None = None, bivdiff: Mapping[str, Any] | None = None, bivdiff_stage1_batch: int = 8,
                 limits: Mapping[str, Any] | None = None, memory_budget_gb: float | None = None,
                 row_timeout_s: float | None = None):
        from pipelines.backbones.common import resolve_placement
        from pipelines.cli import quiet_libraries

        quiet_libraries()  # no per-file load bars or advisory warnings in the worker logs the driver prints
        self.rec = Recorder(model, bivdiff, run_id, code_version)
        self.spec, self.bivdiff_spec = self.rec.spec, self.rec.bivdiff_spec
        self.device, self.dtype = resolve_placement(self.spec.device, self.spec.dtype)
        self._backbone = self._bivdiff = self._scorer = self._scorer_error = None
        self.scorer_source = scorer
        self.fs, self.root = storage.filesystem(output)
        self.sampler_batch, self.stage1_batch = sampler_batch, bivdiff_stage1_batch
        self.limits = Limits(**(limits or {}))
        self.memory_budget_gb, self.row_timeout_s = memory_budget_gb, row_timeout_s
        self.timeouts = timeouts_dir(self.root, run_id)
        self.faults = drill_faults()

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
                self._scorer = ClipScorer(self.scorer_source, self.device, self.dtype)
            except Exception as err:  # noqa: BLE001
                self._scorer_error = f"{type(err).__name__} while loading the scorer: {' '.join(str(err).split())[:300]}"
        if self._scorer_error:
            raise RuntimeError(self._scorer_error)
        return self._scorer

    # -- guards: memory, time, drills ---------------------------------------------------------------------------
    def _memory_problem(self, backbone, batch: int, p) -> str | None:
        """None if `batch` videos like `p` fit what the device has free, else the reason with both numbers."""
        from pipelines import memory

        need = memory.estimate(backbone, batch, p.frames, p.height, p.width, backbone.decode_chunk)
        budget = memory.budget(self.device, self.memory_budget_gb)
        if need.total <= budget:
            return None
        source = "compute.memory_budget_gb" if self.memory_budget_gb is not None else f"90% of the free {self.device.type} memory"
        return (f"memory: {p.frames} frames at {p.width}x{p.height} need {need.describe()}; the actor has "
                f"{memory.gib(budget)} ({source})")

    def row_timeout(self, p) -> float:
        """compute.row_timeout_s, else a generous bound from the row's size: 10 min plus 1e-5 s per step x frame x
        pixel (about 45 min for 50 steps of 16 x 512 x 512), x20 on a CPU."""
        if self.row_timeout_s:
            return float(self.row_timeout_s)
        return (600.0 + 1e-5 * p.steps * p.frames * p.height * p.width) * (20 if self.device.type == "cpu" else 1)

    @contextlib.contextmanager
    def _watchdog(self, items: list[tuple[int, str, Any]]):
        """Past the rows' time, mark them timed out and end this worker: a stuck CUDA kernel or a hung read cannot be
        interrupted from Python, but a process can be replaced (Ray restarts the actor; the retried batch finds the
        marks and records these rows failed)."""
        seconds = sum(self.row_timeout(p) for _, _, p in items)

        def fire() -> None:
            mark = SPLIT if len(items) > 1 else f"{seconds:g}"  # a batched call that stalls: its rows retry alone first
            for _, rid, _ in items:
                storage.put_bytes(self.fs, mark.encode(), storage.join(self.timeouts, f"{rid}.txt"), self.root)
            logger.error("rows %s ran past %.0f s; ending this worker so that Ray replaces it", [r for _, r, _ in items], seconds)
            os._exit(75)

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _drills(self, prompts: list[str]) -> None:
        for kind, (text, seconds) in self.faults.items():
            if text and any(text in p for p in prompts):
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif kind == "sleep":
                    time.sleep(seconds)

    def _timed_out(self) -> dict[str, str]:
        """Rows of this run that ran past their time on an earlier worker: {id: seconds}."""
        try:
            if not self.fs.exists(self.timeouts):
                return {}
            return {posixpath.basename(p)[: -len(".txt")]: self.fs.cat_file(p).decode()
                    for p in self.fs.ls(self.timeouts, detail=False) if p.endswith(".txt")}
        except Exception:  # noqa: BLE001 - an unreadable marker folder must not fail the batch
            logger.exception("could not read the timeout marks")
            return {}

    # -- rows ---------------------------------------------------------------------------------------------------------
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
        """Sample a structurally uniform group: split it if it cannot fit, fall back to one row at a time on failure.
        The fallback runs after the failed call's tensors are gone (no traceback holds them)."""
        from pipelines.generate import generate

        problem = self._memory_problem(self.backbone, len(items), items[0][2])
        if problem and len(items) > 1:
            half = len(items) // 2
            return {**self._sample(items[:half]), **self._sample(items[half:])}
        if problem:
            i, rid, p = items[0]
            return {i: self.rec.row(rid, "failed", problem, p)}
        error = None
        try:
            with self._watchdog(items):
                self._drills([p.prompt for _, _, p in items])
                results = generate(self.backbone, [p for _, _, p in items])
        except Exception as err:  # noqa: BLE001 - errors become row values
            logger.exception("batch of %d row(s) failed", len(items))
            error = f"{type(err).__name__}: {err}"
            traceback.clear_frames(err.__traceback__)  # a log handler may keep the traceback: drop the tensors it holds
        if error is not None:
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            if len(items) > 1:
                return {k: v for item in items for k, v in self._sample([item]).items()}
            i, rid, p = items[0]
            return {i: self.rec.row(rid, "failed", error, p)}
        return {i: self._published(rid, res) for (i, rid, _), res in zip(items, results)}

    def _published(self, rid: str, result) -> dict:
        """Publish one sampled video: its ok row, or a failed row saying why writing it failed."""
        try:
            return self.rec.row(rid, "ok", None, result.params, **self._publish(result, rid), **self._scores(result))
        except Exception as err:  # noqa: BLE001
            logger.exception("publishing %s failed", rid)
            return self.rec.row(rid, "failed", f"{type(err).__name__} while writing the video: {err}", result.params)

    def _bivdiff_row(self, i: int, rid: str, given: dict) -> dict:
        """One BIVDiff row: inputs read and checked first, then the models run; every failure is the row's error."""
        from pipelines.bivdiff.inputs import read_row_inputs

        try:
            params = resolve_bivdiff_params(given, limits=self.limits)
        except ValueError as err:
            return self.rec.row(rid, "failed", str(err), prompt=given.get("prompt"), sampler=given.get("sampler"),
                                task=given.get("task"), kind="bivdiff")
        try:
            loaded = read_row_inputs(params)
            problem = self._memory_problem(self.bivdiff.backbone, 1, params)
            if problem:
                return self.rec.row(rid, "failed", problem, params)
            with self._watchdog([(i, rid, params)]):
                self._drills([params.idm_prompt, params.vdm_prompt])
                result = self.bivdiff.run(params, loaded=loaded)
        except ValueError as err:
            return self.rec.row(rid, "failed", str(err), params)
        except Exception as err:  # noqa: BLE001 - errors become row values
            logger.exception("row %s failed", rid)
            return self.rec.row(rid, "failed", f"{type(err).__name__}: {err}", params)
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
        pending, alone = [], []
        timed_out = self._timed_out() if any(r["_status"] == "pending" for r in rows) else {}
        for i, r in enumerate(rows):
            if r["_status"] != "pending":
                meta[i] = self.rec.unresolved(r, r["_error"])
                continue
            mark = timed_out.get(r["_id"])
            if mark is not None and mark != SPLIT:
                meta[i] = self.rec.unresolved(r, f"row_timeout_s: still running after {mark} s; "
                                                 "its worker was ended and replaced")
                continue
            given = json.loads(r["_params"])
            if given.pop("kind", None) == "bivdiff":
                meta[i] = self._bivdiff_row(i, r["_id"], given)
                continue
            try:
                params = resolve_params(given, backbone=self.spec.backbone, spatial_factor=self.backbone.spatial_factor,
                                        limits=self.limits)
                self.backbone.check_frames(params.frames)
                (alone if mark == SPLIT else pending).append((i, r["_id"], params))
            except ValueError as err:
                meta[i] = self.rec.row(r["_id"], "failed", str(err), prompt=r.get("prompt"), sampler=given.get("sampler"))
        for group in batches([p for _, _, p in pending], self.sampler_batch):
            meta.update(self._sample([pending[g] for g in group]))
        for item in alone:
            meta.update(self._sample([item]))
        for i, r in enumerate(rows):
            meta[i]["pair_id"] = r.get("_pair")
        extra = batch.select(passthrough_columns(batch))
        return metadata.to_table([meta[i] for i in range(len(rows))], extra if extra.num_columns else None)


def timeouts_dir(root: str, run_id: str) -> str:
    """Where a worker marks the rows that ran past their time (removed by the driver at the end of the run)."""
    return storage.join(root, RUN_DIR, run_id, "timeouts")


RUN_DIR = ".runs"  # per-run scratch under the output prefix (never read as output)
SPLIT = "split"  # timeout mark of a row whose batched call stalled: it runs alone next
