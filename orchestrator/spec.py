"""An experiment spec: the YAML a researcher writes, its validation, and its expansion into trials.

A spec embeds the trial models of trainers/config.py (data, model, schedule, loss, distillation) and adds what
only an experiment has: the ablation grid, named variants, seeds, the table to print, resources and tracking.
`load_spec` refuses a bad spec before anything runs and reports every problem at once, each with its dotted
path and YAML line. Nothing here touches tensors, Ray or MLflow, and nothing is written to disk.

Validation is per trial group: every cell of the variants x ablate grid is checked as the trial it becomes,
so a value that is wrong only in one combination (a layer mapping that fits 6 student layers but not 2) is
caught, and reported at the ablate entry or variant that produced it.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainers.config import (DataConfig, DistillConfig, LossConfig, ModelConfig, RuntimeConfig, ScheduleConfig,
                                         StrictModel, TeacherConfig, TrialConfig)
from trainers.distill.mapping import layer_mapping  # plain Python: no torch at validation time

Metric = Literal["AP", "AP50", "AP75", "APs", "APm", "APl"]
# Names end up in MLflow experiment/run names and file names under results/.
SafeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]

TRIAL_SECTIONS = ("data", "teacher", "student", "loss", "distill")  # what ablate and variants may change
TEACHER_SEED = 0  # one teacher per config, whatever the students' seeds: students are what the seeds measure
# Excluded from the trial hash: they change how a trial runs, not what it trains.
NON_SEMANTIC_FIELDS = {"name": True, "runtime": True}
# Model fields added after trials were first stored, with the default that keeps the old behaviour: left out
# of the hash at that default, so upgrading detrdistill never retrains (or orphans) a finished trial.
ADDED_MODEL_FIELDS = {"backbone_dilation": False, "finest_stride": None, "mixing_groups": 4, "mixing_in_points": 32,
                      "mixing_out_points": 128, "attention_init": "xavier"}
ADDED_SCHEDULE_FIELDS = {"amp_layer_norm": "float32"}  # the same for schedule fields
ADDED_DATA_FIELDS = {"pad_size_divisor": 1}  # and data fields


# ---------------------------------------------------------------------------------------------- the schema

class TeacherSpec(StrictModel):
    """The teacher. Trained by the experiment from `model` and `schedule`, unless `checkpoint` gives its
    weights: a checkpoint file, a transformers save_pretrained directory, or an MLflow URI
    runs:/<run_id>/<artifact path>."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(backbone="resnet101"))
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: Optional[str] = None


class StudentSpec(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class TableSpec(StrictModel):
    """The paper-style table: one row per combination of `rows` values, one column group per `columns`
    value, the `metrics` in each (seeds averaged). `baseline` names a reference cell, e.g.
    {distill.method: none}; the table shows the other cells' gain over it."""
    rows: list[str] = Field(default_factory=list)
    columns: Optional[str] = None
    metrics: list[Metric] = Field(default_factory=lambda: ["AP", "AP50", "AP75"], min_length=1)
    baseline: Optional[dict[str, Any]] = None


class ResourcesSpec(StrictModel):
    gpus_per_trial: Optional[float] = Field(None, ge=0)  # fractions share a GPU; None = 1 if there are GPUs, else 0
    # None = a GPU trial's share of its node's CPUs (CPUs per GPU x gpus_per_trial), a CPU trial 1; also the trial's
    # torch threads, which the KD assignment solve and the host side of a GPU step use
    cpus_per_trial: Optional[int] = Field(None, ge=1)
    max_concurrent: Optional[int] = Field(None, ge=1)  # None = as many as the resources allow
    max_retries: int = Field(1, ge=0)  # re-runs of a failed trial (resuming from its last checkpoint)


class TrackingSpec(StrictModel):
    experiment: Optional[str] = None  # MLflow experiment name; None = the spec's name
    tracking_uri: Optional[str] = None  # None = the command line's --tracking-uri, else sqlite:///mlflow.db


# What a search optimises: an evaluation metric (every epoch needs evaluating: eval_every 1) or a training loss
# term, which the engine reports every epoch. train/loss includes the weighted distillation terms, so it is
# no fair judge of distillation weights; the detection terms are.
SearchMetric = Literal["AP", "AP50", "AP75", "APs", "APm", "APl",
                       "train/loss", "train/loss_cls", "train/loss_l1", "train/loss_giou"]
SEARCH_SECTIONS = ("student", "distill")  # what a search may vary: the teacher is trained once for all trials
ChoiceValue = Union[None, bool, int, float, str]  # what Optuna stores as a categorical choice


class SearchParam(StrictModel):
    """One searched setting: `uniform` or `loguniform` floats in [low, high], `int` integers from low to high
    (both included), or a `choice` among `values` (plain scalars)."""
    type: Literal["uniform", "loguniform", "int", "choice"]
    low: Optional[Union[int, float]] = None
    high: Optional[Union[int, float]] = None
    values: Optional[list[ChoiceValue]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "SearchParam":
        if self.type == "choice":
            if self.values is None:
                raise ValueError("a choice needs values: [...]")
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes values, not low and high")
            if len({json.dumps(v) for v in self.values}) != len(self.values):
                raise ValueError("values of a choice must be distinct")
            return self
        if self.values is not None:
            raise ValueError(f"{self.type} takes low and high, not values (values are for a choice)")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both low and high")
        if self.type == "int" and not all(isinstance(v, int) for v in (self.low, self.high)):
            raise ValueError(f"int needs whole numbers for low and high, got {self.low} and {self.high}")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (it samples the logarithm), got low {self.low}")
        return self

    def ends(self) -> list[tuple[tuple, Any]]:
        """(where in the param, value) of every value that bounds what can be sampled: both ends, or each choice."""
        if self.type == "choice":
            return [(("values", i), v) for i, v in enumerate(self.values)]
        cast = int if self.type == "int" else float
        return [(("low",), cast(self.low)), (("high",), cast(self.high))]


class SamplerSpec(StrictModel):
    """Optuna's sampler: TPE (after `startup_trials` random ones; None = Optuna's default, 10) or random."""
    type: Literal["tpe", "random"] = "tpe"
    seed: int = Field(0, ge=0, lt=2**32)
    startup_trials: Optional[int] = Field(None, ge=1)


class AshaSpec(StrictModel):
    """Asynchronous successive halving on the per-epoch metric: at epochs grace_period x reduction_factor^k a
    trial that is not among the best 1/reduction_factor of those that reached that epoch is stopped."""
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: Optional[int] = Field(None, ge=1)  # None = the student's epochs

    @model_validator(mode="after")
    def _check(self) -> "AshaSpec":
        if self.max_t is not None and self.grace_period >= self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must be below max_t ({self.max_t}), or ASHA can "
                             f"never stop a trial early")
        return self


class SearchSpec(StrictModel):
    """A hyperparameter search: Ray Tune trials with Optuna's sampler over `space` (dotted student.* and
    distill.* keys), one search per ablate/variant cell."""
    space: dict[str, SearchParam] = Field(min_length=1)
    metric: SearchMetric = "AP"
    mode: Optional[Literal["max", "min"]] = None  # None: max for AP metrics, min for losses
    num_samples: int = Field(8, ge=1)  # trials per search (per cell)
    max_concurrent: Optional[int] = Field(None, ge=1)  # None = resources.max_concurrent, else what fits the cluster
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: Optional[AshaSpec] = None  # None: every trial runs all its epochs

    @model_validator(mode="after")
    def _check(self) -> "SearchSpec":
        natural = "min" if self.metric.startswith("train/") else "max"
        if self.mode is not None and self.mode != natural:
            what = "a training loss" if natural == "min" else "an accuracy"
            raise ValueError(f"mode {self.mode} would {'maximise' if natural == 'min' else 'minimise'} {what} "
                             f"({self.metric}); use mode {natural} or leave mode out")
        return self

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or ("min" if self.metric.startswith("train/") else "max")


class Spec(StrictModel):
    """A whole experiment. Build it with `load_spec`/`parse_spec`/`validate_spec`: `Spec.model_validate`
    alone checks the structure, not the cross-field and per-trial rules."""
    name: SafeName
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: Optional[TeacherSpec] = None  # required when any trial distils
    student: StudentSpec
    loss: LossConfig = Field(default_factory=LossConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    # dotted key -> values; the cartesian product of all lists is the grid, each cell one trial group
    ablate: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    # name -> {dotted key: value}: named groups of settings changed together, each combined with the grid
    variants: dict[SafeName, dict[str, Any]] = Field(default_factory=dict)
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(default_factory=lambda: [0], min_length=1)
    table: Optional[TableSpec] = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # every trial's, teacher and students
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    search: Optional[SearchSpec] = None  # a hyperparameter search instead of one trial per cell (search.py)


SECTION_MODELS: dict[str, type[BaseModel]] = {
    "data": DataConfig, "teacher": TeacherSpec, "student": StudentSpec, "loss": LossConfig,
    "distill": DistillConfig, "runtime": RuntimeConfig}


# --------------------------------------------------------------------------------------------- problems

@dataclasses.dataclass(frozen=True)
class SpecProblem:
    path: str  # dotted, e.g. "student.model.decoder_layers" or "ablate.distill.method[1]"; "" = whole file
    line: Optional[int]  # 1-based YAML line; None when the value came from the command line
    message: str

    def format(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line is not None else file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(ValueError):
    """Every problem of a spec, one per line as FILE:LINE: path: message."""

    def __init__(self, file: str, problems: Sequence[SpecProblem]):
        self.file = str(file)
        self.problems = list(problems)
        super().__init__(self.file)

    def __str__(self) -> str:
        return "\n".join(p.format(self.file) for p in self.problems)


@dataclasses.dataclass(frozen=True)
class _Issue:
    """A problem before it is located: `path` is a tuple into the spec, `related` the other settings that
    took part (used to find the ablate entry responsible when the problem occurs in only some trials)."""
    path: tuple
    message: str
    related: tuple = ()


_MISSING = object()


# ---------------------------------------------------------------------------------------------- loading

def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Read, override (`--set KEY=VALUE` strings) and validate a spec file; raises SpecError."""
    file = str(path)
    if Path(path).is_dir():
        raise SpecError(file, [SpecProblem("", None, "is a directory; give a spec file (.yaml)")])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, [SpecProblem("", None, "no such file")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(file, [SpecProblem("", None, f"cannot read it: {e}")]) from None
    return parse_spec(text, file=file, overrides=overrides)


def parse_spec(text: str, file: str = "<spec>", overrides: Sequence[str] = ()) -> Spec:
    """Validate spec YAML text (see `load_spec`)."""
    data, lines, problems, readable = _read_yaml(text)
    if not readable:
        raise SpecError(file, problems)
    return _validate(data, file, lines, overrides, problems)


def validate_spec(data: Any, file: str = "<spec>", overrides: Sequence[str] = ()) -> Spec:
    """Validate an already parsed spec (a dict); problems carry no line numbers."""
    return _validate(data, file, {}, overrides, [])


def _validate(data, file, lines, overrides, problems) -> Spec:
    if not isinstance(data, dict):
        what = "nothing" if data is None else f"a {type(data).__name__}"
        raise SpecError(file, problems + [SpecProblem("", lines.get(()), (
            f"a spec is a mapping of keys (name, student, teacher, distill, ...), but this file holds {what}"))])
    data, found = _check(data, lines, overrides)
    problems = sorted(problems + found, key=lambda p: (p.line is None, p.line or 0))
    if problems:
        raise SpecError(file, problems)
    return Spec.model_validate(data)


def _read_yaml(text: str) -> tuple[Any, dict[tuple, int], list[SpecProblem], bool]:
    """(data, line of every key path, non-fatal problems, readable). Safe loading only: a spec is data, so
    tags that would build Python objects are refused."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, [], True
        lines, problems = _index_lines(node)
        return loader.construct_document(node), lines, problems, True
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        return None, {}, [SpecProblem("", mark.line + 1 if mark else None, _yaml_message(e))], False
    except yaml.YAMLError as e:
        return None, {}, [SpecProblem("", None, f"not valid YAML: {e}")], False
    finally:
        loader.dispose()


def _yaml_message(e: yaml.MarkedYAMLError) -> str:
    tag = re.search(r"tag '([^']+)'", e.problem or "")
    if isinstance(e, yaml.constructor.ConstructorError) and tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return (f"YAML tag {name} is not allowed: a spec is plain data (mappings, lists, strings, numbers, "
                f"booleans), never Python objects")
    context = f" ({e.context})" if e.context else ""
    if "'\\t'" in (e.problem or ""):
        context += "; YAML indents with spaces, not tabs"
    elif "block" in (e.problem or ""):  # PyYAML's words for a misaligned line
        context += "; check the indentation of this line against the lines above"
    return f"YAML syntax error: {e.problem}{context}"


def _index_lines(root: yaml.Node) -> tuple[dict[tuple, int], list[SpecProblem]]:
    """Line of every mapping key and sequence item, by path; and duplicate keys, which PyYAML would
    otherwise resolve silently by keeping the last."""
    lines = {(): root.start_mark.line + 1}
    problems: list[SpecProblem] = []
    active: set[int] = set()  # guards recursive aliases

    def walk(node: yaml.Node, path: tuple) -> None:
        if id(node) in active:
            return
        active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in first:
                    problems.append(SpecProblem(_fmt(path + (key,)), line, (
                        f"duplicate key {key!r} (first at line {first[key]}); YAML would silently keep only "
                        f"the last one")))
                first.setdefault(key, line)
                lines[path + (key,)] = line
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))
        active.discard(id(node))

    walk(root, ())
    return lines, problems


# ----------------------------------------------------------------------------------------------- checks

def _check(data: dict, lines: dict[tuple, int], overrides: Sequence[str]) -> tuple[dict, list[SpecProblem]]:
    """Apply the overrides and collect every problem: structure, grid, every trial group, table."""
    data = copy.deepcopy(data)
    set_from, override_problems = _apply_overrides(data, overrides)
    for key in [k for k, v in data.items() if v is None and k != "name"]:
        # `distill:` with every line commented out means the defaults, not an error
        if key == "student":
            data[key] = {}
        else:
            del data[key]
    axes, variants, grid_issues = _grid(data)
    located = [(i.path, i.message) for i in _top_level_issues(data) + grid_issues]
    located += _cell_issues(data, axes, variants)
    located += [(i.path, i.message) for i in _table_issues(data, axes, variants)]
    located += _search_issues(data, axes, variants)
    problems, seen = list(override_problems), set()
    for at, message in located:
        problem = _locate(at, message, lines, set_from)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return data, problems


def _locate(at: tuple, message: str, lines: dict[tuple, int], set_from: dict[tuple, str]) -> SpecProblem:
    for key, text in set_from.items():
        if at[:len(key)] == key:  # the value there came from the command line, not the file
            return SpecProblem(_fmt(at), None, f"{message} (from --set {text})")
    path = at
    while path and path not in lines:  # a missing key: point at its nearest existing parent
        path = path[:-1]
    return SpecProblem(_fmt(at), lines.get(path), message)


def _top_level_issues(data: dict) -> list[_Issue]:
    """Pydantic's problems outside the trial sections (those are checked per trial group)."""
    try:
        Spec.model_validate(data)
    except ValidationError as e:
        return [i for i in _pydantic_issues(e, (), data) if i.path and i.path[0] not in TRIAL_SECTIONS]
    return []


@dataclasses.dataclass
class _Origin:
    """One setting a grid cell applies: the trial field `key` gets `value`, written in the spec at `at`."""
    key: tuple
    at: tuple
    value: Any
    label: str


@dataclasses.dataclass
class _Cell:
    coords: dict[str, Any]
    origins: list[_Origin]
    raw: dict


def _grid(data: dict) -> tuple[list[tuple[str, list]], dict[str, dict[str, Any]], list[_Issue]]:
    """The usable ablate axes and variants, and the problems of their keys (pydantic reports their types)."""
    issues: list[_Issue] = []
    axes: list[tuple[str, list]] = []
    ablate = data.get("ablate")
    for key, values in (ablate.items() if isinstance(ablate, dict) else ()):
        error = _trial_key_error(key)
        if error:
            issues.append(_Issue(("ablate", key), error))
            continue
        if not isinstance(values, list) or not values:
            continue
        clash = [k for k, _ in axes if _overlaps(_split(k), _split(key))]
        if clash:
            issues.append(_Issue(("ablate", key), f"overlaps ablate key {clash[0]!r}: one sets part of the other"))
            continue
        for j, value in enumerate(values):
            if value in values[:j]:
                issues.append(_Issue(("ablate", key, j), (
                    f"duplicate value {_show(value)} (already at position {values.index(value)}); "
                    f"each value is one set of trials")))
        axes.append((key, values))
    seeds = data.get("seeds")
    for j, seed in enumerate(seeds if isinstance(seeds, list) else ()):
        if seed in seeds[:j]:
            issues.append(_Issue(("seeds", j), f"duplicate seed {_show(seed)}"))
    variants: dict[str, dict[str, Any]] = {}
    raw_variants = data.get("variants")
    for name, settings in (raw_variants.items() if isinstance(raw_variants, dict) else ()):
        if not isinstance(settings, dict):
            continue
        variants[name] = {}
        for key, value in settings.items():
            error = _trial_key_error(key)
            clash = [k for k, _ in axes if not error and _overlaps(_split(k), _split(key))]
            if clash:
                error = f"is also ablated (ablate.{clash[0]}); vary a setting by variants or by ablate, not both"
            if error:
                issues.append(_Issue(("variants", name, key), error))
            else:
                variants[name][key] = value
    return axes, variants, issues


def _cells(data: dict, axes: list[tuple[str, list]], variants: dict[str, dict[str, Any]]) -> list[_Cell]:
    """Every trial group: each variant (or the spec itself when there are none) x each grid combination."""
    base = {k: v for k, v in data.items() if k not in ("ablate", "variants")}
    cells = []
    for variant, settings in (list(variants.items()) or [(None, {})]):
        for index in itertools.product(*(range(len(values)) for _, values in axes)):
            origins = [_Origin(_split(k), ("variants", variant, k), v, f"variant {variant}")
                       for k, v in settings.items()]
            origins += [_Origin(_split(key), ("ablate", key, i), values[i], f"{key}={_label(values[i])}")
                        for (key, values), i in zip(axes, index)]
            raw = copy.deepcopy(base)
            for origin in origins:
                _set(raw, origin.key, copy.deepcopy(origin.value))
            coords = {"variant": variant} if variant is not None else {}
            coords.update({key: values[i] for (key, values), i in zip(axes, index)})
            cells.append(_Cell(coords, origins, raw))
    return cells


def _cell_issues(data, axes, variants) -> list[tuple[tuple, str]]:
    """Check every trial group as the trial it becomes. A problem the spec has without any ablation is
    reported where it is written; one that only some groups have is reported at the ablate entry or
    variant responsible."""
    base = {k: v for k, v in data.items() if k not in ("ablate", "variants")}
    in_base = {(i.path, i.message) for i in _trial_issues(base)}
    located = []
    for cell in _cells(data, axes, variants):
        for issue in _trial_issues(cell.raw):
            located.append(_attribute(issue, cell, in_base))
    return located


def _attribute(issue: _Issue, cell: _Cell, in_base: set) -> tuple[tuple, str]:
    for origin in cell.origins:  # the bad value itself was set by this cell
        if issue.path[:len(origin.key)] == origin.key:
            rest = issue.path[len(origin.key):]
            return origin.at, (f"{_fmt(rest)}: " if rest else "") + issue.message
    if (issue.path, issue.message) in in_base:
        return issue.path, issue.message
    for candidate in (issue.path, *issue.related):  # a combination: blame a setting that took part
        for origin in cell.origins:
            if _overlaps(origin.key, candidate):
                return origin.at, f"{_fmt(issue.path)}: {issue.message} (with {origin.label})"
    labels = ", ".join(o.label for o in cell.origins)
    return issue.path, f"{issue.message} (with {labels})"


def _trial_issues(raw: dict) -> list[_Issue]:
    """The problems of one trial group: each trial section validated on its own (so one bad section does
    not hide the others), then the rules that involve several sections or the file system."""
    issues: list[_Issue] = []
    parts: dict[str, tuple[Any, set]] = {}
    for name, model in SECTION_MODELS.items():
        value = raw.get(name, _MISSING)
        if value is _MISSING or (value is None and name == "teacher"):
            if name == "student":
                issues.append(_Issue(("student",), (
                    "required key is missing: every experiment has a student (model, schedule)")))
            parts[name] = (None, set()) if name in ("teacher", "student") else (model(), set())
            continue
        section, bad, found = _validate_part(model, value, (name,), raw)
        parts[name] = (section, bad)
        issues += found

    def usable(name: str, *fields: str) -> Any:  # the section, if the fields a check reads are valid
        section, bad = parts[name]
        return section if section is not None and not bad & set(fields) else None

    data = usable("data", "format", "root", "train", "val", "train_images", "val_images")
    teacher, student = usable("teacher", "model"), usable("student", "model")
    distill = usable("distill", "method", "layer_mapping", "feature", "query_prior")
    checkpoint = usable("teacher", "checkpoint")
    issues += _file_issues(data, teacher and teacher.model, student and student.model,
                           checkpoint and checkpoint.checkpoint)
    if distill is None or distill.method == "none":
        return issues
    if raw.get("teacher") is None:
        issues.append(_Issue(("distill", "method"), (
            f"method {distill.method} distils from a teacher, but the spec has no teacher; add a teacher "
            f"block (model, schedule or checkpoint) or use method none"), related=(("teacher",),)))
    return issues + _kd_issues(distill, teacher and teacher.model, student and student.model)


def _validate_part(model: type[BaseModel], value: Any, prefix: tuple, root: Any
                   ) -> tuple[Optional[BaseModel], set, list[_Issue]]:
    """(instance, names of its invalid fields, issues). When some fields are invalid the instance is built
    without them, so checks that read only the other fields still run."""
    try:
        return model.model_validate(value), set(), []
    except ValidationError as e:
        issues = _pydantic_issues(e, prefix, root)
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
        if isinstance(value, dict) and bad and bad <= set(value):
            try:
                return model.model_validate({k: v for k, v in value.items() if k not in bad}), bad, issues
            except ValidationError:
                pass
        return None, bad, issues


def _file_issues(data: Optional[DataConfig], teacher: Optional[ModelConfig], student: Optional[ModelConfig],
                 checkpoint: Optional[str]) -> list[_Issue]:
    """Files the trial will read must exist now, not hours into a run."""
    issues = _coco_issues(data) if data is not None and data.format == "coco" else []
    for role, model in (("teacher", teacher), ("student", student)):
        if model is not None and model.backbone_weights is not None and not model.backbone_weights.is_file():
            issues.append(_Issue((role, "model", "backbone_weights"),
                                 f"backbone weights file {model.backbone_weights} does not exist"))
    return issues + (_checkpoint_issues(checkpoint) if checkpoint is not None else [])


def _coco_issues(data: DataConfig) -> list[_Issue]:
    root = data.root
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        return [_Issue(("data", "root"), (
            f"COCO root {root} is not a directory{where}; put COCO there (annotations/, image folders) or run "
            f"on the synthetic task: --set data.format=synthetic --set data.root=data/synthetic"))]
    issues = []
    for field in ("train", "val"):
        if not (root / getattr(data, field)).is_file():
            issues.append(_Issue(("data", field), f"annotation file {root / getattr(data, field)} does not exist"))
    for field in ("train_images", "val_images"):
        if not (root / getattr(data, field)).is_dir():
            issues.append(_Issue(("data", field), f"image folder {root / getattr(data, field)} does not exist"))
    return issues


def _checkpoint_issues(checkpoint: str) -> list[_Issue]:
    at = ("teacher", "checkpoint")
    if checkpoint.startswith("runs:/"):  # resolved by the scheduler, which talks to MLflow; validate does not
        if not re.fullmatch(r"runs:/[0-9A-Za-z_-]+(/\S*)?", checkpoint):
            return [_Issue(at, f"expected an MLflow URI runs:/<run_id>/<artifact path>, got {checkpoint!r}")]
        return []
    path = Path(checkpoint)
    if path.is_dir() and not (path / "config.json").is_file():
        return [_Issue(at, f"{checkpoint} is a directory but not a transformers save_pretrained one (no config.json)")]
    if not path.exists():
        return [_Issue(at, (
            f"teacher checkpoint {checkpoint} does not exist; give a checkpoint file, a transformers "
            f"save_pretrained directory or runs:/<run_id>/<path>, or remove checkpoint to train the teacher"))]
    return []


def _kd_issues(distill: DistillConfig, teacher: Optional[ModelConfig], student: Optional[ModelConfig]
               ) -> list[_Issue]:
    """Impossible teacher/student combinations (METHOD.md: layer mapping, query prior, feature maps). Each
    check runs when the models it reads are valid (None: invalid, reported elsewhere)."""
    issues = []
    at, mapping = ("distill", "layer_mapping"), distill.layer_mapping
    if distill.method == "detrdistill" and None not in (student, teacher):
        try:  # the trainer's own mapping decides what is possible
            layer_mapping(mapping, student.decoder_layers, teacher.decoder_layers)
        except ValueError as e:
            out_of_range = [i for i, t in enumerate(mapping) if not 0 <= t < teacher.decoder_layers
                            ] if isinstance(mapping, list) and len(mapping) == student.decoder_layers else []
            issues.append(_Issue(at + tuple(out_of_range[:1]), str(e), related=(
                ("student", "model", "decoder_layers"), ("teacher", "model", "decoder_layers"))))
    if distill.method == "detrdistill":
        if None not in (student, teacher) and distill.query_prior.weight > 0 and student.family != teacher.family:
            issues.append(_Issue(("teacher", "model", "family"), (
                f"query-prior distillation feeds the teacher's queries to the student's decoder, so both must "
                f"be the same family, but the teacher is {teacher.family} and the student {student.family}; "
                f"set distill.query_prior.weight: 0 to distil across families"),
                related=(("student", "model", "family"),)))
        elif None not in (student, teacher) and distill.query_prior.weight > 0 \
                and student.hidden_dim != teacher.hidden_dim:
            issues.append(_Issue(("student", "model", "hidden_dim"), (
                f"query-prior distillation feeds the teacher's {teacher.hidden_dim}-d queries to the student's "
                f"decoder, but the student's hidden_dim is {student.hidden_dim}; make them equal or set "
                f"distill.query_prior.weight: 0"), related=(("teacher", "model", "hidden_dim"),)))
    features = distill.method in ("fitnet", "fgd", "mgd") or (
        distill.method == "detrdistill" and distill.feature.weight > 0)
    if features and None not in (student, teacher) and student.levels != teacher.levels:
        issues.append(_Issue(("student", "model", "num_feature_levels"), (
            f"feature distillation compares feature maps level by level, but the student ({student.family}) "
            f"has {student.levels} level(s) and the teacher ({teacher.family}) {teacher.levels}"),
            related=(("student", "model", "family"), ("teacher", "model", "family"),
                     ("teacher", "model", "num_feature_levels"))))
    elif features and None not in (student, teacher) and student.backbone_dilation != teacher.backbone_dilation:
        issues.append(_Issue(("student", "model", "backbone_dilation"), (
            f"feature distillation compares feature maps point by point, but only the "
            f"{'student' if student.backbone_dilation else 'teacher'} has a dilated C5 (DC5: twice the map side); "
            f"set backbone_dilation alike for both"), related=(("teacher", "model", "backbone_dilation"),)))
    elif features and None not in (student, teacher) and student.finest_stride != teacher.finest_stride:
        issues.append(_Issue(("student", "model", "finest_stride"), (
            f"feature distillation compares feature maps point by point, but the student's finest level has "
            f"stride {student.finest_stride or 8} and the teacher's {teacher.finest_stride or 8} (maps of "
            f"different sides); set finest_stride alike for both"),
            related=(("teacher", "model", "finest_stride"),)))
    return issues


def _table_issues(data, axes, variants) -> list[_Issue]:
    """Table keys must split the trials: ablated keys, keys the variants set, `variant` or `seed`."""
    table, _, _ = _validate_part(TableSpec, data.get("table"), ("table",), data)  # its errors: top level
    if table is None:
        return []
    values: dict[str, list] = {key: list(vals) for key, vals in axes}
    for settings in variants.values():
        for key, value in settings.items():
            if value not in values.setdefault(key, []):
                values[key].append(value)
    if variants:
        values["variant"] = list(variants)
    seeds = data.get("seeds", [0])
    values["seed"] = seeds if isinstance(seeds, list) else []
    issues, used = [], []
    keyed = [(("table", "rows", i), k) for i, k in enumerate(table.rows)]
    keyed += [(("table", "columns"), table.columns)] if table.columns is not None else []
    for at, key in keyed:
        if key in used:
            issues.append(_Issue(at, f"{key!r} is already a row or column key"))
            continue
        used.append(key)
        if key in values:
            continue
        error = None if key == "variant" else _trial_key_error(key)
        issues.append(_Issue(at, error or (
            f"{key!r} is not ablated or varied, so every trial has the same value and it cannot split the "
            f"table; ablate it, or use one of: {', '.join(values)}")))
    for key, value in (table.baseline or {}).items():
        if key not in used:
            issues.append(_Issue(("table", "baseline", key), (
                f"{key!r} is not a row or column key of the table ({', '.join(used) or 'none'})")))
        elif key in values and value not in values[key]:
            issues.append(_Issue(("table", "baseline", key), (
                f"{_show(value)} is not one of the values of {key}: {', '.join(_label(v) for v in values[key])}")))
    return issues


def _search_issues(data: dict, axes: list[tuple[str, list]], variants: dict[str, dict[str, Any]]
                   ) -> list[tuple[tuple, str]]:
    """A search's keys, metric and scheduler against the trials it runs, and both ends of every range (each
    value of a choice) checked as the trial it would become, in every cell: a sampled point must never be
    the first to find that a value is impossible."""
    search = data.get("search")
    if not isinstance(search, dict):
        return []
    issues: list[tuple[tuple, str]] = []
    seeds = data.get("seeds")
    if isinstance(seeds, list) and len(seeds) > 1:
        issues.append((("seeds",), "a search runs one trial per sampled point, so it takes one seed; run the "
                                   "search again with another seed to measure the noise"))
    params: dict[str, SearchParam] = {}
    space = search.get("space")
    for key, value in (space.items() if isinstance(space, dict) else ()):
        error = _search_key_error(key, axes, variants, list(params))
        if error:
            issues.append((("search", "space", key), error))
            continue
        try:
            param = SearchParam.model_validate(value)
        except ValidationError:
            continue  # reported with the rest of the spec's structure
        error = _search_type_error(key, param)
        if error:
            issues.append((("search", "space", key, "type"), error))
        else:
            params[key] = param
    cells = _cells(data, axes, variants)
    issues += _search_metric_issues(search, params, cells)
    found: dict[tuple[tuple, str], list[str]] = {}  # (where, message) -> labels of the cells that have it
    for cell in cells:
        known = {(i.path, i.message) for i in _trial_issues(cell.raw)}  # reported where they are written
        for key, param in params.items():
            for where, value in param.ends():
                raw = copy.deepcopy(cell.raw)
                _set(raw, tuple(key.split(".")), value)
                for issue in _trial_issues(raw):
                    if (issue.path, issue.message) not in known:
                        at = "" if issue.path == tuple(key.split(".")) else f"{_fmt(issue.path)}: "
                        found.setdefault((("search", "space", key) + where, f"{key}={_label(value)}: {at}{issue.message}"),
                                         []).append(", ".join(o.label for o in cell.origins))
    for (at, message), labels in found.items():  # a problem of only some cells names them
        issues += [(at, message)] if len(labels) == len(cells) else [(at, f"{message} (with {x})") for x in labels]
    return issues


def _search_key_error(key: Any, axes: list[tuple[str, list]], variants: dict[str, dict[str, Any]],
                      searched: list[str]) -> Optional[str]:
    """Why `key` cannot be searched, or None."""
    error = _trial_key_error(key)
    if error:
        return error
    if key.split(".")[0] not in SEARCH_SECTIONS:
        return (f"{key!r} cannot be searched: the teacher is trained once and shared by every trial of a search, "
                f"and data, loss and teacher settings shape it too; search student.* and distill.* settings, and "
                f"ablate this one instead (one search per cell)")
    for axis, _ in axes:
        if _overlaps(_split(axis), _split(key)):
            return f"is also ablated (ablate.{axis}); a setting is searched or ablated, not both"
    for name, settings in variants.items():
        for other in settings:
            if _overlaps(_split(other), _split(key)):
                return f"is also set by variant {name!r} ({other}); a setting is searched or varied, not both"
    for other in searched:
        if _overlaps(_split(other), _split(key)):
            return f"overlaps searched key {other!r}: one sets part of the other"
    return None


def _search_type_error(key: str, param: SearchParam) -> Optional[str]:
    """A range of the wrong kind for the setting it searches."""
    ann = _strip(_field_annotation(tuple(key.split(".")))[0])
    if param.type in ("uniform", "loguniform") and ann is int:
        return f"{key} is a whole number; search it with type: int (or choice)"
    if param.type != "choice" and ann not in (int, float):
        return f"{key} is not a number ({_describe(ann)}); search it with type: choice"
    return None


def _search_metric_issues(search: dict, params: dict[str, SearchParam], cells: list[_Cell]
                          ) -> list[tuple[tuple, str]]:
    """The metric must be reported every epoch (Tune and ASHA compare trials epoch by epoch), and ASHA's
    rungs must fit the student's epochs."""
    issues: list[tuple[tuple, str]] = []
    metric = search.get("metric", "AP")
    scheduler = search.get("scheduler")
    for cell in cells:
        labels = ", ".join(o.label for o in cell.origins)
        suffix = f" (with {labels})" if labels else ""
        every = _get(cell.raw, ("student", "schedule", "eval_every"))
        if isinstance(metric, str) and not metric.startswith("train/") and every not in (_MISSING, 1):
            issues.append((("search", "metric"), (
                f"{metric} is measured on evaluation epochs only, but student.schedule.eval_every is {every}; a "
                f"search needs its metric every epoch: set eval_every: 1, or search on a training loss such as "
                f"train/loss_cls{suffix}")))
        if not isinstance(scheduler, dict):
            continue
        epochs = _get(cell.raw, ("student", "schedule", "epochs"))
        epochs = ScheduleConfig().epochs if epochs is _MISSING else epochs
        if "student.schedule.epochs" in params and params["student.schedule.epochs"].type != "choice":
            epochs = params["student.schedule.epochs"].high
        grace, max_t = scheduler.get("grace_period", 1), scheduler.get("max_t")
        if not all(isinstance(v, int) for v in (epochs, grace)) or not isinstance(max_t, (int, type(None))):
            continue  # wrong types are reported elsewhere
        if max_t is not None and max_t > epochs:
            issues.append((("search", "scheduler", "max_t"), (
                f"max_t {max_t} is above the student's {epochs} epochs: no trial gets that far{suffix}")))
        elif max_t is None and grace >= epochs:
            issues.append((("search", "scheduler", "grace_period"), (
                f"grace_period {grace} leaves ASHA nothing to stop: the student trains {epochs} epoch(s); "
                f"lower it or train longer{suffix}")))
    return issues


# --------------------------------------------------------------------------------------------- overrides

def _apply_overrides(data: dict, overrides: Sequence[str]) -> tuple[dict[tuple, str], list[SpecProblem]]:
    """Apply `KEY=VALUE` strings (dotted key; VALUE parsed as YAML) to the raw spec, in order. An override
    of a trial setting changes every trial: it also wins over the variants that set it. An ablated key
    is overridden through its list (ablate.KEY=[...])."""
    set_from: dict[tuple, str] = {}
    problems: list[SpecProblem] = []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        parts = _split(key.strip())
        if not sep or not key.strip():
            problems.append(SpecProblem("", None, (
                f"expected KEY=VALUE, e.g. --set student.schedule.epochs=2 (from --set {text})")))
            continue
        _, error = _field_annotation(parts)
        ablated = [k for k in (data.get("ablate") or {}) if isinstance(k, str) and parts[:len(_split(k))] == _split(k)]
        if error is None and parts[0] in TRIAL_SECTIONS and ablated:
            error = f"is ablated; override its values instead: --set ablate.{ablated[0]}=[...]"
        if error is None:
            try:
                value = yaml.safe_load(value_text)
            except yaml.YAMLError as e:
                error = f"cannot read the value {value_text!r} as YAML: {getattr(e, 'problem', None) or e}"
        if error is None:
            error = _set(data, parts, value)
        if error is not None:
            problems.append(SpecProblem(_fmt(parts), None, f"{error} (from --set {text})"))
            continue
        set_from[parts] = text
        if parts[0] in TRIAL_SECTIONS:
            _override_variants(data, parts, value)
    return set_from, problems


def _override_variants(data: dict, parts: tuple, value: Any) -> None:
    variants = data.get("variants")
    for settings in (variants.values() if isinstance(variants, dict) else ()):
        for key in list(settings) if isinstance(settings, dict) else ():
            inner = _split(key) if isinstance(key, str) else ()
            if inner[:len(parts)] == parts:  # the variant sets (part of) the overridden value: drop it
                del settings[key]
            elif parts[:len(inner)] == inner and isinstance(settings[key], dict):  # it sets a mapping around it
                _set(settings[key], parts[len(inner):], copy.deepcopy(value))


def _split(key: str) -> tuple:
    """A dotted key as a path. Keys inside `ablate` and `variants.<name>` are dotted keys themselves."""
    parts = tuple(key.split("."))
    if parts[0] == "ablate" and len(parts) > 1:
        return ("ablate", ".".join(parts[1:]))
    if parts[:2] == ("search", "space") and len(parts) > 2:  # search.space.<dotted key>[.low|high|type|values]
        rest = parts[2:]
        if len(rest) > 1 and rest[-1] in SearchParam.model_fields:
            return ("search", "space", ".".join(rest[:-1]), rest[-1])
        return ("search", "space", ".".join(rest))
    if parts[0] == "variants" and len(parts) > 2:
        return ("variants", parts[1], ".".join(parts[2:]))
    return parts


def _set(data: dict, parts: tuple, value: Any) -> Optional[str]:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            return f"cannot set it: {_fmt(parts[:i + 1])} is not a mapping"
        node = child
    node[parts[-1]] = value
    return None


def _get(data: Any, parts: tuple) -> Any:
    for part in parts:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return _MISSING
    return data


# ------------------------------------------------------------------------------------ schema and messages

def _strip(ann: Any) -> Any:
    """The annotation without Annotated metadata and Optional."""
    while True:
        if get_origin(ann) is Annotated:
            ann = get_args(ann)[0]
        elif _is_union(ann) and len([a for a in get_args(ann) if a is not type(None)]) == 1:
            ann = next(a for a in get_args(ann) if a is not type(None))
        else:
            return ann


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType)


def _model_in(ann: Any) -> Optional[type[BaseModel]]:
    ann = _strip(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _field_annotation(parts: tuple, root: Any = Spec) -> tuple[Any, Optional[str]]:
    """(annotation, None) of the field at `parts` under `root`, or (None, why it does not exist)."""
    ann = root
    for i, part in enumerate(parts):
        model, plain = _model_in(ann), _strip(ann)
        if model is not None:
            if part not in model.model_fields:
                return None, _unknown_key_message(str(part), model, parts[:i])
            ann = model.model_fields[part].annotation
        elif get_origin(plain) is dict:  # user-chosen keys (ablate, variants, search)
            ann = get_args(plain)[1] if get_args(plain) else Any
        elif plain is Any:
            return Any, None  # free-form data below
        elif isinstance(part, int) and any(get_origin(a) is list for a in _members(plain)):
            ann = get_args(next(a for a in _members(plain) if get_origin(a) is list))[0]
        else:
            return None, f"{_fmt(parts[:i])} is a single value; it has no key {part!r}"
    return ann, None


def _field_description(path: tuple) -> Optional[str]:
    """The pydantic `description` of the field at `path`, if it has one (what a value of it means)."""
    model = _model_in(_field_annotation(path[:-1])[0]) if path else None
    field = model.model_fields.get(path[-1]) if model is not None else None
    return field.description if field is not None else None


def _members(ann: Any) -> tuple:
    return get_args(ann) if _is_union(ann) else (ann,)


def _unknown_key_message(key: str, model: type[BaseModel], parent: tuple) -> str:
    known = list(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    # a key written without its prefix or suffix (data.seed for data.synthetic_seed) is too short for difflib
    close = close or [k for k in known if k.endswith(f"_{key}") or k.startswith(f"{key}_")][:1]
    where = f"in {_fmt(parent)}" if parent else "at the top level"
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} {where}; {hint}known keys: {', '.join(known)}"


def _trial_key_error(key: Any) -> Optional[str]:
    """Why `key` cannot be ablated or set by a variant, or None."""
    if not isinstance(key, str) or not key:
        return f"expected a dotted key such as student.model.decoder_layers, got {_show(key)}"
    parts = tuple(key.split("."))
    if parts[0] not in TRIAL_SECTIONS:
        return f"{key!r} is not a trial setting: these keys start with one of {', '.join(TRIAL_SECTIONS)}"
    return _field_annotation(parts)[1]


def _describe(ann: Any) -> str:
    """What a value of this annotation looks like, for messages."""
    ann = _strip(ann)
    if get_origin(ann) is Literal:
        names = [str(a) for a in get_args(ann)]
        return "one of " + ", ".join(names)
    if _is_union(ann):
        return " or ".join(_describe(a) for a in get_args(ann) if a is not type(None))
    if get_origin(ann) is list:
        item = _describe(get_args(ann)[0]) if get_args(ann) and get_args(ann)[0] is not Any else ""
        return "a list" + (f" of {item.removeprefix('an ').removeprefix('a ')}s" if item.startswith("a") else "")
    simple = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}
    if ann in simple:
        return simple[ann]
    if _model_in(ann) is not None or get_origin(ann) is dict:
        return "a mapping (key: value)"
    return "a valid value"


def _pydantic_issues(error: ValidationError, prefix: tuple, root: Any) -> list[_Issue]:
    """Pydantic's errors as issues with paths from the spec's root and messages that say what was expected."""
    issues, unions_seen = [], set()
    for err in error.errors(include_url=False):
        path, in_union = _clean_loc(prefix + tuple(err["loc"]))
        ann, _ = _field_annotation(path)
        if in_union:  # one message for the whole union, not one per alternative
            if path not in unions_seen:
                unions_seen.add(path)
                issues.append(_Issue(path, f"expected {_describe(ann)}, got {_show(_get(root, path))}"))
            continue
        if err["type"] in ("value_error", "assertion_error"):
            message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            issues.append(_refine(path, message, root))
            continue
        issues.append(_Issue(path, _message(err, path, ann)))
    return issues


_TYPE_TAG = re.compile(r"^(?:[a-z][a-z0-9_-]*\[.*\]|int|float|str|bool|none)$")


def _clean_loc(loc: tuple) -> tuple[tuple, bool]:
    """Drop pydantic's type tags from an error location; (path, whether the error is inside a union)."""
    out = []
    for i, seg in enumerate(loc):
        name_position = i == 1 and loc[0] in ("ablate", "variants")  # user-chosen keys, never tags
        if seg == "[key]":
            continue
        if isinstance(seg, str) and not name_position and _TYPE_TAG.match(seg):
            return tuple(out), True
        out.append(seg)
    return tuple(out), False


def _refine(path: tuple, message: str, root: Any) -> _Issue:
    """A model validator's error belongs to the whole model; point at the field its message names."""
    model = _model_in(_field_annotation(path)[0]) if path else Spec
    raw = _get(root, path)
    named = [f for f in (model.model_fields if model else ()) if re.search(rf"\b{f}\b", message)]
    written = [f for f in named if isinstance(raw, dict) and f in raw]
    field = (written or named or [None])[0]
    return _Issue(path + (field,), message, related=(path,)) if field else _Issue(path, message)


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _message(err: dict, path: tuple, ann: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input", _MISSING)
    got = f", got {_show(value)}"
    expected = _describe(ann) if ann is not None else "a valid value"
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        return f"expected {expected} {op} {ctx[name]}{got}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        parent = _model_in(_field_annotation(path[:-1])[0]) if len(path) > 1 else Spec
        return _unknown_key_message(str(path[-1]), parent, path[:-1]) if parent else f"unknown key {path[-1]!r}"
    if kind == "literal_error":
        options = [str(o) for o in get_args(_strip(ann))] if ann is not None else []
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        return f"expected {expected}{got}" + (f"; did you mean {close[0]}?" if close else "")
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length', 1)} item(s){got}"
    if kind == "string_pattern_mismatch":
        return f"expected a name of letters, digits, '-' and '_' starting with a letter or digit (at most 64){got}"
    if kind.endswith(("_type", "_parsing")) or kind in ("int_from_float", "model_attributes_type"):
        meaning = _field_description(path)
        return f"expected {expected}{f' ({meaning})' if meaning else ''}{got}"
    return f"{err['msg']}{got}"


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))


def _fmt(path: tuple) -> str:
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else ("." if out else "") + str(seg)
    return out


def _overlaps(a: tuple, b: tuple) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


# -------------------------------------------------------------------------------------------- expansion

class TeacherTrial(BaseModel):
    """The teacher's own training trial; students wait for it. Shared by hash across trials and experiments."""
    model_config = ConfigDict(frozen=True)
    config: TrialConfig
    hash: str


class PlannedTrial(BaseModel):
    """One student trial of an experiment, ready for the planner."""
    model_config = ConfigDict(frozen=True)
    label: str  # readable coordinates, e.g. "variant=adamixer distill.method=fgd seed=0"
    coords: dict[str, Any]  # ablated key -> value, plus "variant" (when there are variants) and "seed"
    config: TrialConfig  # the resolved trial; teacher.checkpoint is filled by the scheduler when teacher_ref is set
    hash: str  # trial_hash(config, teacher_ref): equal hashes are the same trial, run once
    teacher: Optional[TeacherTrial] = None  # the teacher trial to train first (None: no teacher or a checkpoint)
    teacher_ref: Optional[str] = None  # "trial:<teacher hash>" or a runs:/ URI: where the teacher weights come from

    @property
    def variant(self) -> Optional[str]:
        return self.coords.get("variant")

    @property
    def seed(self) -> int:
        return self.coords["seed"]


def trial_hash(config: TrialConfig, teacher_ref: Optional[str] = None) -> str:
    """First 12 hex digits of the sha256 of the trial's canonical JSON, without the non-semantic fields.
    With `teacher_ref`, the teacher is identified by it (the teacher trial's hash, or an MLflow URI) instead
    of by wherever its checkpoint ends up on disk."""
    payload = config.model_dump(mode="json", exclude=NON_SEMANTIC_FIELDS)
    for model in (payload["model"], (payload.get("teacher") or {}).get("model") or {}):
        for key, default in ADDED_MODEL_FIELDS.items():
            if key in model and model[key] == default:
                del model[key]
    for section, added in (("schedule", ADDED_SCHEDULE_FIELDS), ("data", ADDED_DATA_FIELDS)):
        for key, default in added.items():
            if key in payload[section] and payload[section][key] == default:
                del payload[section][key]
    if teacher_ref is not None and payload.get("teacher") is not None:
        payload["teacher"]["checkpoint"] = teacher_ref
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def teacher_trial(spec: Spec) -> Optional[TrialConfig]:
    """The teacher's own training trial, or None when the spec has no teacher or gives its checkpoint."""
    if spec.teacher is None or spec.teacher.checkpoint is not None:
        return None
    return TrialConfig(name=f"{spec.name}/teacher", data=spec.data, model=spec.teacher.model,
                       schedule=spec.teacher.schedule, loss=spec.loss, seed=TEACHER_SEED,
                       runtime=spec.runtime).model_copy(deep=True)


def expand_trials(spec: Spec) -> list[PlannedTrial]:
    """Every trial of a validated spec: variants x ablate grid x seeds, in that nesting order."""
    trials = []
    for cell in _cells(spec.model_dump(exclude_unset=True), list(spec.ablate.items()), spec.variants):
        group = Spec.model_validate(cell.raw)
        teacher, teacher_ref, teacher_config = None, None, None
        if group.distill.method != "none":
            checkpoint = group.teacher.checkpoint
            teacher_config = TeacherConfig(model=group.teacher.model)
            if checkpoint is None:
                config = teacher_trial(group)
                teacher = TeacherTrial(config=config, hash=trial_hash(config))
                teacher_ref = f"trial:{teacher.hash}"
            elif checkpoint.startswith("runs:/"):
                teacher_ref = checkpoint
            else:
                teacher_config.checkpoint = Path(checkpoint)
        # a trial without distillation ignores the distill settings; dropping them lets the same baseline
        # be found by hash across experiments instead of being trained again
        distill = group.distill if group.distill.method != "none" else DistillConfig()
        for seed in spec.seeds:
            coords = {**cell.coords, "seed": seed}
            label = " ".join(f"{k}={_label(v)}" for k, v in coords.items())
            config = TrialConfig(name=f"{spec.name}/{label}", data=group.data, model=group.student.model,
                                 schedule=group.student.schedule, loss=group.loss, seed=seed, distill=distill,
                                 runtime=group.runtime,
                                 teacher=teacher_config).model_copy(deep=True)
            trials.append(PlannedTrial(label=label, coords=coords, config=config,
                                       hash=trial_hash(config, teacher_ref), teacher=teacher,
                                       teacher_ref=teacher_ref))
    return trials


# ------------------------------------------------------------------------------------------- searches

@dataclasses.dataclass(frozen=True)
class SearchCell:
    """One search of a spec with a `search:` block: a cell of the variants x ablate grid, whose settings stay
    fixed while the search samples the searched keys."""
    index: int
    coords: dict[str, Any]  # ablated key (and "variant") -> value; {} without ablate or variants
    raw: dict  # the cell as a plain spec (JSON values): ablate, variants, search and table resolved away

    @property
    def key(self) -> str:
        """A folder and artifact name for the cell."""
        return f"cell-{self.index}"

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_label(v)}" for k, v in self.coords.items())


def search_cells(spec: Spec) -> list[SearchCell]:
    """The searches of a validated spec: one per variant x ablate cell, in expansion order."""
    data = spec.model_dump(mode="json", exclude_unset=True)
    cells = []
    for i, cell in enumerate(_cells(data, list(spec.ablate.items()), spec.variants)):
        raw = {k: v for k, v in cell.raw.items() if k not in ("search", "table")}
        cells.append(SearchCell(i, cell.coords, raw))
    return cells


def point_spec(cell: SearchCell, point: dict[str, Any], **top: Any) -> Spec:
    """The spec of one sampled point: the cell with the point's values set (and top-level keys such as name
    or description replaced by `top`), validated as a whole like any spec; raises SpecError. It has no
    search block, so `detrdistill run` of it trains exactly the trial that this point was."""
    raw = copy.deepcopy(cell.raw)
    for key, value in point.items():
        _set(raw, tuple(key.split(".")), value)
    raw.update(top)
    return validate_spec(raw, file=f"search point {json.dumps(point, default=str)}")
