"""Ray Data operators for batch generation (README "Architecture").

`resolve_rows` (stateless task): resolves each manifest row once, with the model set's structural facts, gives it an
id and its kind, drops rows already committed. `VideoGenerator` and `BivdiffGenerator` (callable classes, one per
actor, each for its own row kind) load their models once and turn resolved rows into published videos and metadata
rows (operators/worker.py).
"""
from __future__ import annotations

import json
import logging
import traceback
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import metadata
from .kinds import KINDS, Resolver
from .manifest import expand_samplers
from .worker import RowWorker

logger = logging.getLogger(__name__)


def members(ids: list, values) -> list[bool]:
    """Which of `ids` are in `values` (an Arrow string array, or any Python container)."""
    if values is None or len(values) == 0:
        return [False] * len(ids)
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return pc.is_in(pa.array(ids, pa.string()), value_set=values).to_pylist()
    return [i in values for i in ids]


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
            r.update(status="failed", params_json=None,
                     error=f"{metadata.WORKER_DIED} in an earlier run; not run again (--retry-poisoned runs it)")
        if r["status"] == "pending" and is_dup[k]:
            r.update(status="failed", error=f"id: {given[k] or r['id']!r} appears in more than one manifest row; "
                     "ids must be unique", params_json=None)
        if r["status"] == "pending" and not is_done[k]:
            kind = KINDS[r["kind"]]
            problem = kind.precheck(kind.params.from_record(json.loads(r["params_json"])))
            if problem:
                r.update(status="failed", error=problem, params_json=None)
        if not (r["status"] == "pending" and is_done[k]):
            src.append(i)
            resolved.append(r)
    out = batch.take(pa.array(src, type=pa.int64()))
    for name, key in (("_id", "id"), ("_kind", "kind"), ("_status", "status"), ("_error", "error"), ("_params", "params_json"),
                      ("_pair", "pair_id"), ("_sampler", "sampler")):
        out = out.append_column(pa.field(name, pa.string()), pa.array([r.get(key) for r in resolved], type=pa.string()))
    return out


class VideoGenerator(RowWorker):
    """Generation rows: the backbone loads once; rows that share structure are sampled together (`sampler_batch` at a
    time). Before a batched call the estimated memory is checked against what the device has free (splitting the
    batch, or failing a row that cannot fit); a row that runs past its timeout marks itself and ends this worker (Ray
    replaces it; the retry records the row failed)."""

    kind = "generation"

    def __init__(self, resolver: Resolver, output: str, run_id: str, code_version: str, *, sampler_batch: int = 1, **kw):
        super().__init__(resolver, output, run_id, code_version, **kw)
        self.sampler_batch = sampler_batch

    def load(self):
        from pipelines.backbones import load_backbone

        return load_backbone(self.spec)

    def run(self, items, alone) -> dict[int, dict]:
        from pipelines.generate import batches

        out: dict[int, dict] = {}

        def checked(group):  # the loaded models' structural rules (VAE factor, frame limit)
            ok = []
            for i, rid, p in group:
                try:
                    self.models.check(p)
                    ok.append((i, rid, p))
                except ValueError as err:
                    out[i] = self.rec.row(rid, "failed", str(err), p)
            return ok

        pending = checked(items)
        for group in batches([p for _, _, p in pending], self.sampler_batch):
            out.update(self._sample([pending[g] for g in group]))
        for item in checked(alone):  # rows whose batched call stalled before: alone this time
            out.update(self._sample([item]))
        return out

    def _sample(self, items: list[tuple[int, str, Any]]) -> dict[int, dict]:
        """Sample a structurally uniform group: split it if it cannot fit, fall back to one row at a time on failure.
        The fallback runs after the failed call's tensors are gone (no traceback holds them)."""
        from pipelines.generate import generate

        problem = self._memory_problem(self.models, len(items), items[0][2])
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
                results = generate(self.models, [p for _, _, p in items])
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


class BivdiffGenerator(RowWorker):
    """BIVDiff rows, one at a time: inputs read and checked first, then the models run; every failure is the row's
    error."""

    kind = "bivdiff"

    def __init__(self, resolver: Resolver, output: str, run_id: str, code_version: str, *, stage1_batch: int = 8, **kw):
        super().__init__(resolver, output, run_id, code_version, **kw)
        self.stage1_batch = stage1_batch

    def load(self):
        from pipelines.bivdiff.runner import BIVDiff

        return BIVDiff(self.spec, stage1_batch=self.stage1_batch)

    def run(self, items, alone) -> dict[int, dict]:
        return {i: self._row(i, rid, p) for i, rid, p in [*items, *alone]}

    def _row(self, i: int, rid: str, params) -> dict:
        from pipelines.bivdiff.inputs import read_row_inputs

        try:
            loaded = read_row_inputs(params)
            problem = self._memory_problem(self.models.backbone, 1, params)
            if problem:
                return self.rec.row(rid, "failed", problem, params)
            with self._watchdog([(i, rid, params)]):
                self._drills([params.idm_prompt, params.vdm_prompt])
                result = self.models.run(params, loaded=loaded)
        except ValueError as err:
            return self.rec.row(rid, "failed", str(err), params)
        except Exception as err:  # noqa: BLE001 - errors become row values
            logger.exception("row %s failed", rid)
            return self.rec.row(rid, "failed", f"{type(err).__name__}: {err}", params)
        return self._published(rid, result)
