"""Run an experiment's DAG on Ray: one task per trial, MLflow written by the driver alone, progress, the table.

How metrics flow: a Ray task runs trainers.engine.run_trial in <store>/<hash>/; its report callback puts
(hash, "epoch", metrics) in the driver's Mailbox (an actor). The driver's loop waits on the tasks with a
short timeout, empties the mailbox and logs each epoch to the trial's child run (one writer: SQLite dislikes
concurrent ones). When a task returns, its result (also in result.json) carries the whole per-epoch history;
the driver logs any epoch it missed (a retried attempt never reports the epochs before its checkpoint, an
interrupted driver may have missed some), so every child run ends with each epoch exactly once.

Faults: a dead worker process is retried by Ray (resources.max_retries) and resumes from its checkpoint in
the same child run; an exception (NaN loss, bad data) is not retried: the trial fails with its reason, and
the students of a failed teacher fail with it, while every other trial goes on. Ctrl-C cancels what runs,
keeps the checkpoints and says how to resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

import ray

from orchestrator import tables
from orchestrator.cluster import ray_address_problem, tracking_uri_problem
from orchestrator.plan import (CHECKPOINT, LOG, TRIAL, Node, Plan, build_plan, read_result,
                                          spec_text)
from orchestrator.spec import Spec
from orchestrator.store_trial import train_in_store
from orchestrator.tracking import TAG, Tracker, runs_page

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
POLL_S = 0.25  # how long the driver waits on the tasks before emptying the mailbox again
HEARTBEAT_S = 30.0  # plain (non-terminal) output: a status line at least this often
DONE = ("finished", "cached", "failed")


def default_tracking_uri() -> str:
    """MLflow's own MLFLOW_TRACKING_URI when set (a cluster's server), else mlflow.db in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: the same database from any directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def ui_command(tracking_uri: str, experiment_id: str) -> str:
    """How to see an experiment's runs in MLflow's UI: the server's page of its runs table."""
    page = runs_page(experiment_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000/{page}"


def quiet_logging() -> None:
    """MLflow logs its database set-up and alembic migrations at INFO; progress is ours to show."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files (spec.yaml): no bars
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # per run, over our progress


# ---------------------------------------------------------------------------------------------- Ray

def start_ray(address: Optional[str] = None) -> bool:
    """Connect to `address`, or start an in-process local cluster. Returns whether this call started Ray
    (and so should shut it down); an already initialized Ray (tests, notebooks) is used as it is.
    ConnectionError, saying what to do, when no cluster answers at `address` or it refuses this driver."""
    if ray.is_initialized():
        return False
    if address:
        problem = ray_address_problem(address)  # at once: ray.init waits minutes for a head that is not there
        if problem:
            raise ConnectionError(problem)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as e:  # it answers (checked above) but refuses us
            if address == "auto":  # not checked before: Ray looks for the cluster itself
                raise ConnectionError(f"--ray-address auto: no Ray cluster found on this machine ({e})") from None
            raise ConnectionError(
                f"the Ray cluster at {address} answers but does not let this driver in ({e}). A cluster with "
                f"token authentication (Ray >= 2.59 turns it on for `ray start --head`) needs its token here: "
                f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, and RAY_AUTH_MODE=token") from None
        return True
    # Ray 2.59+ turns on token authentication for local clusters (creating ~/.ray/auth_token once) and warns
    # that it did on every start. Keep the protection, drop the warning. (Setting RAY_AUTH_MODE here would be
    # too late: Ray reads it when imported.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # address="local": a new cluster of our own. Without it Ray connects to the last cluster that `ray start`
    # began on this machine (/tmp/ray/ray_current_cluster), even one that has since died.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, object_store_memory=256 * 1024 ** 2)  # results are small
    return True


@contextlib.contextmanager
def ray_session(spec: Spec, address: Optional[str]) -> Iterator[tuple[Spec, Optional[str]]]:
    """Ray for one run or search of `spec`: the cluster at `address`, else a local one started here, shut down
    on leaving when this session started it. Yields (the spec with its per-trial resources resolved for the
    cluster, None), or (spec, why it cannot run: no cluster answers at `address` or it refuses this driver, or
    no node can hold one trial)."""
    try:
        started = start_ray(address)
    except ConnectionError as e:
        yield spec, str(e)
        return
    try:
        spec = resolve_resources(spec)
        yield spec, check_resources(spec, spec.resources.gpus_per_trial)
    finally:
        if started:
            ray.shutdown()


def experiment_and_tracking(spec: Spec, options: "RunOptions") -> tuple[str, str]:
    """The MLflow experiment name and the absolute tracking URI a run of `spec` uses."""
    experiment = spec.tracking.experiment or spec.name
    return experiment, absolute_tracking_uri(options.tracking_uri or spec.tracking.tracking_uri
                                             or default_tracking_uri())


def resolve_resources(spec: Spec) -> Spec:
    """The spec with its per-trial resources made concrete for the connected cluster: GPUs, the spec's, else 1
    when the cluster has GPUs and 0 when it has none; CPUs, the spec's, else `trial_cpus` of the live nodes."""
    res = spec.resources
    gpus = res.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    cpus = res.cpus_per_trial
    if cpus is None:
        cpus = trial_cpus([n["Resources"] for n in ray.nodes() if n.get("Alive")], gpus)
    return spec.model_copy(update={"resources": res.model_copy(update={"gpus_per_trial": gpus,
                                                                         "cpus_per_trial": cpus})})


def trial_cpus(nodes: list[dict], gpus: float) -> int:
    """CPUs for a trial that asks for none, given the nodes' resources ({"CPU": n, "GPU": m}): a CPU trial 1;
    a GPU trial its share of a GPU node's CPUs, CPUs per GPU x its GPUs (the best-provisioned node's, at least
    1), so that one trial per GPU uses the whole machine's cores: the KD assignment solve runs on them."""
    if gpus <= 0:
        return 1
    shares = [r.get("CPU", 0) / r["GPU"] for r in nodes if r.get("GPU", 0) > 0]
    return max(1, int(max(shares, default=1) * gpus))


def check_resources(spec: Spec, gpus: float) -> Optional[str]:
    """Why no node of the cluster can ever run one trial (Ray would wait forever), or None."""
    cpus = spec.resources.cpus_per_trial
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return None
    most_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    most_gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    return (f"a trial asks for {cpus} CPU(s) and {gpus:g} GPU(s) but the largest Ray node has {most_cpus:g} "
            f"CPU(s) and {most_gpus:g} GPU(s); set resources.cpus_per_trial / gpus_per_trial lower (e.g. "
            f"--set resources.cpus_per_trial={int(most_cpus) or 1}) or give a bigger cluster with --ray-address")


@ray.remote(num_cpus=0)
class Mailbox:
    """The driver's inbox of progress messages. A plain (not async) actor: it runs each sender's calls in the
    order they were sent (ray.util.queue.Queue is an async actor and does not, once nobody waits on a put)."""

    def __init__(self):
        self.messages: list[tuple] = []

    def post(self, message: tuple) -> None:
        self.messages.append(message)

    def take(self) -> list[tuple]:
        messages, self.messages = self.messages, []
        return messages


def send(mailbox, message: tuple) -> None:
    """Post a message from a task without waiting for it. Waiting (ray.get) would let Ray lend the task's
    CPU to another task: with blocking puts, 2 CPUs ran 3 one-CPU trials at once."""
    mailbox.post.remote(message)


def _train_task(node_hash: str, config_json: dict, workdir: str, mailbox) -> dict:
    """A Ray task: train one trial in its store folder, sending progress to the driver through `mailbox`."""
    return train_in_store(node_hash, config_json, workdir,
                          lambda kind, payload: send(mailbox, (node_hash, kind, payload, time.time())))


def _data_task(key: str, data_json: dict, mailbox) -> str:
    """A Ray task: generate the synthetic dataset once, before the trials that read it."""
    from trainers.data.synthetic import ensure_synthetic

    def progress(split: str, done: int, total: int) -> None:
        if done == total or (total >= 400 and done % (total // 4) == 0):
            send(mailbox, (key, "log", f"synthetic dataset {data_json['root']}: {split} {done}/{total} images",
                         time.time()))

    ensure_synthetic(data_json["root"], data_json["synthetic_train"], data_json["synthetic_val"],
                     data_json["synthetic_seed"], data_json["synthetic_image_size"],
                     data_json["synthetic_max_objects"], data_json["synthetic_min_size"], progress=progress,
                     classes=data_json["synthetic_classes"])
    return key


train_remote = ray.remote(_train_task)
data_remote = ray.remote(_data_task)


def _data_key(node: Node) -> Optional[str]:
    data = node.config.data
    if data.format != "synthetic":
        return None
    return "data:" + hashlib.sha256(json.dumps(data.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def _failure(error: BaseException, retries: int) -> str:
    """The reason a task failed, in one line a user can act on."""
    if isinstance(error, ray.exceptions.RayTaskError):  # the task raised: report what it raised
        cause = error.cause if error.cause is not None else error
        lines = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {lines[0] if lines else ''}"
    if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                          ray.exceptions.OutOfMemoryError)):
        return (f"its worker process died {retries + 1} time(s) ({type(error).__name__}); the last checkpoint is "
                f"kept and resume continues from it")
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ------------------------------------------------------------------------------------------- progress

@dataclasses.dataclass
class TrialState:
    node: Node
    run_id: str
    state: str = "pending"  # pending, waiting, queued, running, finished, cached, failed, interrupted
    epoch: int = 0
    step: str = ""
    loss: Optional[float] = None
    ap: Optional[float] = None
    attempts: int = 0
    reason: str = ""
    logged: set = dataclasses.field(default_factory=set)  # epochs already in MLflow
    # time.time() stamps for the orchestration benchmark: submitted and ended (result processed) by the
    # driver; started, first step logged and finished by the worker
    submitted_at: Optional[float] = None
    started_at: Optional[float] = None
    first_step_at: Optional[float] = None
    finished_at: Optional[float] = None
    ended_at: Optional[float] = None

    @property
    def epochs(self) -> int:
        return self.node.config.schedule.epochs

    def summary(self) -> str:
        parts = [f"epoch {self.epoch}/{self.epochs}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.ap is not None:
            parts.append(f"AP {100 * self.ap:.1f}")
        return " ".join(parts)


class Display:
    """Progress: a rich live table on a terminal; elsewhere (CI logs, pipes) plain lines: one per event and
    epoch, and a status line of the running trials at least every HEARTBEAT_S."""

    def __init__(self, title: str, states: dict[str, TrialState], out: TextIO, live: Optional[bool] = None):
        self.title, self.states, self.out = title, states, out
        self.start = time.time()
        self.last_line = self.start
        self.live = None
        if live if live is not None else out.isatty():
            from rich.console import Console
            from rich.live import Live
            self.console = Console(file=out)
            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def _clock(self) -> str:
        s = int(time.time() - self.start)
        return f"{s // 60:02d}:{s % 60:02d}"

    def event(self, text: str) -> None:
        if self.live is not None:
            self.console.print(f"[{self._clock()}] {text}", markup=False, highlight=False)
        else:
            print(f"[{self._clock()}] {text}", file=self.out, flush=True)
        self.last_line = time.time()

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
        elif time.time() - self.last_line >= HEARTBEAT_S:
            running = [f"{s.node.name}: {s.summary()}" + (f" step {s.step}" if s.step else "")
                       for s in self.states.values() if s.state == "running"]
            counts = {k: sum(s.state == k for s in self.states.values()) for k in ("finished", "cached", "failed")}
            done = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
            self.event(f"{done or '0 finished'} of {len(self.states)}; running: {'; '.join(running) or 'none'}")

    def _table(self):
        from rich.table import Table
        table = Table(title=f"{self.title}  [{self._clock()}]", title_justify="left")
        for column in ("trial", "state", "epoch", "step", "loss", "AP"):
            table.add_column(column, justify="right" if column in ("epoch", "loss", "AP") else "left")
        for s in self.states.values():
            table.add_row(s.node.name, s.state, f"{s.epoch}/{s.epochs}", s.step,
                          f"{s.loss:.3f}" if s.loss is not None else "",
                          f"{100 * s.ap:.1f}" if s.ap is not None else "")
        return table

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()


# --------------------------------------------------------------------------------------------- driver

@dataclasses.dataclass
class RunOptions:
    store: Path = Path("runs")
    tracking_uri: Optional[str] = None  # None: the spec's tracking.tracking_uri, else sqlite:///<cwd>/mlflow.db
    ray_address: Optional[str] = None
    results_dir: Path = Path("results")
    out: TextIO = dataclasses.field(default_factory=lambda: sys.stdout)
    live: Optional[bool] = None  # None: a live table when `out` is a terminal


@dataclasses.dataclass
class Outcome:
    experiment: str
    exit_code: int
    parent_run_id: Optional[str] = None
    tracking_uri: str = ""
    states: dict[str, TrialState] = dataclasses.field(default_factory=dict)
    table: Optional[tables.Table] = None
    message: str = ""  # why it could not start (exit 2)

    @property
    def failed(self) -> dict[str, str]:
        return {s.node.name: s.reason for s in self.states.values() if s.state == "failed"}


def run_experiment(spec: Spec, options: Optional[RunOptions] = None, parent_run_id: Optional[str] = None) -> Outcome:
    """Run every trial of a validated spec (those already finished in the store are reused, interrupted
    ones resume), track it in MLflow under one parent run (`parent_run_id`: continue that one), and write
    the table. Never raises for a trial's failure: the Outcome's exit code says it."""
    options = options or RunOptions()
    quiet_logging()
    experiment, tracking_uri = experiment_and_tracking(spec, options)
    outcome = Outcome(experiment, EXIT_OK, tracking_uri=tracking_uri)
    problem = tracking_uri_problem(tracking_uri)
    if problem:
        outcome.exit_code, outcome.message = EXIT_INVALID, problem
        return outcome
    try:
        plan = build_plan(spec, options.store, tracking_uri)
    except (ValueError, ConnectionError) as e:  # a runs:/ teacher that cannot be downloaded, a dataset file gone
        outcome.exit_code, outcome.message = EXIT_INVALID, str(e)
        return outcome
    with ray_session(spec, options.ray_address) as (spec, problem):
        if problem:
            outcome.exit_code, outcome.message = EXIT_INVALID, problem
            return outcome
        for node in plan.nodes.values():  # torch threads = the CPUs Ray gives the trial
            node.config.runtime.threads = spec.resources.cpus_per_trial
        driver = _Driver(spec, plan, options, tracking_uri, experiment, spec.resources.gpus_per_trial)
        driver.prepare(parent_run_id)
        outcome.parent_run_id, outcome.states = driver.parent_id, driver.states
        interrupted = driver.loop()
        outcome.table = driver.finish(interrupted)
        failed = any(s.state == "failed" for s in driver.states.values())
        outcome.exit_code = EXIT_INTERRUPTED if interrupted else EXIT_FAILED if failed else EXIT_OK
        return outcome


def run_nodes(spec: Spec, plan: Plan, options: RunOptions, tracking_uri: str, experiment: str, gpus: float,
              parent_run_id: str) -> tuple[bool, dict[str, TrialState]]:
    """Run a plan's nodes as child runs of an existing parent run, with no table at the end: the teachers a
    search trains before its trials. Returns (interrupted, the state of every node)."""
    driver = _Driver(spec, plan, options, tracking_uri, experiment, gpus)
    driver.prepare(parent_run_id)
    interrupted = driver.loop()
    driver.close()
    return interrupted, driver.states


@dataclasses.dataclass
class _CtrlC:
    pressed: bool = False


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[_CtrlC]:
    """While inside: the first SIGINT sets `.pressed`, a second raises KeyboardInterrupt. Outside the main
    thread (where no handler can be installed) SIGINT keeps raising KeyboardInterrupt."""
    ctrl_c = _CtrlC()
    if threading.current_thread() is not threading.main_thread():
        yield ctrl_c
        return

    def handler(signum, frame):
        if ctrl_c.pressed:
            raise KeyboardInterrupt
        ctrl_c.pressed = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)


class _Driver:
    def __init__(self, spec: Spec, plan: Plan, options: RunOptions, tracking_uri: str, experiment: str,
                 gpus: float):
        self.spec, self.plan, self.options, self.experiment = spec, plan, options, experiment
        self.tracker = Tracker(experiment, tracking_uri)
        res = spec.resources
        self.task_options = dict(num_cpus=res.cpus_per_trial, num_gpus=gpus, max_retries=res.max_retries,
                                 retry_exceptions=False)
        self.states: dict[str, TrialState] = {}
        self.in_flight: dict[Any, str] = {}  # ObjectRef -> node hash or data key
        self.data: dict[str, str] = {}  # data key -> "pending" | "running" | "ready" | failure reason
        self.mailbox = None  # the Mailbox actor
        self.display: Optional[Display] = None

    # -- set-up -------------------------------------------------------------------------------------------
    def prepare(self, parent_run_id: Optional[str]) -> None:
        text = spec_text(self.spec)
        if parent_run_id is None:
            # with its trials' hashes: the same spec under another method version or dataset is another parent
            # run, whose table does not mix the new trials with the old
            identity = text + "\n".join(sorted(self.plan.nodes))
            spec_hash = hashlib.sha256(identity.encode()).hexdigest()[:12]
            self.parent_id = self.tracker.parent_run(spec_hash, text, self.spec.description)
        else:
            self.parent_id = parent_run_id
            self.tracker.reopen_parent(parent_run_id)
        self.tracker.set_tags(self.parent_id, store=str(self.plan.store))
        for node in self.plan.nodes.values():
            run_id, created = self.tracker.trial_run(
                self.parent_id, node.hash, node.name, node.kind, node.config.model_dump(mode="json"), node.axes,
                tags={f"{TAG}cells": json.dumps(node.cells), f"{TAG}store_path": str(self.plan.workdir(node.hash))})
            state = TrialState(node, run_id)
            if not created:
                state.logged = self.tracker.logged_steps(run_id, "epoch_time")
                tags = self.tracker.run_tags(run_id)
                state.attempts = int(tags.get(f"{TAG}attempts", 0))
            self.states[node.hash] = state
        self.mailbox = Mailbox.remote()
        self.display = Display(f"{self.experiment}: {len(self.states)} trial(s)", self.states, self.options.out,
                               self.options.live)
        for state in self.states.values():
            result = read_result(self.plan.workdir(state.node.hash))
            if result is not None:
                previous = self.tracker.run_tags(state.run_id).get(f"{TAG}status")
                self._complete(state, result, how="earlier" if previous in ("finished", "cached") else "cached")
            else:
                state.state = "waiting" if state.node.needs else "pending"

    # -- the loop -----------------------------------------------------------------------------------------
    def loop(self) -> bool:
        """Run until every trial is done; True when interrupted (Ctrl-C).

        Ctrl-C only raises a flag that the loop reads between its steps (at most POLL_S apart): raised as an
        exception inside an MLflow call, it would leave SQLite locked by the half-done transaction, and the
        interrupted trials could not be marked so. A second Ctrl-C stops at once. A first Ctrl-C that arrives
        after the last trial has finished interrupts nothing: the run ends as if it had not come, table and all."""
        with _ctrl_c_deferred() as ctrl_c:
            try:
                while not ctrl_c.pressed:
                    self._submit_ready()
                    if not self.in_flight:
                        return False
                    ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=POLL_S, fetch_local=False)
                    self._drain()
                    for ref in ready:
                        self._task_done(ref)
                    self.display.refresh()
                if all(s.state in DONE for s in self.states.values()):
                    return False
            except KeyboardInterrupt:  # the second Ctrl-C, or the first where no handler could be installed
                pass
            self._interrupt()
            return True

    def _submit_ready(self) -> None:
        cap = self.spec.resources.max_concurrent
        done = {h for h, s in self.states.items() if s.state in ("finished", "cached")}
        for state in self.states.values():
            if state.state not in ("pending", "waiting") or (state.node.needs and state.node.needs not in done):
                continue
            key = _data_key(state.node)
            if key is not None and self.data.get(key) != "ready":
                self._prepare_data(key, state.node)
                if self.data[key] not in ("pending", "running", "ready"):
                    self._fail(state, f"its dataset could not be made: {self.data[key]}")
                continue
            if cap is not None and sum(s.state in ("queued", "running") for s in self.states.values()) >= cap:
                return
            ref = train_remote.options(**self.task_options, name=f"trial {state.node.name}").remote(
                state.node.hash, state.node.config.model_dump(mode="json"), str(self.plan.workdir(state.node.hash)),
                self.mailbox)
            self.in_flight[ref] = state.node.hash
            state.state, state.submitted_at = "queued", time.time()

    def _prepare_data(self, key: str, node: Node) -> None:
        if key in self.data:
            return
        ref = data_remote.options(num_cpus=1, max_retries=1, name="synthetic dataset").remote(
            key, node.config.data.model_dump(mode="json"), self.mailbox)
        self.in_flight[ref] = key
        self.data[key] = "pending"

    def _drain(self) -> None:
        for key, kind, payload, sent_at in ray.get(self.mailbox.take.remote()):
            state = self.states.get(key)
            if state is None:  # the dataset task
                self.display.event(payload)
            elif kind == "started":
                state.started_at = state.started_at or sent_at
                if state.state not in DONE:  # messages can trail the end of the task that sent them
                    self._started(state, payload)
            elif kind == "log":
                match = re.search(r"step (\d+)/(\d+)", payload)
                if match:
                    state.step = f"{match[1]}/{match[2]}"
                    state.first_step_at = state.first_step_at or sent_at
            elif kind == "epoch":
                self._epoch(state, payload)

    def _started(self, state: TrialState, payload: dict) -> None:
        state.attempts += 1
        self.tracker.set_status(state.run_id, "running", attempts=state.attempts)
        if state.state == "running":  # a second start: Ray retried the task after its worker died
            how = (f"resumes from its last checkpoint (epoch {state.epoch})" if payload.get("resuming")
                   else "starts over (there was no checkpoint yet)")
            self.display.event(f"{state.node.name}: its worker died; retry {state.attempts - 1}/"
                               f"{self.spec.resources.max_retries} {how}")
        else:
            how = "resumes from its checkpoint" if payload.get("resuming") else "started"
            self.display.event(f"{state.node.name}: {how} (pid {payload.get('pid')})")
        state.state = "running"

    def _epoch(self, state: TrialState, metrics: dict) -> None:
        epoch = int(metrics["epoch"])
        state.epoch, state.step = epoch, ""
        state.loss = metrics.get("train/loss", state.loss)
        state.ap = metrics.get("AP", state.ap)
        if epoch not in state.logged:
            self.tracker.log_epoch(state.run_id, metrics)
            state.logged.add(epoch)
        self.display.event(f"{state.node.name}: {state.summary()}")

    def _task_done(self, ref) -> None:
        key = self.in_flight.pop(ref)
        try:
            value = ray.get(ref)
            error = None
        except ray.exceptions.RayError as e:
            value, error = None, e
        if key in self.data:
            self.data[key] = "ready" if error is None else _failure(error, 1)
            if error is not None:
                self.display.event(f"dataset failed: {self.data[key]}")
            return
        state = self.states[key]
        if error is None:
            self._complete(state, value, how="trained")
        else:
            self._fail(state, _failure(error, self.spec.resources.max_retries))

    # -- outcomes -----------------------------------------------------------------------------------------
    def _complete(self, state: TrialState, result: dict, how: str) -> None:
        """A finished trial (`how`: trained now, cached = finished in the store by another experiment or run,
        earlier = finished before in this same parent run): any epoch not yet in MLflow, the store files as
        artifacts, the status."""
        for metrics in result.get("history", []):
            if int(metrics["epoch"]) not in state.logged:
                self.tracker.log_epoch(state.run_id, metrics)
                state.logged.add(int(metrics["epoch"]))
        workdir = self.plan.workdir(state.node.hash)
        if not self.tracker.has_artifact(state.run_id, CHECKPOINT):
            for name in (CHECKPOINT, "result.json", TRIAL, LOG):
                if (workdir / name).is_file():
                    self.tracker.log_artifact(state.run_id, workdir / name)
        final = result.get("metrics", {})
        state.epoch, state.ap = int(final.get("epoch", state.epochs)), final.get("AP", state.ap)
        state.loss = final.get("train/loss", state.loss)
        state.finished_at, state.ended_at = result.get("finished_at"), time.time()
        if how == "trained":
            state.state = "finished"
            self.tracker.set_status(state.run_id, "finished", attempts=state.attempts)
            self.display.event(f"{state.node.name}: finished, {state.summary()}")
        elif how == "cached":
            state.state = "cached"
            self.tracker.set_status(state.run_id, "cached")
            self.display.event(f"{state.node.name}: already finished in {workdir}; not trained again")
        else:
            state.state = "finished"
            self.display.event(f"{state.node.name}: finished earlier in this experiment; not trained again")

    def _fail(self, state: TrialState, reason: str) -> None:
        state.state, state.reason, state.ended_at = "failed", reason, time.time()
        self.tracker.set_status(state.run_id, "failed", reason=reason)
        self.display.event(f"{state.node.name}: FAILED: {reason}")
        if state.node.kind == "teacher":
            for student in self.plan.students_of(state.node.hash):
                self._fail(self.states[student.hash], f"its teacher ({state.node.name}) failed: {reason}")

    def _interrupt(self) -> None:
        for ref in list(self.in_flight):
            ray.cancel(ref, force=True)
        self.in_flight.clear()
        for state in self.states.values():
            if state.state not in DONE:
                state.state = "interrupted"
                self.tracker.set_status(state.run_id, "interrupted")

    def close(self) -> None:
        self.display.close()
        ray.kill(self.mailbox)

    def _draw_predictions(self, count: int) -> list[Path]:
        """results/<experiment>/predictions/: the first `count` validation images, every finished model's
        detections side by side (teachers first), each sheet also an artifact of the parent run."""
        from trainers.predict import side_by_side
        done = sorted((n for n in self.plan.nodes.values() if self.plan.is_finished(n.hash)),
                      key=lambda n: n.kind != "teacher")
        if not done:
            return []
        data = done[0].config.data
        folder = Path(data.root) / data.val_images
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
        paths = side_by_side({n.name: self.plan.workdir(n.hash) / CHECKPOINT for n in done}, images,
                             self.options.results_dir / self.experiment / "predictions")
        for path in paths:
            self.tracker.log_artifact(self.parent_id, path, "predictions")
        return paths

    def finish(self, interrupted: bool) -> Optional[tables.Table]:
        self.close()
        out, states = self.options.out, self.states.values()
        if interrupted:
            self.tracker.finish_parent(self.parent_id, status="KILLED")
            done = sum(s.state in ("finished", "cached") for s in states)
            print(f"\nInterrupted: {done} of {len(self.states)} trial(s) finished; the others keep their last "
                  f"checkpoint in {self.plan.store}.\nResume with:  detrdistill resume {self.experiment}"
                  f"{self._same_place_flags()}", file=out, flush=True)
            return None
        table, paths = tables.write_parent_outputs(self.tracker, self.parent_id, self.spec,
                                                   self.options.results_dir / self.experiment)
        if self.spec.table is not None and self.spec.table.predictions:
            paths += self._draw_predictions(self.spec.table.predictions)
        failed = [s for s in states if s.state == "failed"]
        self.tracker.finish_parent(self.parent_id, status="FAILED" if failed else "FINISHED")
        print("\n" + tables.render(table, "md"), file=out)
        print(f"Written: {', '.join(str(p) for p in paths)}", file=out)
        if failed:
            print(f"\n{len(failed)} of {len(self.states)} trial(s) failed:", file=out)
            for s in failed:
                print(f"  {s.node.name} ({s.node.hash}): {s.reason}\n    log: {self.plan.workdir(s.node.hash) / LOG}",
                      file=out)
        print(f"\nMLflow UI on these runs:  {ui_command(self.tracker.tracking_uri, self.tracker.experiment_id)}",
              file=out, flush=True)
        return table

    def _same_place_flags(self) -> str:
        flags = ""
        if self.options.tracking_uri:
            flags += f" --tracking-uri {self.tracker.tracking_uri}"
        if self.plan.store != Path("runs").resolve():
            flags += f" --store {self.plan.store}"
        return flags
