"""Aggregate quality scores per sampler group, log them to MLflow, and compare a run with a baseline run
(nightly regression check). Only the driver calls this module."""
from __future__ import annotations

import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import paired as pairs
from jobs import report
from operators import metadata, resume
from pipelines import metrics
from pipelines.metrics import SCORES

logger = logging.getLogger(__name__)
# what the aggregates read of every current row, and what the score table and the report read of the rows they show
AGGREGATE = ("id", "finished_at", "status", "sampler", "pair_id", *SCORES, "tflop", "model_calls")
COLUMNS = ("id", "finished_at", "status", "error", "sampler", "pair_id", "variant", "seed", "prompt", "task", "width",
           *SCORES, "score_error", "tflop", "video_uri", "contact_uri", "bytes", "shard_uri", "shard_offset")
SCORE_TABLE_ROWS = 100_000  # the per-video score table in MLflow holds at most this many rows (all of them: metadata)
HIGHER_IS_BETTER = {**metrics.HIGHER_IS_BETTER, "success_rate": True}


def aggregate(table: pa.Table) -> dict[str, dict[str, float]]:
    """{sampler: {n, success_rate, <score>_mean, <score>_p5, <score>_p95, tflop_mean, calls_mean}} over the current
    metadata rows (masks in Arrow, numbers in numpy: no Python row per video, so a 10M-row output aggregates in
    seconds)."""
    n = table.num_rows
    sampler = table["sampler"] if "sampler" in table.column_names else pa.nulls(n, pa.string())
    sampler = pc.fill_null(pc.if_else(pc.equal(sampler, ""), None, sampler), "unresolved") if n else sampler
    ok = pc.equal(table["status"], "ok")
    out: dict[str, dict[str, float]] = {}
    for name in sorted(pc.unique(sampler).to_pylist()):
        group = pc.equal(sampler, name)
        good = pc.and_(group, ok)
        size = pc.sum(group).as_py()
        stats = {"n": float(size), "success_rate": (pc.sum(good).as_py() or 0) / size}
        for score in SCORES:
            if score not in table.column_names or table[score].type == pa.null():
                continue
            vals = table[score].filter(good).drop_null().to_numpy().astype(np.float64)
            vals = vals[np.isfinite(vals)]
            if vals.size:
                stats[f"{score}_mean"] = float(vals.mean())
                stats[f"{score}_p5"] = float(np.percentile(vals, 5))
                stats[f"{score}_p95"] = float(np.percentile(vals, 95))
        if "tflop" in table.column_names and table["tflop"].type != pa.null():
            cost = table["tflop"].filter(good).drop_null()
            if len(cost):  # what a video of this sampler cost (docs/algorithms.md §10), beside its scores
                stats["tflop_mean"] = float(pc.mean(cost).as_py())
        if "model_calls" in table.column_names and table["model_calls"].type != pa.null():
            calls = table["model_calls"].filter(good).drop_null()
            if len(calls):
                stats["calls_mean"] = float(pc.mean(calls).as_py())
        out[name] = stats
    return out


def flat_metrics(groups: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{g}.{k}": v for g, stats in groups.items() for k, v in stats.items()}


def compare(current: dict[str, float], baseline: dict[str, float], threshold: float) -> list[str]:
    """Regressions of `current` vs `baseline` flat metrics: a mean score or success rate worse by more than
    `threshold` relative to the baseline's magnitude (direction per score)."""
    found = []
    groups = {k.partition(".")[0] for k in current}
    for key, base in sorted(baseline.items()):
        group, _, stat = key.partition(".")
        name = stat[: -len("_mean")] if stat.endswith("_mean") else stat
        if name not in HIGHER_IS_BETTER or not (stat.endswith("_mean") or stat == "success_rate"):
            continue
        if group not in groups:
            if stat == "success_rate":
                found.append(f"{group}: no rows in this run (the baseline had them, success rate {base:.4g})")
            continue
        if key not in current:
            found.append(f"{group} {stat}: no scored video in this run (baseline {base:.4g})")
            continue
        cur, margin = current[key], threshold * max(abs(base), 1e-12)
        worse = cur < base - margin if HIGHER_IS_BETTER[name] else cur > base + margin
        if worse:
            found.append(f"{group} {stat}: {cur:.4g} vs baseline {base:.4g} (threshold {threshold:.0%})")
    return found


def healthy(groups: dict[str, dict[str, float]], regressions: list[str], baseline: dict[str, float]) -> bool:
    """A night that may serve as the next `--baseline last`: some video ok, no regression, and no sampler's success
    rate below the baseline's (even within the threshold)."""
    if regressions or not any(g["success_rate"] > 0 for g in groups.values()):
        return False
    current = flat_metrics(groups)
    return all(current.get(k, 0.0) >= v for k, v in baseline.items() if k.endswith(".success_rate"))


def baseline_metrics(client, experiment_id: str, baseline: str,
                     current_run: str) -> tuple[str | None, dict[str, float]]:
    """(run id, metrics) of a named run, or ("last") of the newest healthy finished run of the experiment: one with
    group metrics that is neither tagged regression=true nor healthy=false (a regressed or failed night never
    becomes the baseline of the next one)."""
    if baseline != "last":
        return baseline, dict(client.get_run(baseline).data.metrics)
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        tags = run.data.tags
        if run.info.run_id == current_run or tags.get("regression") == "true" or tags.get("healthy") == "false":
            continue
        if any(k.endswith(".success_rate") for k in run.data.metrics):
            return run.info.run_id, dict(run.data.metrics)
    return None, {}


def log_groups(mlflow, groups: dict[str, dict[str, float]], table: pa.Table) -> None:
    """Group metrics on the parent run, one nested run per sampler, and the per-video score table."""
    mlflow.log_metrics(flat_metrics(groups))
    for sampler, stats in groups.items():
        with mlflow.start_run(run_name=f"sampler={sampler}", nested=True):
            mlflow.set_tag("sampler", sampler)
            mlflow.log_metrics(stats)
    cols = [c for c in ("id", "pair_id", "sampler", "variant", "seed", "prompt", "status", *SCORES, "score_error",
                        "video_uri") if c in table.column_names]
    if table.num_rows > SCORE_TABLE_ROWS:
        logger.warning("scores/scores.json: the first %d of %d rows (the metadata holds every row)", SCORE_TABLE_ROWS,
                       table.num_rows)
    mlflow.log_table(data=table.select(cols).slice(0, SCORE_TABLE_ROWS).to_pandas(), artifact_file="scores/scores.json")


def regression_check(mlflow, cfg_regression, groups: dict[str, dict[str, float]],
                     run_id: str) -> tuple[list[str], dict[str, float]]:
    """Compare with the baseline; tags the run; returns (the regressions found, the baseline's metrics)."""
    client = mlflow.tracking.MlflowClient()
    exp_id = client.get_run(run_id).info.experiment_id
    base_id, base = baseline_metrics(client, exp_id, cfg_regression.baseline, run_id)
    if not base:
        mlflow.set_tag("regression", "no_baseline")
        logger.warning("regression check: no baseline run with group metrics (%s)", cfg_regression.baseline)
        return [], {}
    found = compare(flat_metrics(groups), base, cfg_regression.threshold)
    mlflow.set_tags({"regression": "true" if found else "false", "regression_baseline": base_id,
                     "regression_details": "; ".join(found)[:5000]})
    if not found:
        logger.info("regression check: no regression against baseline run %s (threshold %.0f%%)", base_id,
                    100 * cfg_regression.threshold)
    return found, base


def summary(groups: dict[str, dict[str, Any]]) -> str:
    parts = []
    for g, s in groups.items():
        scores = ", ".join(f"{n} {s[n + '_mean']:.3f}" for n in SCORES if n + "_mean" in s)
        n = int(s["n"])
        parts.append(f"{g}: {round(s['success_rate'] * n)}/{n} ids ok" + (f", {scores}" if scores else ""))
    return "; ".join(parts)


def shown(current: pa.Table) -> pa.Array:
    """Ids of the rows the score table (the first SCORE_TABLE_ROWS by id) and the report (its first rows by pair and
    id) show: all of them below SCORE_TABLE_ROWS rows."""
    ids = current["id"]
    if current.num_rows <= SCORE_TABLE_ROWS:
        return ids.combine_chunks()
    first = ids.take(pc.sort_indices(ids)[:SCORE_TABLE_ROWS])
    shown_in_report = ids.take(report.display_order(current)[:report.MAX_ROWS])
    return pc.unique(pa.chunked_array([*first.chunks, *shown_in_report.chunks], pa.string()).combine_chunks())


def read_current(fs, root, reference: str = "standard") -> tuple[dict[str, dict[str, float]], pa.Table | None,
                                                                  dict[str, dict[str, pairs.Difference]]]:
    """(per-sampler aggregates over the output's current metadata, all attempts; the rows the score table and the
    report show, whole; every sampler against `reference`, A/B group by group (jobs/paired.py)): the aggregates'
    columns of every row, then only the shown rows with their prompts, uris and errors (so a 10M-row output is never
    read whole)."""
    current = metadata.latest(resume.scan(fs, root, AGGREGATE))
    if current is None or current.num_rows == 0:
        return {}, None, {}
    return (aggregate(current), metadata.latest(resume.scan(fs, root, COLUMNS, ids=shown(current))),
            pairs.compare(current, reference, metrics.HIGHER_IS_BETTER))


def finish(mlflow, cfg, fs, root, run_id, export=None) -> list[str]:
    """Per-sampler aggregates over the output's current metadata (`read_current`), nested runs, score table, report
    (linking `export`, the run's filtered dataset), and the regression check when a baseline is configured."""
    reference = cfg.lab.reference
    groups, current, paired = read_current(fs, root, reference)
    if current is None:
        mlflow.set_tag("healthy", "false")
        return []
    log_groups(mlflow, groups, current)
    if paired:
        mlflow.log_metrics(pairs.flat_metrics(paired, reference))
        mlflow.set_tag("lab_reference", reference)
    logger.info("quality: %s", summary(groups))
    path = report.write_report(fs, root, current, groups, f"ivmix run {posixpath.basename(root) or root}", export,
                               paired=paired, reference=reference)
    report.log_report(mlflow, fs, root, path, current)
    found, baseline = [], {}
    if cfg.regression.baseline:
        found, baseline = regression_check(mlflow, cfg.regression, groups, run_id)
    mlflow.set_tag("healthy", str(healthy(groups, found, baseline)).lower())
    return found
