"""MLflow tracking: one parent run per experiment, one child run per trial, resume-aware.

Only the driver process writes (SQLite dislikes concurrent writers): Ray workers send their per-epoch
metrics back to the driver, which logs them here. A retried or resumed trial finds its own run again by the
trial-hash tag, so it never gets a duplicate.

Run layout (what tables.py and users rely on):
  parent run   tags detrdistill.kind=experiment, detrdistill.experiment=<spec name>, detrdistill.spec_hash (of the
               resolved spec and its trials' hashes: running the same trials again continues this run),
               detrdistill.submitted (ms of the latest run/resume of it), detrdistill.store (the trial store);
               artifacts spec.yaml (the resolved spec: `resume` reruns exactly it), table.{md,csv,tex}, plot.png
  child run    tags mlflow.parentRunId, detrdistill.kind=trial|teacher, detrdistill.trial_hash,
               detrdistill.status=pending|running|finished|failed|cached|interrupted, detrdistill.failure (the
               reason, when failed), detrdistill.attempts, axis.<dotted key>=<value> per ablation axis (also
               axis.variant, axis.seed), detrdistill.cells (JSON list of the coordinates of every table cell
               this trial stands for: several when the grid varies a setting the trial ignores);
               params = the resolved trial config flattened with dotted names;
               metrics per epoch (step = epoch): train/* loss terms, lr, epoch_time, AP, AP50, AP75, APs, APm, APl;
               artifacts checkpoint.pt, result.json, trial.json, log.txt (from the trial store).
Every run, parent and child, also records the code that wrote it (tags of `provenance`): detrdistill.git_commit,
detrdistill.git_dirty=true|false (uncommitted changes), detrdistill.method_version, detrdistill.version.<library>
for torch, ray, mlflow and optuna; resuming a parent or starting a trial records the code that does it.
A search (search.py) has the same shape: its parent run has detrdistill.kind=search and one child run per Tune
trial, identified by detrdistill.tune_trial_id (the same point may be sampled twice), besides its teachers'.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from trainers import version

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "detrdistill."
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def runs_page(experiment_id: str) -> str:
    """The path (after the server's address) of an experiment's runs table in MLflow's UI. Without the
    workflowType the UI opens on its GenAI pages (traces) whatever the experiment's kind: its sidebar mode comes
    from the URL, else the browser's last choice, GenAI by default."""
    return f"#/experiments/{experiment_id}?workflowType=machine_learning"
LIBRARIES = ("torch", "ray", "mlflow", "optuna")  # whose versions every run records


@functools.cache
def _environment() -> dict[str, str]:
    """The git commit of the checkout this package runs from ("unknown" outside one), whether it has uncommitted
    changes, and the libraries' versions (read from their metadata: the driver never imports torch). Once per
    process: it does not change while the process runs."""
    def git(*args: str) -> Optional[str]:
        try:  # --no-optional-locks: only read the repository, never refresh its index
            done = subprocess.run(["git", "--no-optional-locks", *args], cwd=Path(__file__).resolve().parent,
                                  capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    tags = {f"{TAG}git_commit": commit.strip() if commit else "unknown",
            f"{TAG}git_dirty": "unknown" if status is None else str(bool(status.strip())).lower()}
    for library in LIBRARIES:
        try:
            tags[f"{TAG}version.{library}"] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            tags[f"{TAG}version.{library}"] = "not installed"
    return tags


def provenance() -> dict[str, str]:
    """The tags of the code that writes a run: git commit and state, library versions, the method's version."""
    return {**_environment(), f"{TAG}method_version": str(version.METHOD_VERSION)}


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {dotted.key: str(value)}; lists are kept whole (as JSON) so an axis stays one param."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d) if isinstance(d, (list, tuple)) else str(d)}


def local_artifact_location(tracking_uri: str, experiment: str) -> Optional[str]:
    """Artifacts of a SQLite store live beside the database file (MLflow's default is ./mlruns in whatever
    directory the driver happens to run in); a server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts" / experiment).as_uri()


def tag_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


class Tracker:
    """A thin, explicit layer over MlflowClient (no fluent global state: the driver logs many runs)."""

    def __init__(self, experiment: str, tracking_uri: Optional[str] = None, create: bool = True):
        self.tracking_uri = tracking_uri or DEFAULT_TRACKING_URI
        # no mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI in this process and its children, which
        # would then become every later run's default (default_tracking_uri reads it)
        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None and not create:
            known = sorted(e.name for e in self.client.search_experiments() if e.name != "Default")
            raise LookupError(f"no experiment {experiment!r} in {self.tracking_uri}; experiments there: "
                              f"{', '.join(known) or 'none'}")
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=local_artifact_location(self.tracking_uri, experiment))
        if create and (found is None or found.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING):
            # MLflow's UI opens an experiment without this tag on its GenAI page (traces), not on the runs table
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        self.experiment = experiment

    # -- runs ---------------------------------------------------------------------------------------------
    def _search(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"], max_results=1000)

    def parent_run(self, spec_hash: str, spec_text: str, description: str = "", kind: str = "experiment",
                   reuse: bool = True) -> str:
        """The experiment's parent run for this spec content: found again if it exists and `reuse` (resume),
        else new. `kind` is experiment (an ablation) or search (every run of a search spec is a new search)."""
        runs = self._search(f"tags.`{TAG}kind` = '{kind}' and tags.`{TAG}spec_hash` = '{spec_hash}'") if reuse else []
        if runs:
            run_id = runs[0].info.run_id
            self.reopen_parent(run_id)
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.experiment, tags={
            f"{TAG}kind": kind, f"{TAG}experiment": self.experiment, f"{TAG}spec_hash": spec_hash,
            f"{TAG}submitted": str(int(time.time() * 1000)), "mlflow.note.content": description, **provenance()})
        self.client.log_text(run.info.run_id, spec_text, "spec.yaml")
        return run.info.run_id

    def reopen_parent(self, run_id: str) -> None:
        """Mark a parent run as running again (a resume), and as the experiment's latest."""
        tags = {f"{TAG}submitted": str(int(time.time() * 1000)), **provenance()}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.update_run(run_id, status="RUNNING")

    def trial_run(self, parent_id: str, trial_hash: str, name: str, kind: str, params: dict,
                  axes: dict, tags: Optional[dict] = None, identity: Optional[str] = None) -> tuple[str, bool]:
        """(run id, created) of the child run of `trial_hash` under `parent_id`; an existing one is reused.
        `identity` names another tag (in `tags`) that identifies the run instead: a search may sample the same
        point twice, and each of its trials is its own run (tag detrdistill.tune_trial_id)."""
        key = identity or f"{TAG}trial_hash"
        value = (tags or {}).get(key, trial_hash) if identity else trial_hash
        runs = self._search(f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{key}` = '{value}'")
        if runs:
            return runs[0].info.run_id, False
        tags = {"mlflow.parentRunId": parent_id, f"{TAG}kind": kind, f"{TAG}trial_hash": trial_hash,
                f"{TAG}status": "pending", **{f"axis.{k}": tag_value(v) for k, v in axes.items()},
                **provenance(), **(tags or {})}
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

    def log_metric(self, run_id: str, key: str, value: float, step: int = 0) -> None:
        self.client.log_metric(run_id, key, float(value), step=step)

    def set_status(self, run_id: str, status: str, reason: str = "", **tags: Any) -> None:
        """Set detrdistill.status (and the MLflow run status that matches it); `reason` goes to
        detrdistill.failure, other keyword tags to detrdistill.<key>."""
        items = [RunTag(f"{TAG}status", status)]
        items += [RunTag(f"{TAG}failure", reason[:5000])] if reason else []
        items += [RunTag(f"{TAG}{k}", tag_value(v)) for k, v in tags.items()]
        items += [RunTag(k, v) for k, v in provenance().items()] if status == "running" else []  # what trains it
        self.client.log_batch(run_id, tags=items)
        mlflow_status = {"finished": "FINISHED", "cached": "FINISHED", "failed": "FAILED",
                         "interrupted": "KILLED"}.get(status)
        if mlflow_status:
            self.client.set_terminated(run_id, status=mlflow_status)
        elif status == "running":
            self.client.update_run(run_id, status="RUNNING")

    def set_tags(self, run_id: str, **tags: Any) -> None:
        self.client.log_batch(run_id, tags=[RunTag(f"{TAG}{k}", tag_value(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def has_artifact(self, run_id: str, name: str) -> bool:
        return any(f.path == name for f in self.client.list_artifacts(run_id))

    def finish_parent(self, run_id: str, status: str = "FINISHED") -> None:
        """FINISHED, FAILED (some trial failed) or KILLED (interrupted; `resume` reopens it)."""
        self.client.set_terminated(run_id, status=status)

    # -- reading ------------------------------------------------------------------------------------------
    def latest_parent(self) -> Optional[Any]:
        """The parent run (an ablation or a search) most recently run or resumed (a resume reopens an older one)."""
        runs = self._search(f"tags.`{TAG}kind` = 'experiment'") + self._search(f"tags.`{TAG}kind` = 'search'")
        return max(runs, key=lambda r: int(r.data.tags.get(f"{TAG}submitted", r.info.start_time)), default=None)

    def child_runs(self, parent_id: str, **tags: str) -> list:
        """The child runs of a parent, or only those with these tag values."""
        where = "".join(f" and tags.`{k}` = '{v}'" for k, v in tags.items())
        return self._search(f"tags.`mlflow.parentRunId` = '{parent_id}'{where}")

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps (epochs) at which `key` was logged: what a resumed or cached trial must not log twice."""
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def spec_text(self, run_id: str) -> str:
        """The resolved spec a parent run was started from (its spec.yaml artifact)."""
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(run_id, "spec.yaml", tmp)).read_text(encoding="utf-8")
