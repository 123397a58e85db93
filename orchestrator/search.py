"""Hyperparameter search: a spec's `search:` block run with Ray Tune, Optuna's sampler and, optionally, ASHA.

One search per cell of the variants x ablate grid; the cell's settings stay fixed while the search samples
the searched keys (student.* and distill.*). For each search:
1. Teachers first, through the scheduler and the content-addressed store (plan.teacher_plan): each distinct
   teacher is trained once (or found finished, by this or any experiment) and every trial of every cell
   reads that one checkpoint.
2. A Tuner runs `train_point` trials. OptunaSearch (TPE or random, seeded; its study in an SQLite file that
   optuna-dashboard opens) samples a point through `_Space`, which runs in the driver: the point is set into
   the cell's spec, validated as a whole spec and planned by plan.build_plan, before the trial starts. So a
   trial is exactly the TrialConfig an ablation of that spec would train, with the same resources
   (cpus_per_trial, also its torch threads; gpus_per_trial); an impossible point fails alone, with its reason.
3. The trial runs trainers.engine.run_trial and reports every epoch's metrics with its checkpoint to Tune:
   ASHA compares trials epoch by epoch, and a failed trial (a dead worker, Tune's max_failures =
   resources.max_retries) or an interrupted search resumes from the last epoch (tune.get_checkpoint).
4. MLflow is written by the driver alone (the `_Callback` Tune calls in the driver; SQLite dislikes
   concurrent writers): a parent run per search (kind=search), a child run per trial.
`detrdistill resume` continues an interrupted search with Tuner.restore: the searcher's state (Optuna's
trials, the sampler) and every trial's checkpoint come back, and the search ends with exactly num_samples
trials.

Files, under the trial store (runs/ by default):
  <store>/searches/<experiment>/<search id>/optuna.db          Optuna's studies, one per cell
                                           /tune/cell-<i>/        the Tune experiment (Tuner.restore reads it)
                                           /trials/<trial id>/    the trainer's folder: checkpoint.pt, trial.json, log.txt
                                           /cell-<i>.json         written once that cell's search has finished
Results: results/<experiment>/[cell-<i>/]best_config.yaml (a spec that `detrdistill run` accepts and that
trains the best trial's exact config), search_metric_per_trial.png, param_importances.png; with several
cells also table.{md,csv,tex} of each cell's best trial. All of them are artifacts of the parent run too.

MLflow layout of a search (besides tracking.py's): parent run tags detrdistill.kind=search,
detrdistill.search_dir, detrdistill.best.cell-<i> (JSON: trial, value, point); metrics best_<metric> (step =
cell index) and concurrency_max. Child runs: params = the sampled values (dotted spec keys), tags
detrdistill.tune_trial_id, detrdistill.cell, detrdistill.early_stopped=true|false, detrdistill.best=true on
each cell's best; per-epoch metrics as for any trial; artifacts trial.json, log.txt (and the best one's
checkpoint.pt).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import ray
from ray import tune

from orchestrator import tables
from orchestrator.cluster import tracking_uri_problem
from orchestrator.plan import LOG, TRIAL, build_plan, spec_text, teacher_plan
from orchestrator.scheduler import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, HEARTBEAT_S, Display,
                                    RunOptions, experiment_and_tracking, quiet_logging, ray_session, run_nodes,
                                    ui_command)
from orchestrator.spec import (SearchCell, SearchParam, Spec, point_spec, search_cells, teacher_trial,
                                          trial_hash)
from orchestrator.tracking import TAG, Tracker

SEARCHES = "searches"
BEST_CONFIG, TRIALS_PLOT, IMPORTANCE_PLOT = "best_config.yaml", "search_metric_per_trial.png", "param_importances.png"
STARTED, REPORTED = "started_at", "reported_at"  # wall-clock stamps every report carries: the concurrency measure
EVAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
CHECKPOINT = "checkpoint.pt"  # = trainers.engine.CHECKPOINT_NAME (not imported: the driver needs no torch)


# ------------------------------------------------------------------------------ sampling (in the driver)

def suggest(trial, key: str, param: SearchParam) -> Any:
    """One value of `param` from an Optuna trial (`key` is the parameter's name in the study)."""
    if param.type == "choice":
        return trial.suggest_categorical(key, param.values)
    if param.type == "int":
        return trial.suggest_int(key, int(param.low), int(param.high))
    return trial.suggest_float(key, float(param.low), float(param.high), log=param.type == "loguniform")


def resolve_point(cell: SearchCell, point: dict[str, Any], store: Path, tracking_uri: Optional[str]) -> dict:
    """The Tune config of a sampled point: the resolved TrialConfig (JSON) and its hash, exactly as an ablation
    of the point's spec would plan it (absolute paths, the teacher's checkpoint, torch threads = cpus_per_trial); or
    `_invalid` with the reason when the point makes an impossible trial."""
    try:
        plan = build_plan(point_spec(cell, point), store, tracking_uri)
    except ValueError as e:  # SpecError, or a runs:/ teacher that cannot be downloaded
        return {"_invalid": str(e)}
    node = next(n for n in plan.nodes.values() if n.cells)  # the student (teachers stand for no cell)
    return {"_trial": node.config.model_dump_json(), "_hash": node.hash}


class _Space:
    """Optuna's define-by-run space for one cell. OptunaSearch calls it in the driver for each new trial: it
    samples every searched key, then resolves the point (`resolve_point`); what it returns becomes the
    trial's Tune config, next to the sampled values. Plain data only: Tune pickles it into tuner.pkl."""

    def __init__(self, cell: SearchCell, space: dict[str, SearchParam], store: Path, tracking_uri: str,
                 work: Path):
        self.cell, self.store, self.tracking_uri, self.work = cell, str(store), tracking_uri, str(work)
        self.space = {key: param.model_dump() for key, param in space.items()}

    def __call__(self, trial) -> dict:
        point = {key: suggest(trial, key, SearchParam(**param)) for key, param in self.space.items()}
        return {**resolve_point(self.cell, point, Path(self.store), self.tracking_uri), "_work": self.work}


# ---------------------------------------------------------------------------- a trial (on a Ray worker)

def train_point(config: dict) -> None:
    """The Tune function trainable: train one sampled point with the engine an ablation trial runs, and report
    every epoch's metrics with its checkpoint. A restarted trial (a retry, a resumed search) resumes from the
    checkpoint Tune gives back."""
    from trainers.config import TrialConfig
    from trainers.engine import run_trial

    if "_invalid" in config:
        raise ValueError(f"this point makes an impossible trial: {config['_invalid']}")
    trial_id = tune.get_context().get_trial_id()
    trial = TrialConfig.model_validate_json(config["_trial"])
    trial.name = f"{trial.name.split('/')[0]}/trial {trial_id}"  # in its log lines; not part of its hash
    work = Path(config["_work"]) / trial_id
    work.mkdir(parents=True, exist_ok=True)
    (work / TRIAL).write_text(json.dumps(json.loads(config["_trial"]), indent=1))
    checkpoint, local = tune.get_checkpoint(), work / CHECKPOINT
    if checkpoint is not None:  # Tune's copy is the truth: it matches the epochs Tune has seen
        with checkpoint.as_directory() as folder:
            shutil.copyfile(Path(folder) / CHECKPOINT, local)
    elif local.exists():
        local.unlink()  # restarted from scratch: a stale checkpoint must not be resumed
    started = time.time()
    with open(work / LOG, "a", buffering=1) as log_file:
        log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} "
                       f"{'resumes from its checkpoint' if checkpoint is not None else 'starts'}\n")

        def report(metrics: dict, path: Optional[Path]) -> None:
            with tempfile.TemporaryDirectory(dir=work) as folder:
                _link_or_copy(path, Path(folder) / CHECKPOINT)  # Tune copies the folder into its storage now
                tune.report({**metrics, STARTED: started, REPORTED: time.time()},
                            checkpoint=tune.Checkpoint.from_directory(folder))

        try:
            run_trial(trial, work, report=report, log=lambda line: log_file.write(line + "\n"))
        except SystemExit:  # how Tune ends a trial it stops (ASHA, Ctrl-C): inside tune.report
            log_file.write("stopped by Tune\n")
            raise
        except BaseException:
            log_file.write(traceback.format_exc())
            raise


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no copy of a large checkpoint; the engine replaces its file, never rewrites it
    except OSError:
        shutil.copyfile(src, dst)


def _trial_dirname(trial) -> str:
    return trial.trial_id  # Tune's default puts every sampled value in the folder name


# -------------------------------------------------------------------------- MLflow (in the driver only)

_SESSIONS: dict[str, "_Session"] = {}


class _Callback(tune.Callback):
    """Forwards Tune's events, in the driver, to the live `_Session` registered under `key`. Tune pickles its
    callbacks into tuner.pkl and gives those back on Tuner.restore, so this holds nothing but the key: a
    resumed search reaches the new session, with its own MLflow client and output."""

    def __init__(self, key: str):
        self.key = key

    def _session(self) -> "_Session":
        return _SESSIONS[self.key]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._session().started(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._session().result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._session().completed(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._session().errored(trial)

    def on_experiment_end(self, trials, **info):
        self._session().ended(trials)

    def on_step_end(self, iteration, trials, **info):
        self._session().heartbeat(trials)


@dataclasses.dataclass
class _TrialRecord:
    trial_id: str
    name: str
    run_id: str
    point: dict[str, Any]
    epochs: int
    status: str = "running"  # running, finished, early_stopped, failed, interrupted
    epoch: int = 0
    value: Optional[float] = None
    logged: set = dataclasses.field(default_factory=set)  # epochs already in MLflow
    spans: dict[float, list[float]] = dataclasses.field(default_factory=dict)  # attempt start -> [start, last report]


class _Session:
    """What the driver knows of one cell's search while Tune runs it: a child run per trial, per-epoch
    metrics, statuses, progress lines, and when each trial ran (for the concurrency measure)."""

    def __init__(self, spec: Spec, cell: SearchCell, multi: bool, tracker: Tracker, parent_id: str,
                 display: Display):
        self.spec, self.cell, self.multi, self.tracker, self.parent_id = spec, cell, multi, tracker, parent_id
        self.display, self.search = display, spec.search
        self.records: dict[str, _TrialRecord] = {}

    def record(self, trial) -> _TrialRecord:
        """The trial's record and child run: found again by its Tune trial id (a resumed search), else new."""
        if trial.trial_id in self.records:
            return self.records[trial.trial_id]
        point = {key: trial.config.get(key) for key in self.search.space}
        number = str(trial.experiment_tag).split("_", 1)[0]  # Tune numbers the trials it creates: 1, 2, ...
        name = f"{self.cell.label + ' ' if self.multi else ''}trial {number}"
        tags = {f"{TAG}tune_trial_id": trial.trial_id, f"{TAG}cell": self.cell.key, f"{TAG}cells": "[]",
                f"{TAG}point": json.dumps(point, default=str)}
        trial_json = trial.config.get("_trial")
        if trial_json is not None:
            tags[f"{TAG}store_path"] = str(Path(trial.config["_work"]) / trial.trial_id)
        run_id, created = self.tracker.trial_run(self.parent_id, trial.config.get("_hash", "invalid"), name, "trial",
                                                 point, self.cell.coords, tags=tags, identity=f"{TAG}tune_trial_id")
        epochs = json.loads(trial_json)["schedule"]["epochs"] if trial_json else 0
        rec = _TrialRecord(trial.trial_id, name, run_id, point, epochs)
        if not created:
            rec.logged = self.tracker.logged_steps(run_id, "epoch_time")
        self.records[trial.trial_id] = rec
        return rec

    def started(self, trial) -> None:
        rec = self.record(trial)
        rec.status = "running"
        attempts = int(self.tracker.run_tags(rec.run_id).get(f"{TAG}attempts", 0)) + 1
        self.tracker.set_status(rec.run_id, "running", attempts=attempts)
        how = "resumes from its checkpoint" if trial.checkpoint is not None else "started"
        self.display.event(f"{rec.name}: {how} ({_show_point(rec.point)})")

    def result(self, trial, result: dict) -> None:
        rec = self.record(trial)
        rec.epoch = int(result.get("epoch", rec.epoch))
        rec.value = result.get(self.search.metric, rec.value)
        if STARTED in result:
            rec.spans.setdefault(result[STARTED], [result[STARTED], result[REPORTED]])[1] = result[REPORTED]
        if rec.epoch not in rec.logged:
            self.tracker.log_epoch(rec.run_id, _engine_metrics(result))
            rec.logged.add(rec.epoch)
        self.display.event(f"{rec.name}: epoch {rec.epoch}/{rec.epochs} {self.search.metric} {_fmt(rec.value)}")

    def completed(self, trial) -> None:
        rec = self.record(trial)
        last = trial.last_result or {}  # also what an earlier run of a resumed search saw
        rec.epoch, rec.value = max(rec.epoch, int(last.get("epoch", 0))), last.get(self.search.metric, rec.value)
        early = rec.epoch < rec.epochs
        rec.status = "early_stopped" if early else "finished"
        self._artifacts(rec, trial)
        self.tracker.set_status(rec.run_id, "finished", early_stopped=str(early).lower())
        how = f"stopped early by ASHA after epoch {rec.epoch}/{rec.epochs}" if early else "finished"
        self.display.event(f"{rec.name}: {how}, {self.search.metric} {_fmt(rec.value)}")

    def errored(self, trial) -> None:
        rec = self.record(trial)
        rec.status = "failed"
        reason = _failure(trial)
        self._artifacts(rec, trial)
        self.tracker.set_status(rec.run_id, "failed", reason=reason, early_stopped="false")
        self.display.event(f"{rec.name}: FAILED: {reason}")

    def ended(self, trials) -> None:
        """Tune's loop ended; trials still running were interrupted (their checkpoints are kept)."""
        for trial in trials:
            rec = self.records.get(trial.trial_id)
            if rec is not None and rec.status == "running":
                rec.status = "interrupted"
                self.tracker.set_status(rec.run_id, "interrupted")

    def heartbeat(self, trials) -> None:
        """A status line at least every HEARTBEAT_S, as the scheduler prints: epochs can be long."""
        if time.time() - self.display.last_line < HEARTBEAT_S:
            return
        running = [f"{rec.name} epoch {rec.epoch}/{rec.epochs}" for trial in trials
                   if trial.status == "RUNNING" and (rec := self.records.get(trial.trial_id)) is not None]
        done = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
        self.display.event(f"{done} of {self.search.num_samples} trial(s) done; running: {'; '.join(running) or 'none'}")

    def _artifacts(self, rec: _TrialRecord, trial) -> None:
        """The trial's config and log into its run. (The trainer's folder is on this machine unless the
        trial ran on another node of a cluster; then only Tune's storage has its checkpoint.)"""
        work = Path(trial.config.get("_work", "")) / trial.trial_id
        for name in (TRIAL, LOG):
            if (work / name).is_file() and not self.tracker.has_artifact(rec.run_id, name):
                self.tracker.log_artifact(rec.run_id, work / name)
        if rec.status != "failed":  # Tune keeps its own copy; a failed trial may still resume from this one
            (work / CHECKPOINT).unlink(missing_ok=True)


def _engine_metrics(result: dict) -> dict:
    """The engine's own metrics in a Tune result (Tune adds its bookkeeping: time_total_s, pid, config...)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and (k in ("epoch", "lr", "epoch_time") or k.startswith("train/") or k in EVAL_METRICS)}


def _failure(trial) -> str:
    """Why a trial failed, in one line: the exception the trainable raised."""
    error = trial.get_pickled_error()
    cause = getattr(error, "cause", None) or error
    if cause is None:
        text = (trial.get_error() or "unknown error").strip().splitlines()
        return text[-1] if text else "unknown error"
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _show_point(point: dict) -> str:
    return ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in point.items())


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most intervals that hold one instant in common (an end and a start at the same instant do not)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = running = 0
    for _, step in events:  # at equal times -1 sorts first
        running += step
        most = max(most, running)
    return most


# ------------------------------------------------------------------------------------------- the search

@dataclasses.dataclass
class CellResult:
    """One cell's finished (or interrupted) search."""
    cell: SearchCell
    trials: int = 0
    early_stopped: int = 0
    failed: int = 0
    best: Optional[dict] = None  # trial, name, value, point, run_id
    files: list[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False
    reason: str = ""  # why it could not run at all (a failed teacher)


@dataclasses.dataclass
class SearchOutcome:
    experiment: str
    exit_code: int
    parent_run_id: Optional[str] = None
    tracking_uri: str = ""
    search_dir: Optional[Path] = None
    cells: list[CellResult] = dataclasses.field(default_factory=list)
    concurrency: int = 0  # the most trials measured running at once, in this run (or resume)
    max_concurrent: int = 0
    message: str = ""  # why it could not start (exit 2)


def run_search(spec: Spec, options: Optional[RunOptions] = None, parent_run_id: Optional[str] = None
               ) -> SearchOutcome:
    """Run the searches of a validated spec with a `search:` block (one per cell): teachers first, then a Tune
    search per cell, tracked under one MLflow parent run (`parent_run_id`: resume that search). Never raises
    for a trial's failure: the outcome's exit code says how it ended."""
    options = options or RunOptions()
    quiet_logging()
    experiment, tracking_uri = experiment_and_tracking(spec, options)
    outcome = SearchOutcome(experiment, EXIT_OK, tracking_uri=tracking_uri)
    store = Path(options.store).resolve()
    problem = tracking_uri_problem(tracking_uri)
    if problem:
        outcome.exit_code, outcome.message = EXIT_INVALID, problem
        return outcome
    # the spec resolved for the cluster: the points' plans take their CPUs (torch threads) from it
    with ray_session(spec, options.ray_address) as (spec, problem):
        if problem:
            outcome.exit_code, outcome.message = EXIT_INVALID, problem
            return outcome
        return _Search(spec, options, store, tracking_uri, experiment, spec.resources.gpus_per_trial,
                       outcome).run(parent_run_id)


class _Search:
    def __init__(self, spec: Spec, options: RunOptions, store: Path, tracking_uri: str, experiment: str,
                 gpus: float, outcome: SearchOutcome):
        self.spec, self.options, self.store, self.experiment, self.gpus = spec, options, store, experiment, gpus
        self.search, self.outcome, self.out = spec.search, outcome, options.out
        self.tracker = Tracker(experiment, tracking_uri)
        self.cells = search_cells(spec)
        self.max_concurrent = self.search.max_concurrent or spec.resources.max_concurrent or self._fit()
        outcome.max_concurrent = self.max_concurrent
        self.sessions: list[_Session] = []  # of this run: what the concurrency is measured on

    def _fit(self) -> int:
        """As many trials as the cluster's CPUs (and GPUs) hold at once."""
        total = ray.cluster_resources()
        fit = int(total.get("CPU", 1) // self.spec.resources.cpus_per_trial)
        if self.gpus > 0:
            fit = min(fit, int(total.get("GPU", 0) // self.gpus))
        return max(fit, 1)

    # -- set-up ---------------------------------------------------------------------------------------------
    def run(self, parent_run_id: Optional[str]) -> SearchOutcome:
        self._parent(parent_run_id)
        self.display = Display(self.experiment, {}, self.out, live=False)
        self.db_uri = f"sqlite:///{self.search_dir / 'optuna.db'}"
        print(f"Search {self.experiment}: {len(self.cells)} search(es) of {self.search.num_samples} trials, "
              f"{self.search.direction}imising {self.search.metric}, up to {self.max_concurrent} at once "
              f"({self.spec.resources.cpus_per_trial} CPU(s), {self.gpus:g} GPU(s) each)\n"
              f"  Optuna study:  optuna-dashboard {self.db_uri}", file=self.out, flush=True)
        failed_teachers = self._teachers()
        if failed_teachers is None:
            return self._interrupted()
        for cell in self.cells:
            reason = failed_teachers.get(cell.index)
            result = CellResult(cell, reason=reason) if reason else self._run_cell(cell)
            self.outcome.cells.append(result)
            if result.interrupted:
                return self._interrupted()
        return self._finish()

    def _parent(self, parent_run_id: Optional[str]) -> None:
        """A new parent run (each `run` of a search spec is a new search), or the one being resumed."""
        if parent_run_id is None:
            text = spec_text(self.spec)
            spec_hash = hashlib.sha256(text.encode()).hexdigest()[:12]
            self.parent_id = self.tracker.parent_run(spec_hash, text, self.spec.description, kind="search",
                                                     reuse=False)
            self.search_dir = self.store / SEARCHES / self.experiment / self.parent_id[:12]
            self.tracker.set_tags(self.parent_id, store=str(self.store), search_dir=str(self.search_dir))
        else:
            self.parent_id = parent_run_id
            self.tracker.reopen_parent(parent_run_id)
            self.search_dir = Path(self.tracker.run_tags(parent_run_id)[f"{TAG}search_dir"])
        self.search_dir.mkdir(parents=True, exist_ok=True)
        self.outcome.parent_run_id, self.outcome.search_dir = self.parent_id, self.search_dir

    def _teachers(self) -> Optional[dict[int, str]]:
        """Train (or find) every teacher the cells need, once each, before any trial. Returns the cells that
        cannot run (their teacher failed) with the reason; None when interrupted."""
        specs = {cell.index: point_spec(cell, {}) for cell in self.cells}
        needed = {cell.label: specs[cell.index] for cell in self.cells if self._distils(specs[cell.index])}
        plan = teacher_plan(needed, self.store)
        failed: dict[int, str] = {}
        if plan.nodes:
            interrupted, states = run_nodes(self.spec, plan, self.options, self.tracker.tracking_uri,
                                            self.experiment, self.gpus, self.parent_id)
            if interrupted:
                return None
            for cell in self.cells:
                config = teacher_trial(specs[cell.index]) if cell.label in needed else None
                state = states.get(trial_hash(config)) if config is not None else None
                if state is not None and state.state == "failed":
                    failed[cell.index] = f"its teacher ({state.node.name}) failed: {state.reason}"
        for cell in self.cells:
            problem = self._ensure_data(specs[cell.index].data)
            if problem:
                failed.setdefault(cell.index, f"its dataset could not be made: {problem}")
        return failed

    def _distils(self, cell_spec: Spec) -> bool:
        """Whether some point of this cell distils (and so needs the teacher)."""
        method = self.search.space.get("distill.method")
        if method is not None and method.type == "choice":
            return any(v != "none" for v in method.values)
        return cell_spec.distill.method != "none"

    def _ensure_data(self, data) -> Optional[str]:
        """A synthetic dataset is generated once, here, rather than by every trial at once (the teachers'
        run made it already when there are teachers). Returns why it cannot be made, or None."""
        from trainers.data.synthetic import ensure_synthetic

        def progress(split: str, done: int, total: int) -> None:
            if done == total or (total >= 400 and done % (total // 4) == 0):
                self.display.event(f"synthetic dataset {data.root}: {split} {done}/{total} images")

        if data.format != "synthetic":
            return None
        try:
            ensure_synthetic(data.root, data.synthetic_train, data.synthetic_val, data.synthetic_seed,
                             data.synthetic_image_size, progress=progress)
        except (ValueError, OSError) as e:
            return str(e)
        return None

    # -- one cell -------------------------------------------------------------------------------------------
    def _run_cell(self, cell: SearchCell) -> CellResult:
        done = self.search_dir / f"{cell.key}.json"
        if done.is_file():  # finished before this resume
            result = CellResult(cell, **json.loads(done.read_text()))
            self.display.event(f"{cell.key}: this search finished earlier; best {self.search.metric} "
                               f"{_fmt(result.best and result.best['value'])}")
            return result
        key = f"{self.search_dir.name}/{cell.key}"
        session = _SESSIONS[key] = _Session(self.spec, cell, len(self.cells) > 1, self.tracker, self.parent_id,
                                            self.display)
        path = self.search_dir / "tune" / cell.key
        trainable = tune.with_resources(train_point, {"cpu": self.spec.resources.cpus_per_trial, "gpu": self.gpus})
        try:
            if tune.Tuner.can_restore(str(path)):
                self.display.event(f"{cell.key}: resuming the search from {path}")
                tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
            else:
                tuner = tune.Tuner(trainable, tune_config=self._tune_config(cell),
                                   run_config=self._run_config(cell, key))
            with _quiet_tune():
                grid = tuner.fit()
        finally:
            _SESSIONS.pop(key, None)
        self.sessions.append(session)
        statuses = [_status(r) for r in grid]
        if len(grid) < self.search.num_samples or "running" in statuses:
            return CellResult(cell, trials=sum(s != "running" for s in statuses), interrupted=True)
        result = self._cell_outputs(cell, grid, statuses)
        _close_orphans(self.db_uri, self._study_name(cell))
        done.write_text(json.dumps({k: v for k, v in dataclasses.asdict(result).items() if k != "cell"},
                                   default=str, indent=1))
        return result

    def _study_name(self, cell: SearchCell) -> str:
        return f"{self.experiment}/{self.search_dir.name}/{cell.key}" + (f" {cell.label}" if cell.label else "")

    def _tune_config(self, cell: SearchCell) -> tune.TuneConfig:
        import optuna
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        search = self.search
        sampler_spec = search.sampler
        with warnings.catch_warnings():  # constant_liar is marked experimental in some Optuna releases
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.RandomSampler(seed=sampler_spec.seed) if sampler_spec.type == "random" else \
                optuna.samplers.TPESampler(seed=sampler_spec.seed, n_startup_trials=sampler_spec.startup_trials or 10,
                                           constant_liar=self.max_concurrent > 1)  # no twin points in flight
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = _Space(cell, search.space, self.store, self.tracker.tracking_uri, self.search_dir / "trials")
        searcher = OptunaSearch(space, metric=search.metric, mode=search.direction, sampler=sampler,
                                study_name=self._study_name(cell),
                                storage=optuna.storages.RDBStorage(self.db_uri))
        scheduler = None
        if search.scheduler is not None:
            epochs = point_spec(cell, {}).student.schedule.epochs
            if "student.schedule.epochs" in search.space:
                epochs = max(v for _, v in search.space["student.schedule.epochs"].ends())
            scheduler = ASHAScheduler(time_attr="epoch", max_t=search.scheduler.max_t or epochs,
                                      grace_period=search.scheduler.grace_period,
                                      reduction_factor=search.scheduler.reduction_factor)
        # max_concurrent_trials wraps the searcher in a ConcurrencyLimiter: the cap on trials at once, and on
        # points TPE has handed out without results. (Ray 2.60 runs OptunaSearch trials in parallel with or
        # without it, as many as the CPUs hold: measured; some older releases did not.)
        return tune.TuneConfig(metric=search.metric, mode=search.direction, search_alg=searcher,
                               scheduler=scheduler, num_samples=search.num_samples,
                               max_concurrent_trials=self.max_concurrent, trial_dirname_creator=_trial_dirname,
                               reuse_actors=True)  # a new trial in a warm worker: no second start of torch

    def _run_config(self, cell: SearchCell, key: str) -> tune.RunConfig:
        return tune.RunConfig(
            name=cell.key, storage_path=str(self.search_dir / "tune"), callbacks=[_Callback(key)], verbose=0,
            failure_config=tune.FailureConfig(max_failures=self.spec.resources.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1))

    # -- outputs --------------------------------------------------------------------------------------------
    def _cell_outputs(self, cell: SearchCell, grid, statuses: list[str]) -> CellResult:
        """A finished cell: the best trial, its spec, the plots, and their place in MLflow and results/."""
        result = CellResult(cell, trials=len(grid), early_stopped=statuses.count("early_stopped"),
                            failed=statuses.count("failed"))
        out_dir = self.options.results_dir / self.experiment / (cell.key if len(self.cells) > 1 else "")
        out_dir.mkdir(parents=True, exist_ok=True)
        artifact_dir = cell.key if len(self.cells) > 1 else None
        best = _best(grid, self.search.metric, self.search.direction)
        paths = [_plot_trials(grid, statuses, self.search.metric, self.search.direction, out_dir / TRIALS_PLOT),
                 _plot_importances(self.db_uri, self._study_name(cell), out_dir / IMPORTANCE_PLOT)]
        if best is not None:
            point = {key: best.config[key] for key in self.search.space}
            trial_id = best.metrics["trial_id"]
            run = self.tracker.child_runs(self.parent_id, **{f"{TAG}tune_trial_id": trial_id})
            run_id = run[0].info.run_id if run else None
            value = best.metrics[self.search.metric]
            name = run[0].info.run_name if run else trial_id
            result.best = {"trial": trial_id, "name": name, "value": value, "point": point, "run_id": run_id}
            paths.insert(0, self._best_config(cell, point, result, out_dir / BEST_CONFIG))
            self.tracker.set_tags(self.parent_id, **{f"best.{cell.key}": json.dumps(result.best, default=str)})
            self.tracker.log_metric(self.parent_id, f"best_{_metric_key(self.search.metric)}", value, step=cell.index)
            if run_id is not None:
                self.tracker.set_tags(run_id, best="true", cells=json.dumps([cell.coords]))
                if best.checkpoint is not None and not self.tracker.has_artifact(run_id, CHECKPOINT):
                    self.tracker.log_artifact(run_id, Path(best.checkpoint.path) / CHECKPOINT)
        for path in paths:
            self.tracker.log_artifact(self.parent_id, path, artifact_dir)
        result.files = [str(p) for p in paths]
        return result

    def _best_config(self, cell: SearchCell, point: dict, result: CellResult, path: Path) -> Path:
        """The best point as a spec of its own: `detrdistill run` of it trains the best trial's exact config."""
        suffix = f"-best-{cell.index}" if len(self.cells) > 1 else "-best"
        top: dict[str, Any] = {"name": self.spec.name[:64 - len(suffix)] + suffix, "description": (
            f"Best configuration of search {self.experiment}" + (f" ({cell.label})" if cell.label else "")
            + f": {self.search.metric} {_fmt(result.best['value'])}")}
        if "tracking" in cell.raw:  # its own MLflow experiment (its name), not the search's
            top["tracking"] = {k: v for k, v in cell.raw["tracking"].items() if k != "experiment"}
        best_spec = point_spec(cell, point, **top)
        header = (f"# The best trial ({result.best['name']}, {self.search.metric} {_fmt(result.best['value'])}) of "
                  f"{result.trials} in search {self.experiment} (MLflow run {self.parent_id}).\n"
                  f"# Searched: {_show_point(point)}\n"
                  f"#   detrdistill validate {path.name}\n#   detrdistill run {path.name}\n")
        path.write_text(header + spec_text(best_spec), encoding="utf-8")
        return path

    def _finish(self) -> SearchOutcome:
        cells, out = self.outcome.cells, self.out
        spans = [tuple(s) for session in self.sessions for rec in session.records.values()
                 for s in rec.spans.values()]
        self.outcome.concurrency = max_overlap(spans)
        if spans:  # none when every cell had finished before this resume
            self.tracker.log_metric(self.parent_id, "concurrency_max", self.outcome.concurrency)
        if len(self.cells) > 1 or self.spec.table is not None:
            table, _ = tables.write_parent_outputs(self.tracker, self.parent_id, self.spec,
                                                   self.options.results_dir / self.experiment)
            print("\n" + tables.render(table, "md"), file=out)
        failed = [c for c in cells if c.best is None]
        self.tracker.finish_parent(self.parent_id, status="FAILED" if failed else "FINISHED")
        for c in cells:
            where = f" ({c.cell.label})" if c.cell.label else ""
            if c.best is None:
                print(f"\nSearch{where}: no trial finished{': ' + c.reason if c.reason else ''}", file=out)
                continue
            asha = f"{c.early_stopped} stopped early by ASHA, " if self.search.scheduler else ""
            print(f"\nSearch{where}: {c.trials} trials ({asha}{c.failed} failed); "
                  f"best {self.search.metric} {_fmt(c.best['value'])} by {c.best['name']}: "
                  f"{_show_point(c.best['point'])}\n  best config: {c.files[0]}  (detrdistill run {c.files[0]})",
                  file=out)
        if spans:
            print(f"\nconcurrency: max {self.outcome.concurrency} of max_concurrent {self.max_concurrent} "
                  f"(trials running at once, from each start to its last report)", file=out)
        print(f"Optuna dashboard:  optuna-dashboard {self.db_uri}", file=out)
        print(f"MLflow UI on these runs:  {ui_command(self.tracker.tracking_uri, self.tracker.experiment_id)}",
              file=out, flush=True)
        self.outcome.exit_code = EXIT_FAILED if failed else EXIT_OK
        return self.outcome

    def _interrupted(self) -> SearchOutcome:
        self.tracker.finish_parent(self.parent_id, status="KILLED")
        done = sum(c.trials for c in self.outcome.cells)
        flags = f" --tracking-uri {self.tracker.tracking_uri}" if self.options.tracking_uri else ""
        flags += f" --store {self.store}" if self.store != Path("runs").resolve() else ""
        print(f"\nInterrupted: {done} trial(s) finished; the others keep their last checkpoint in "
              f"{self.search_dir}.\nResume with:  detrdistill resume {self.experiment}{flags}", file=self.out,
              flush=True)
        self.outcome.exit_code = EXIT_INTERRUPTED
        return self.outcome


# Tune's console output is replaced by our progress lines: the legacy reporter at verbose 0 prints nothing
# (the new one prints a banner whatever the verbosity); a snapshot of the experiment state after every
# checkpoint is what num_to_keep asks for, not a problem worth a warning each time.
QUIET_TUNE = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune without its console output, and with the Ctrl-C handler put back afterwards: Tune installs its
    own (stop gracefully, save the experiment state) and leaves it there when the run ends normally.

    Also without Optuna's "step is already reported" warning. On a resumed search the Optuna study (SQLite,
    written at every report) can be ahead of Tune's experiment snapshot (written now and then): a trial then
    restarts from the checkpoint before its last reported epoch and reports that epoch again, with the same
    value (resume is exact), and Optuna keeps the first."""
    saved_env = {k: os.environ.get(k) for k in QUIET_TUNE}
    os.environ.update({k: os.environ.get(k, v) for k, v in QUIET_TUNE.items()})
    tune_logger = logging.getLogger("ray.tune")  # its messages (how to Tuner.restore, trial tracebacks) are
    level = tune_logger.level                    # said our way: resume command, FAILED line, the trial's log.txt
    tune_logger.setLevel(logging.CRITICAL)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The reported value is ignored because this `step=",
                                    category=UserWarning)
            yield
    finally:
        tune_logger.setLevel(level)
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if main:
            signal.signal(signal.SIGINT, previous)


def _status(result) -> str:
    """finished, early_stopped, failed or running (not finished: an interrupted search)."""
    if result.error is not None:
        return "failed"
    metrics = result.metrics or {}
    if not metrics.get("done"):
        return "running"
    epochs = json.loads(result.config["_trial"])["schedule"]["epochs"] if "_trial" in result.config else 0
    return "early_stopped" if metrics.get("epoch", 0) < epochs else "finished"


def _best(grid, metric: str, mode: str):
    """The best trial by its last reported value (ASHA-stopped ones included), or None."""
    try:
        return grid.get_best_result(metric=metric, mode=mode, scope="last", filter_nan_and_inf=True)
    except RuntimeError:  # no trial reported the metric
        return None


def _metric_key(metric: str) -> str:
    return metric.replace("/", "_")


def _close_orphans(db_uri: str, study_name: str) -> None:
    """Optuna trials still RUNNING once the search finished were asked for before an interruption that Tune's
    saved state did not see (a killed driver); they never ran. Mark them failed so the study is clean."""
    import optuna
    storage = optuna.storages.RDBStorage(db_uri)
    study_id = storage.get_study_id_from_name(study_name)
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                       optuna.trial.TrialState.FAIL)


# ------------------------------------------------------------------------------------------------ plots

def _plot_trials(grid, statuses: list[str], metric: str, mode: str, path: Path) -> Path:
    """Left: the metric per epoch of every trial (ASHA's cuts show as short dashed lines). Right: each
    trial's last value in trial order, and the best so far."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, final) = plt.subplots(1, 2, figsize=(11, 4))
    best, best_so_far = None, []
    for number, (result, status) in enumerate(zip(grid, statuses), start=1):
        frame = result.metrics_dataframe
        if frame is not None and metric in frame and "epoch" in frame:
            curves.plot(frame["epoch"], frame[metric], "--" if status == "early_stopped" else "-", marker="o",
                        markersize=3, alpha=0.8, label=f"trial {number}")
        value = (result.metrics or {}).get(metric)
        if value is None or math.isnan(value):
            continue
        marker = {"finished": "o", "early_stopped": "v", "failed": "x"}.get(status, ".")
        final.scatter([number], [value], marker=marker, color="C0" if status == "finished" else "C3")
        best = value if best is None else (max if mode == "max" else min)(best, value)
        best_so_far.append((number, best))
    curves.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (dashed: stopped early)")
    if len(grid) <= 12:
        curves.legend(loc="best", fontsize="small")
    if best_so_far:
        final.step(*zip(*best_so_far), where="post", color="C2", label=f"best so far ({mode})")
        final.legend(loc="best")
    final.set(xlabel="trial", ylabel=f"last {metric}", title="per trial (v: stopped early, x: failed)")
    for ax in (curves, final):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_importances(db_uri: str, study_name: str, path: Path) -> Path:
    """Optuna's parameter importances (optuna.importance, fANOVA) over the study's finished trials."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    study = optuna.load_study(study_name=study_name, storage=db_uri)
    fig, ax = plt.subplots(figsize=(7, 3))
    try:
        with warnings.catch_warnings():  # a few trials make for rough importances; the plot says how many
            warnings.simplefilter("ignore")
            # fANOVA, seeded: the same study gives the same plot (Optuna 5's default is PED-ANOVA)
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as e:  # fewer than two finished trials, or nothing varied
        ax.text(0.5, 0.5, f"no importances: {e}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    else:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title=f"parameter importances ({len(study.trials)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
