"""MLflow set-up for the driver: the tracking store (an embedded SQLite file keeps its artifacts beside it, never in
the current folder) and the up-front check of a named regression baseline. Only `jobs/generate.py` calls this."""
from __future__ import annotations

import logging
import os
import pathlib

logger = logging.getLogger(__name__)
SQLITE = "sqlite:///"


def start(mlflow, cfg) -> None:
    """Point MLflow at cfg.mlflow_uri and select cfg.experiment, creating it (with its artifacts beside a SQLite
    store, in `mlartifacts/`) when it does not exist yet."""
    uri = cfg.mlflow_uri
    artifacts = None
    if uri.startswith(SQLITE):
        db = pathlib.Path(os.path.abspath(uri[len(SQLITE):]))
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (db.parent / "mlartifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(cfg.experiment) is None:
            mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException as err:
        if "already exists" not in str(err).lower():  # another driver created it a moment ago
            raise ValueError(f"--mlflow-uri: {uri}: {' '.join(str(err).split())[:300]}") from None
    mlflow.set_experiment(cfg.experiment)


def check_baseline(mlflow, cfg) -> None:
    """A baseline named by run id must exist before any video is generated ("last" is looked up at the end)."""
    baseline = cfg.regression.baseline
    if not baseline or baseline == "last":
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(baseline)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"--baseline: no MLflow run {baseline!r} at {cfg.mlflow_uri}; give a run id of experiment "
                         f"{cfg.experiment!r} or 'last'") from None
