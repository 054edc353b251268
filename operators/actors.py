"""The Ray Data operators that generate videos (docs/architecture.md): `VideoGenerator` (generation rows) and
`BivdiffGenerator` (BIVDiff rows), callable classes, one per actor, each for its own row kind (operators/kinds.py).
They load their models once and turn resolved rows (operators/resolve.py) into published videos and metadata rows;
what they share is operators/worker.py.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any

import torch

import pipelines.generate
from pipelines.backbones.registry import load_backbone
from pipelines.bivdiff.config import BivdiffParams
from pipelines.bivdiff.inputs import read_row_inputs
from pipelines.bivdiff.runner import BIVDiff
from pipelines.config import GenParams
from pipelines.params import BIVDIFF, GENERATION

from .worker import RowWorker

logger = logging.getLogger(__name__)


class VideoGenerator(RowWorker):
    """Generation rows: the backbone loads once; rows that share structure are sampled together (`sampler_batch` at a
    time), each group published as soon as it is sampled, outside the device turn. Before a batched call the estimated
    memory is checked against what the device has free (splitting the batch, or failing a row that cannot fit); a row
    that runs past its timeout marks itself and ends this worker (Ray replaces it; the retry records the row failed)."""

    kind, params = GENERATION, GenParams

    def __init__(self, resolver, output: str, run_id: str, code_version: str, *, sampler_batch: int = 1, **kw):
        super().__init__(resolver, output, run_id, code_version, **kw)
        self.sampler_batch = sampler_batch

    def load(self):
        return load_backbone(self.spec)

    def run(self, items, alone) -> dict[int, dict]:
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
        for group in pipelines.generate.batches([p for _, _, p in pending], self.sampler_batch):
            out.update(self._sample([pending[g] for g in group]))
        for item in checked(alone):  # rows whose batched call stalled before: alone this time
            out.update(self._sample([item]))
        return out

    def _sample(self, items: list[tuple[int, str, Any]]) -> dict[int, dict]:
        """Sample a structurally uniform group: split it if it cannot fit, fall back to one row at a time on failure.
        The fallback runs after the failed call's tensors are gone (no traceback holds them)."""
        error, results = None, None
        with self.device_turn() as turn:  # the memory check sees what the device holds between two turns
            problem = self._memory_problem(self.models, len(items), items[0][2])
            try:
                if problem is None:
                    with self._watchdog(items):
                        self._drills([p.prompt for _, _, p in items])
                        # looked up on the module when called, so that a test can stand in for the engine
                        results = pipelines.generate.generate(self.models, [p for _, _, p in items])
            except Exception as err:  # errors become row values
                logger.exception("batch of %d row(s) failed", len(items))
                error = f"{type(err).__name__}: {err}"
                traceback.clear_frames(err.__traceback__)  # a log handler may keep the traceback: drop its tensors
        if results is not None:
            return self.publish(turn, [(i, rid) for i, rid, _ in items], results)
        turn.release()  # no frames were made
        if problem and len(items) > 1:
            half = len(items) // 2
            return {**self._sample(items[:half]), **self._sample(items[half:])}
        if problem:
            i, rid, p = items[0]
            return {i: self.rec.row(rid, "failed", problem, p)}
        # the sampler raised (a turn without results and without a memory problem)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(items) > 1:
            return {k: v for item in items for k, v in self._sample([item]).items()}
        i, rid, p = items[0]
        return {i: self.rec.row(rid, "failed", error, p)}


class BivdiffGenerator(RowWorker):
    """BIVDiff rows, one at a time: inputs read and checked first, then the models run; every failure is the row's
    error."""

    kind, params = BIVDIFF, BivdiffParams
    backbone_name = staticmethod(lambda spec: f"bivdiff/{spec.vdm}")

    def __init__(self, resolver, output: str, run_id: str, code_version: str, *, stage1_batch: int = 8, **kw):
        super().__init__(resolver, output, run_id, code_version, **kw)
        self.stage1_batch = stage1_batch

    def load(self):
        return BIVDiff(self.spec, stage1_batch=self.stage1_batch)

    def run(self, items, alone) -> dict[int, dict]:
        return {i: self._row(i, rid, p) for i, rid, p in [*items, *alone]}

    def _row(self, i: int, rid: str, params) -> dict:
        try:
            loaded = read_row_inputs(params)  # reading and checking the inputs overlaps another call's device turn
            with self.device_turn() as turn:
                problem = self._memory_problem(self.models.backbone, 1, params)
                if problem:
                    turn.release()
                    return self.rec.row(rid, "failed", problem, params)
                with self._watchdog([(i, rid, params)]):
                    self._drills([params.idm_prompt, params.vdm_prompt])
                    results = [self.models.run(params, loaded=loaded)]
        except ValueError as err:
            return self.rec.row(rid, "failed", str(err), params)
        except Exception as err:  # errors become row values
            logger.exception("row %s failed", rid)
            return self.rec.row(rid, "failed", f"{type(err).__name__}: {err}", params)
        return self.publish(turn, [(i, rid)], results)[i]
