"""What every row operator shares (docs/architecture.md): the metadata row of a result, publishing a video
(encode, upload, contact sheet, sha256), quality scores, and the guards around a model call (memory estimate,
watchdog, fault drills). `VideoGenerator` and `BivdiffGenerator` (operators/actors.py) add how their kind runs.
Errors are values: a failing row comes back with status "failed" and its reason; video bytes never enter Ray's
object store.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import signal
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import memory
from pipelines.backbones.common import resolve_placement
from pipelines.cli import quiet_libraries
from pipelines.config import spec_json
from pipelines.video import contact_sheet, png_bytes, write_mp4

from . import metadata, storage
from .layout import Layout
from .manifest import COLUMNS
from .scoring import ScoreModels, VideoScorer

logger = logging.getLogger(__name__)
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # evaluated in each worker process that imports this module
INTERNAL = ("_id", "_kind", "_status", "_error", "_params", "_pair", "_sampler")


def passthrough_columns(table: pa.Table) -> list[str]:
    return [c for c in table.column_names if c not in COLUMNS and c not in INTERNAL]


class Recorder:
    """Builds the metadata rows of one kind in one run: the row's own values plus who made it (backbone, model set,
    code, run, worker)."""

    def __init__(self, kind: str, spec, backbone: str, run_id: str, code_version: str):
        self.kind, self.backbone, self.model_json = kind, backbone, spec_json(spec)
        self.run_id, self.code_version = run_id, code_version

    def row(self, rid: str, status: str, error: str | None, params=None, **extra) -> dict:
        row = {"id": rid, "status": status, "error": error, "code_version": self.code_version, "run_id": self.run_id,
               "worker": WORKER, "backbone": self.backbone, "model_spec": self.model_json,
               "finished_at": metadata.now()}
        if params is not None:
            row.update(params.record())
        row.update(extra)
        return row

    def unresolved(self, r: Mapping[str, Any], error: str) -> dict:
        """A failed row from a resolved manifest row (the `_`-columns of `resolve_rows`) that never reached a model."""
        return self.row(r["_id"], "failed", error, sampler=r.get("_sampler"),
                        **{k: r.get(k) if isinstance(r.get(k), str) else None for k in ("prompt", "task")})

    def table(self, rows: list[dict], batch: pa.Table) -> pa.Table:
        """The metadata table of a batch: one row per input row, A/B pair ids and passthrough columns kept."""
        for out, pair in zip(rows, batch.column("_pair").to_pylist()):
            out["pair_id"] = pair
        extra = batch.select(passthrough_columns(batch))
        return metadata.to_table(rows, extra if extra.num_columns else None, self.kind)


def recorder(operator: type["RowWorker"], resolver, run_id: str, code_version: str) -> Recorder:
    """The recorder of `operator`'s kind in a run (`resolver`: the run's operators.resolve.Resolver)."""
    spec = resolver.setups[operator.kind].spec
    return Recorder(operator.kind, spec, operator.backbone_name(spec), run_id, code_version)


def lost_rows(batch: pa.Table, *, operator: type["RowWorker"], resolver, run_id: str, code_version: str,
              reason: str) -> pa.Table:
    """Rows whose batch killed its worker in the batched pass and again when run alone: recorded failed with `reason`
    (a stateless task, no model). Rows that were already failed keep their own error."""
    rec = recorder(operator, resolver, run_id, code_version)
    rows = [rec.unresolved(r, r["_error"] if r["_status"] != "pending" else reason) for r in batch.to_pylist()]
    return rec.table(rows, batch)


def drill_faults() -> dict[str, tuple[str, float]]:
    """Drill hooks for reliability tests and fire drills: IVMIX_FAULTS="kill=TEXT;sleep=TEXT:SECONDS" makes a row whose
    prompt contains TEXT kill its worker process (SIGKILL, as the kernel's OOM killer would) or stall;
    "slow_upload=:FACTOR" makes every video's upload wait FACTOR times its sampling seconds first (a slow store: with
    1, a batch's uploads wait as long as the batch sampled). Unset: none."""
    out = {}
    for part in filter(None, (os.environ.get("IVMIX_FAULTS") or "").split(";")):
        kind, _, arg = part.partition("=")
        text, _, seconds = arg.partition(":")
        out[kind.strip()] = (text, float(seconds or 0))
    return out


class DeviceTurn:
    """One call's turn on the device (`RowWorker.device_turn`): when it began (the metadata's `started_at`), and its
    hold on the actor's frames (released once its videos are encoded, or when it made none)."""

    def __init__(self, frames: threading.Semaphore) -> None:
        self.started = metadata.now()
        self._frames, self._held = frames, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._frames.release()


class RowWorker:
    """One actor of a kind's pool: `__call__` handles a batch of resolved rows of that kind. Models load on first use,
    once (`load`). Rows that failed to resolve, or that ran past their time on an earlier worker, are recorded without
    running; the rest go to `run(items)` as (position, id, params) triples, params rebuilt from the resolved record
    without a second validation. A subclass names its kind, its parameter class and the metadata's `backbone`.

    Several calls may run at once, each in its own thread (`compute.concurrent_batches`, docs/job.md "Throughput"):
    the device part of a call (memory check, sampling, decode) runs inside `device_turn`, one call at a time, and the
    rest outside it, so one batch's tail overlaps the next batch's sampling. Decoded frames are bounded: a turn
    begins only while at most one other batch still holds frames (it is being encoded: mp4, contact sheet, scores);
    uploads hold only the encoded files. Models and scorers load once, and videos are scored one at a time, under
    locks of their own."""

    kind: str
    params: type  # the kind's parameters: `params.from_record(record)` rebuilds a resolved row's
    backbone_name: Callable[[Any], str] = staticmethod(lambda spec: spec.backbone)  # the metadata's `backbone`

    def __init__(self, resolver, output: str, run_id: str, code_version: str, *, scorer: ScoreModels | None = None,
                 memory_budget_gb: float | None = None, row_timeout_s: float | None = None,
                 output_format: str = "files", contact_sheets: bool = True):
        """`resolver`: the run's operators.resolve.Resolver (this kind's model set is `resolver.setups[kind].spec`)."""
        quiet_libraries()  # no per-file load bars or advisory warnings in the worker logs the driver prints
        self.spec = resolver.setups[self.kind].spec
        self.rec = recorder(type(self), resolver, run_id, code_version)
        self.device, self.dtype = resolve_placement(self.spec.device, self.spec.dtype)
        self._models = self._scorer = self._scorer_error = None
        # the device turn (reentrant: models load inside it, and a turn may ask for them); loading models and scorers;
        # scoring (a fast tokenizer is not to be shared between threads: huggingface/tokenizers' "Already borrowed")
        self._device, self._loading, self._scoring = threading.RLock(), threading.Lock(), threading.Lock()
        self._frames = threading.Semaphore(2)  # batches holding frames: the one being made, one being encoded
        self.scorer_source = scorer
        self.fs, self.root = storage.filesystem(output)
        self.layout = Layout(self.root, run_id)
        self.memory_budget_gb, self.row_timeout_s = memory_budget_gb, row_timeout_s
        self.faults = drill_faults()
        self.shards, self.contact = output_format == "webdataset", contact_sheets

    @property
    def models(self):
        """The kind's models, loaded on first use inside the device turn (see `scorer`)."""
        if self._models is None:
            with self._device, self._loading:
                if self._models is None:
                    self._models = self.load()
        return self._models

    @contextlib.contextmanager
    def device_turn(self):
        """The device part of a call: one at a time per actor, and only while at most one other batch holds frames;
        the watchdog of the rows starts inside it, so a call waiting for its turn never runs out of its rows' time.
        The turn's hold on the frames outlives it (`DeviceTurn.release`, once its videos are encoded); an exception
        out of the turn releases it."""
        self._frames.acquire()
        turn = DeviceTurn(self._frames)
        try:
            with self._device:
                turn.started = metadata.now()
                yield turn
        except BaseException:
            turn.release()
            raise

    def load(self):
        raise NotImplementedError

    def run(self, items: list[tuple[int, str, Any]], alone: list[tuple[int, str, Any]]) -> dict[int, dict]:
        raise NotImplementedError

    @property
    def scorer(self):
        """The scorers (CLIP, DINO, optical flow), loaded on first use; a load failure is remembered and raised again
        for every video (the caller turns it into `score_error`, never into a lost video)."""
        if self._scorer is None and self._scorer_error is None:
            # inside the device turn: no model is built in another thread meanwhile (from_pretrained builds on the meta
            # device through process-wide hooks; a scorer built beside a BIVDiff task pipeline came out on `meta`)
            with self._device, self._loading:
                self._load_scorer()
        if self._scorer_error:
            raise RuntimeError(self._scorer_error)
        return self._scorer

    def _load_scorer(self) -> None:
        if self._scorer is None and self._scorer_error is None:
            try:
                self._scorer = VideoScorer(self.scorer_source, self.device, self.dtype)
            except Exception as err:  # any load failure: the videos are kept, their scores say why
                text = " ".join(str(err).split())[:300]
                self._scorer_error = f"{type(err).__name__} while loading the scorer: {text}"

    # -- guards: memory, time, drills ---------------------------------------------------------------------------
    def _memory_problem(self, backbone, batch: int, p) -> str | None:
        """None if `batch` videos like `p` fit what the device has free, else the reason with both numbers."""
        need = memory.estimate(backbone, batch, p.frames, p.height, p.width, backbone.decode_chunk)
        budget = memory.budget(self.device, self.memory_budget_gb)
        if need.total <= budget:
            return None
        source = ("compute.memory_budget_gb" if self.memory_budget_gb is not None
                  else f"90% of the free {self.device.type} memory")
        return (f"memory: {p.frames} frames at {p.width}x{p.height} need {need.describe()}; the actor has "
                f"{memory.gib(budget)} ({source})")

    def row_timeout(self, p) -> float:
        """compute.row_timeout_s, else a generous bound from the row's size: 10 min plus 1e-5 s per step x frame x
        pixel (about 45 min for 50 steps of 16 x 512 x 512), x20 on a CPU (about 15 h)."""
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
                storage.put_bytes(self.fs, mark.encode(), self.layout.timeout_mark(rid), self.root)
            logger.error("rows %s ran past %.0f s; ending this worker so that Ray replaces it",
                         [r for _, r, _ in items], seconds)
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
        folder = self.layout.timeouts
        try:
            if not self.fs.exists(folder):
                return {}
            return {posixpath.basename(p)[: -len(".txt")]: self.fs.cat_file(p).decode()
                    for p in self.fs.ls(folder, detail=False) if p.endswith(".txt")}
        except Exception:  # an unreadable marker folder must not fail the batch
            logger.exception("could not read the timeout marks")
            return {}

    # -- publishing -----------------------------------------------------------------------------------------------
    def publish(self, turn: DeviceTurn, keys: list[tuple[int, str]], results: list) -> dict[int, dict]:
        """The rows of the videos sampled in `turn` (`results`, in `keys`' order: position, id): every video is
        encoded first (mp4, sha256, contact sheet, scores: all that reads its frames), then the frames go (the list is
        emptied and the turn's hold released) and the files are uploaded. A failure is that row's error."""
        out: dict[int, dict] = {}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                encoded = []
                for (i, rid), result in zip(keys, results):
                    try:
                        encoded.append((i, rid, self._encode(result, os.path.join(tmp, f"{len(encoded)}.mp4"))))
                    except Exception as err:  # a failed encode is the row's error
                        logger.exception("encoding %s failed", rid)
                        out[i] = self.rec.row(rid, "failed", f"{type(err).__name__} while writing the video: {err}",
                                              result.params)
                results.clear()
                turn.release()
                for i, rid, video in encoded:
                    out[i] = self._upload(rid, video, turn)
        finally:
            turn.release()
        return out

    def _encode(self, result, local: str) -> dict:
        """What a video's row needs from its frames: the mp4 at `local`, its size and sha256, the contact sheet PNG,
        the scores, and the result's counts (the frames are not kept)."""
        start = time.perf_counter()
        size = write_mp4(result.frames, local, result.params.fps)
        sheet = png_bytes(contact_sheet(result.frames)) if self.contact else None
        digest, encode_seconds = storage.sha256_file(local), time.perf_counter() - start  # `seconds` has no scoring
        return dict(params=result.params, local=local, bytes=size, sha256=digest, sheet=sheet,
                    scores=self._scores(result), sampler_seconds=result.seconds,
                    encode_seconds=encode_seconds, model_calls=result.total_calls,
                    calls_idm=_calls(result, "I"), calls_vdm=_calls(result, "V"), nfe=result.nfe,
                    tflop=None if getattr(result, "flops", None) is None else result.flops / 1e12)

    def _upload(self, rid: str, video: dict, turn: DeviceTurn) -> dict:
        """Upload one encoded video to `videos/` and `contact/` (files), or to the run's scratch until the driver
        packs it into a shard (webdataset; its uris are then the shard's): its ok row, or a failed row saying why."""
        p = video["params"]
        try:
            start = time.perf_counter()
            dest = self.layout.sample(rid, "mp4") if self.shards else self.layout.video(rid)
            if "slow_upload" in self.faults:
                time.sleep(float(self.faults["slow_upload"][1]) * video["sampler_seconds"])
            storage.put_file(self.fs, video["local"], dest, self.root)
            sheet = self.layout.sample(rid, "png") if self.shards else self.layout.contact_sheet(rid)
            if video["sheet"] is not None:
                storage.put_bytes(self.fs, video["sheet"], sheet, self.root)
            uri = (lambda path: None) if self.shards else (lambda path: storage.full_uri(self.fs, path))
            seconds = video["sampler_seconds"] + video["encode_seconds"] + time.perf_counter() - start
            return self.rec.row(
                rid, "ok", None, p, started_at=turn.started, video_uri=uri(dest), bytes=video["bytes"],
                sha256=video["sha256"], contact_uri=uri(sheet) if video["sheet"] is not None else None,
                seconds=seconds, **{k: video[k] for k in ("sampler_seconds", "model_calls", "calls_idm", "calls_vdm",
                                                           "nfe", "tflop")}, **video["scores"])
        except Exception as err:  # a failed upload is the row's error
            logger.exception("publishing %s failed", rid)
            return self.rec.row(rid, "failed", f"{type(err).__name__} while writing the video: {err}", p)

    def _scores(self, result) -> dict:
        """Quality scores of a published video; a scoring failure leaves them null with the reason."""
        if not self.scorer_source:
            return {}
        try:
            with self._scoring:
                return self.scorer.score(result.frames, result.params.prompt, result.params.fps)
        except Exception as err:  # never lose a video to its scores
            logger.exception("scoring failed")
            return {"score_error": f"{type(err).__name__}: {err}"}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        meta: dict[int, dict] = {}
        pending, alone = [], []
        timed_out = self._timed_out() if any(r["_status"] == "pending" for r in rows) else {}
        for i, r in enumerate(rows):
            mark = timed_out.get(r["_id"])
            if r["_status"] != "pending":
                meta[i] = self.rec.unresolved(r, r["_error"])
            elif mark is not None and mark != SPLIT:
                meta[i] = self.rec.unresolved(r, f"row_timeout_s: still running after {mark} s; "
                                                 "its worker was ended and replaced")
            else:
                params = self.params.from_record(json.loads(r["_params"]))  # the column between stages is JSON
                (alone if mark == SPLIT else pending).append((i, r["_id"], params))
        meta.update(self.run(pending, alone))
        table = self.rec.table([meta[i] for i in range(len(rows))], batch)
        if self.shards:
            self._sidecars(table)
        return table

    def _sidecars(self, table: pa.Table) -> None:
        """Each finished sample's metadata row beside its media in scratch (`<id>.parquet`, written last): what the
        next run packs if this run's driver dies before the sample's shard is committed (operators/shards.py)."""
        for i, (rid, status) in enumerate(zip(table["id"].to_pylist(), table["status"].to_pylist())):
            if status == "ok":
                sink = io.BytesIO()
                pq.write_table(table.slice(i, 1), sink)
                try:
                    storage.put_bytes(self.fs, sink.getvalue(), self.layout.sample(rid, "parquet"), self.root)
                except Exception:  # only the salvage of a killed run needs it
                    logger.exception("could not write the scratch row of %s", rid)


def _calls(result, model: str) -> int:
    """A result's calls of one model, conditional-only ones included (pipelines/generate.py VideoResult)."""
    per_model = getattr(result, "model_calls", None)
    return per_model(model) if per_model else result.calls[model]


SPLIT = "split"  # timeout mark of a row whose batched call stalled: it runs alone next
