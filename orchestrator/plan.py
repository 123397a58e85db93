"""An experiment's trials as a DAG, and the content-addressed trial store they run in.

Every trial, teacher or student, is a node named by its content hash (spec.trial_hash). Teachers are
deduplicated by that hash and come before the students that need them; a teacher given as a checkpoint
(a file, a transformers directory, an MLflow URI runs:/<run_id>/<path> or a hub checkpoint hf:<repo>, either
downloaded here) is no node at all.

The store holds one folder per trial hash, shared by every experiment that uses the same store:
  <store>/<hash>/checkpoint.pt   the trainer's checkpoint, rewritten atomically every epoch (resume reads it)
                 trial.json      the resolved config the trial ran with
                 log.txt         the trainer's log lines, every attempt appended
                 worker.pid      the process training it now (or last)
                 result.json     written last, only when the trial finished: final metrics and the per-epoch
                                 history. Its presence means "never train this again", whichever experiment
                                 asks, so a finished teacher is reused by any later experiment that needs it.
Nothing here imports Ray or torch: the plan is plain data, dispatched by scheduler.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional

import yaml

from orchestrator.spec import PlannedTrial, Spec, expand_trials, teacher_trial, trial_hash
from trainers.config import TrialConfig
from trainers.pretrained import cache_path, hf_cache, hf_cached, hf_snapshot, imagenet_file, offline

CHECKPOINT, RESULT, TRIAL, LOG, PID = "checkpoint.pt", "result.json", "trial.json", "log.txt", "worker.pid"
DOWNLOADS = "downloads"  # <store>/downloads/<run_id>/...: teachers fetched from MLflow runs:/ URIs
DEFAULT_STORE = Path("runs")


@dataclasses.dataclass
class Node:
    """One trial to run once. `config` is ready to dispatch: absolute paths (Ray workers need not share the
    driver's working directory), the teacher's checkpoint filled in, torch threads = the trial's CPUs."""
    hash: str
    kind: Literal["teacher", "trial"]
    name: str  # MLflow run name and progress label
    config: TrialConfig
    # coordinates of every table cell this trial stands for (teachers: none). Several when the grid varies a
    # setting the trial ignores, e.g. distill.* settings of a trial without distillation.
    cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    needs: Optional[str] = None  # hash of the teacher node that must finish first

    @property
    def axes(self) -> dict[str, Any]:
        return self.cells[0] if self.cells else {}


@dataclasses.dataclass
class Plan:
    store: Path  # absolute
    nodes: dict[str, Node]  # dependency order: every teacher before its students

    def workdir(self, node_hash: str) -> Path:
        return self.store / node_hash

    def is_finished(self, node_hash: str) -> bool:
        return (self.workdir(node_hash) / RESULT).is_file()

    def finished(self) -> set[str]:
        return {h for h in self.nodes if self.is_finished(h)}

    def students_of(self, teacher_hash: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.needs == teacher_hash]

    def ready(self, done: Iterable[str], started: Iterable[str] = ()) -> list[Node]:
        """Nodes not done nor started whose teacher (if any) is done."""
        done, started = set(done), set(started)
        return [n for h, n in self.nodes.items()
                if h not in done and h not in started and (n.needs is None or n.needs in done)]


def spec_text(spec: Spec) -> str:
    """The resolved spec (overrides applied) as YAML: what the parent run stores and `resume` reruns. Only
    the settings that were given are written, so reading it back gives the same spec and the same trials."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_unset=True), sort_keys=False, width=110)


def build_plan(spec: Spec, store: Path | str = DEFAULT_STORE, tracking_uri: Optional[str] = None) -> Plan:
    """The DAG of a validated spec. MLflow URIs of teacher checkpoints are downloaded into the store (once)."""
    store = Path(store).resolve()
    trials = expand_trials(spec)
    nodes: dict[str, Node] = {}
    for trial in trials:  # teachers first
        if trial.teacher is not None and trial.teacher.hash not in nodes:
            nodes[trial.teacher.hash] = Node(trial.teacher.hash, "teacher", "teacher",
                                             _dispatchable(trial.teacher.config, spec))
    teacher_of: dict[str, list[PlannedTrial]] = {}
    for trial in trials:
        if trial.hash in nodes:  # the same trial again (or a student equal to a teacher): one run, more cells
            nodes[trial.hash].cells.append(trial.coords)
            continue
        config = _dispatchable(trial.config, spec)
        if trial.teacher is not None:
            config.teacher.checkpoint = store / trial.teacher.hash / CHECKPOINT
            teacher_of.setdefault(trial.teacher.hash, []).append(trial)
        elif trial.teacher_ref is not None and trial.teacher_ref.startswith("hf:"):
            config.teacher.checkpoint = hf_snapshot(trial.teacher_ref)
        elif trial.teacher_ref is not None:  # runs:/ URI
            config.teacher.checkpoint = resolve_teacher_uri(trial.teacher_ref, store, tracking_uri)
        nodes[trial.hash] = Node(trial.hash, "trial", trial.label, config, [trial.coords],
                                 needs=trial.teacher.hash if trial.teacher is not None else None)
    if len(teacher_of) > 1:  # name each teacher after what its students share, e.g. "teacher variant=adamixer"
        for teacher_hash, students in teacher_of.items():
            nodes[teacher_hash].name = "teacher " + _common_label(students)
    return Plan(store, nodes)


def teacher_plan(specs: Mapping[str, Spec], store: Path | str = DEFAULT_STORE) -> Plan:
    """Only the teachers that these specs train, each once (deduplicated by hash, named after the first key
    that needs it when there are several): what a search trains before its trials. A spec whose teacher is
    a checkpoint, or that has no teacher, adds nothing."""
    store = Path(store).resolve()
    nodes: dict[str, Node] = {}
    for label, spec in specs.items():
        config = teacher_trial(spec)
        if config is not None and trial_hash(config) not in nodes:
            node_hash = trial_hash(config)
            nodes[node_hash] = Node(node_hash, "teacher", f"teacher {label}".strip(), _dispatchable(config, spec))
    if len(nodes) == 1:
        next(iter(nodes.values())).name = "teacher"
    return Plan(store, nodes)


def _dispatchable(config: TrialConfig, spec: Spec) -> TrialConfig:
    config = config.model_copy(deep=True)
    config.runtime.threads = spec.resources.cpus_per_trial
    config.data.root = _absolute(config.data.root)
    config.model.backbone_weights = _weights(config.model)
    config.init_checkpoint = _absolute(config.init_checkpoint)
    if config.teacher is not None:
        config.teacher.checkpoint = _absolute(config.teacher.checkpoint)
        config.teacher.model.backbone_weights = _weights(config.teacher.model)
    return config


def _absolute(path: Optional[Path]) -> Optional[Path]:
    return None if path is None else Path(os.path.abspath(Path(path).expanduser()))


def _weights(model) -> Optional[Path]:
    """The backbone's weights file, absolute; named weights (imagenet) as the file in this process's cache,
    which resolve_weights filled before any trial trains (the trial's hash keeps the name)."""
    if model.backbone_weights == "imagenet":
        return cache_path(model.backbone)
    return _absolute(model.backbone_weights)


def named_backbones(spec: Spec) -> list[str]:
    """The backbones whose weights a spec's trials, teachers and students, take by name (imagenet)."""
    models = []
    for trial in expand_trials(spec):
        models.append(trial.config.model)
        if trial.teacher is not None:
            models.append(trial.teacher.config.model)
    return sorted({m.backbone for m in models if m.backbone_weights == "imagenet"})


def resolve_weights(spec: Spec) -> None:
    """Every named pretrained weights file of the spec's trials found in the local cache, or downloaded now,
    before any trial trains; WeightsUnavailable (a ValueError) names the file expected in the cache."""
    for backbone in named_backbones(spec):
        imagenet_file(backbone)


def weights_warnings(spec: Spec) -> list[str]:
    """What `validate` says of named weights missing from the local cache (a run may still download them)."""
    then = "run will refuse to start (offline)" if offline() else "run will download it first"
    lines = [f"warning: ImageNet weights of {b} are not in the local cache (expected {cache_path(b)}); {then}"
             for b in named_backbones(spec) if not cache_path(b).is_file()]
    checkpoint = spec.teacher.checkpoint if spec.teacher is not None else None
    if checkpoint is not None and checkpoint.startswith("hf:") and not hf_cached(checkpoint):
        lines.append(f"warning: teacher checkpoint {checkpoint} is not in the hub cache ({hf_cache()}); {then}")
    return lines


def _common_label(trials: list[PlannedTrial]) -> str:
    shared = {k: v for k, v in trials[0].coords.items()
              if k != "seed" and all(t.coords.get(k) == v for t in trials)}
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in shared.items()) or trials[0].hash


def resolve_teacher_uri(uri: str, store: Path, tracking_uri: Optional[str]) -> Path:
    """A runs:/<run_id>/<path> teacher checkpoint as a local path, downloaded into the store once."""
    import mlflow.artifacts  # only specs with such a teacher pay for importing MLflow here

    run_id, _, artifact = uri.removeprefix("runs:/").partition("/")
    local = store / DOWNLOADS / run_id / artifact.strip("/")
    if artifact.strip("/") and local.exists():
        return local
    # MLflow puts the file or folder the URI names inside dst_path (a whole run's artifacts: their contents)
    target = local.parent if artifact.strip("/") else local
    target.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small download, no bars
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target),
                                                        tracking_uri=tracking_uri))
    except Exception as e:  # MLflow raises several types for a missing run or path
        raise ValueError(f"teacher checkpoint {uri}: cannot download it from MLflow at {tracking_uri} "
                         f"({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------- the store

def read_result(workdir: Path) -> Optional[dict]:
    path = Path(workdir) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def store_status(store: Path | str, node_hash: str) -> str:
    """What the store holds of a trial, for a plan listing: finished (with its AP), started (a checkpoint
    that the next run resumes from) or nothing yet."""
    workdir = Path(store) / node_hash
    try:
        result = read_result(workdir)
        if result is not None:
            return f"finished (AP {result['metrics']['AP']:.4f}): not trained again"
    except (ValueError, KeyError, TypeError):  # not JSON, or not a result
        return "finished (its result.json unreadable): not trained again"
    if (workdir / CHECKPOINT).is_file():
        return "started: the next run resumes it from its checkpoint"
    return "to train"


def write_result(workdir: Path, result: dict) -> Path:
    """Atomically (rename): a half-written result.json would mark an unfinished trial as finished."""
    path = Path(workdir) / RESULT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)
    return path
