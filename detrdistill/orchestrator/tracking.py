"""MLflow tracking: one parent run per experiment, one child run per trial, resume-aware.

Only the driver process writes (SQLite dislikes concurrent writers): Ray workers send their per-epoch
metrics back to the driver, which logs them here. A retried or resumed trial finds its own run again by the
trial-hash tag, so it never gets a duplicate.

Run layout (what tables.py and users rely on):
  parent run   tags detrdistill.kind=experiment, detrdistill.experiment=<spec name>, detrdistill.spec_hash
  child run    tags mlflow.parentRunId, detrdistill.kind=trial|teacher, detrdistill.trial_hash,
               detrdistill.status=running|finished|failed|cached, axis.<dotted key>=<value> per ablation axis
               (also axis.variant, axis.seed); params = the resolved trial config flattened with dotted names;
               metrics per epoch (step = epoch): train/* loss terms, lr, AP, AP50, AP75, APs, APm, APl.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "detrdistill."


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {dotted.key: str(value)}; lists are kept whole (as JSON) so an axis stays one param."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d) if isinstance(d, (list, tuple)) else str(d)}


def tag_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


class Tracker:
    """A thin, explicit layer over MlflowClient (no fluent global state: the driver logs many runs)."""

    def __init__(self, experiment: str, tracking_uri: Optional[str] = None):
        self.tracking_uri = tracking_uri or DEFAULT_TRACKING_URI
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.experiment = experiment

    # -- runs ---------------------------------------------------------------------------------------------
    def _search(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"], max_results=1000)

    def parent_run(self, spec_hash: str, spec_text: str, description: str = "") -> str:
        """The experiment's parent run for this spec content: found again if it exists (resume), else new."""
        runs = self._search(f"tags.`{TAG}kind` = 'experiment' and tags.`{TAG}spec_hash` = '{spec_hash}'")
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.experiment, tags={
            f"{TAG}kind": "experiment", f"{TAG}experiment": self.experiment, f"{TAG}spec_hash": spec_hash,
            "mlflow.note.content": description})
        self.client.log_text(run.info.run_id, spec_text, "spec.yaml")
        return run.info.run_id

    def trial_run(self, parent_id: str, trial_hash: str, name: str, kind: str, params: dict,
                  axes: dict) -> tuple[str, bool]:
        """(run id, created) of the child run of `trial_hash` under `parent_id`; an existing one is reused."""
        runs = self._search(f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TAG}trial_hash` = '{trial_hash}'")
        if runs:
            return runs[0].info.run_id, False
        tags = {"mlflow.parentRunId": parent_id, f"{TAG}kind": kind, f"{TAG}trial_hash": trial_hash,
                f"{TAG}status": "pending", **{f"axis.{k}": tag_value(v) for k, v in axes.items()}}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        flat = flatten(params)
        items = [Param(k, v[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id, True

    def run_tags(self, run_id: str) -> dict:
        return self.client.get_run(run_id).data.tags

    # -- logging ------------------------------------------------------------------------------------------
    def log_epoch(self, run_id: str, metrics: dict) -> None:
        step = int(metrics.get("epoch", 0))
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and k != "epoch"]
        self.client.log_batch(run_id, metrics=items)

    def set_status(self, run_id: str, status: str, reason: str = "") -> None:
        tags = [RunTag(f"{TAG}status", status)]
        if reason:
            tags.append(RunTag(f"{TAG}failure", reason[:5000]))
        self.client.log_batch(run_id, tags=tags)
        mlflow_status = {"finished": "FINISHED", "cached": "FINISHED", "failed": "FAILED"}.get(status)
        if mlflow_status:
            self.client.set_terminated(run_id, status=mlflow_status)
        elif status == "running":
            self.client.update_run(run_id, status="RUNNING")

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def finish_parent(self, run_id: str, failed: bool) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    # -- reading ------------------------------------------------------------------------------------------
    def latest_parent(self) -> Optional[Any]:
        runs = self._search(f"tags.`{TAG}kind` = 'experiment'")
        return runs[0] if runs else None

    def child_runs(self, parent_id: str) -> list:
        return self._search(f"tags.`mlflow.parentRunId` = '{parent_id}'")
