"""Every rule a spec must follow beyond its schema, checked on the raw spec so that all problems are found at
once: the grid's keys, every trial group as the trial it becomes (sections, files, teacher/student
combinations), the table's keys and the search block.

Validation is per trial group: every cell of the variants x ablate grid is checked as the trial it becomes,
so a value that is wrong only in one combination (a layer mapping that fits 6 student layers but not 2) is
caught, and reported at the ablate entry or variant that produced it.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from orchestrator.spec.errors import (Issue, describe, field_annotation, pydantic_issues, strip_annotation,
                                      trial_key_error)
from orchestrator.spec.raw import (MISSING, Cell, fmt_path, get_path, grid_cells, overlaps, set_path, show,
                                   split_key, value_label)
from orchestrator.spec.schema import SEARCH_SECTIONS, SECTION_MODELS, TRIAL_SECTIONS, SearchParam, Spec, TableSpec
from trainers.config import DataConfig, DistillConfig, ModelConfig, ScheduleConfig
from trainers.distill.mapping import layer_mapping  # plain Python: no torch at validation time


def check(data: dict) -> list[tuple[tuple, str]]:
    """Every problem of a raw spec (overrides applied) as (path, message): structure, grid, every trial group,
    table, search."""
    axes, variants, grid_issues = _grid(data)
    located = [(i.path, i.message) for i in _top_level_issues(data) + grid_issues]
    located += _cell_issues(data, axes, variants)
    located += [(i.path, i.message) for i in _table_issues(data, axes, variants)]
    return located + _search_issues(data, axes, variants)


def _top_level_issues(data: dict) -> list[Issue]:
    """Pydantic's problems outside the trial sections (those are checked per trial group)."""
    try:
        Spec.model_validate(data)
    except ValidationError as e:
        return [i for i in pydantic_issues(e, (), data) if i.path and i.path[0] not in TRIAL_SECTIONS]
    return []


def _grid(data: dict) -> tuple[list[tuple[str, list]], dict[str, dict[str, Any]], list[Issue]]:
    """The usable ablate axes and variants, and the problems of their keys (pydantic reports their types)."""
    issues: list[Issue] = []
    axes: list[tuple[str, list]] = []
    ablate = data.get("ablate")
    for key, values in (ablate.items() if isinstance(ablate, dict) else ()):
        error = trial_key_error(key)
        if error:
            issues.append(Issue(("ablate", key), error))
            continue
        if not isinstance(values, list) or not values:
            continue
        clash = [k for k, _ in axes if overlaps(split_key(k), split_key(key))]
        if clash:
            issues.append(Issue(("ablate", key), f"overlaps ablate key {clash[0]!r}: one sets part of the other"))
            continue
        for j, value in enumerate(values):
            if value in values[:j]:
                issues.append(Issue(("ablate", key, j), (
                    f"duplicate value {show(value)} (already at position {values.index(value)}); "
                    f"each value is one set of trials")))
        axes.append((key, values))
    seeds = data.get("seeds")
    for j, seed in enumerate(seeds if isinstance(seeds, list) else ()):
        if seed in seeds[:j]:
            issues.append(Issue(("seeds", j), f"duplicate seed {show(seed)}"))
    variants: dict[str, dict[str, Any]] = {}
    raw_variants = data.get("variants")
    for name, settings in (raw_variants.items() if isinstance(raw_variants, dict) else ()):
        if not isinstance(settings, dict):
            continue
        variants[name] = {}
        for key, value in settings.items():
            error = trial_key_error(key)
            clash = [k for k, _ in axes if not error and overlaps(split_key(k), split_key(key))]
            if clash:
                error = f"is also ablated (ablate.{clash[0]}); vary a setting by variants or by ablate, not both"
            if error:
                issues.append(Issue(("variants", name, key), error))
            else:
                variants[name][key] = value
    return axes, variants, issues


def _cell_issues(data, axes, variants) -> list[tuple[tuple, str]]:
    """Check every trial group as the trial it becomes. A problem the spec has without any ablation is
    reported where it is written; one that only some groups have is reported at the ablate entry or
    variant responsible."""
    base = {k: v for k, v in data.items() if k not in ("ablate", "variants")}
    in_base = {(i.path, i.message) for i in _trial_issues(base)}
    located = []
    for cell in grid_cells(data, axes, variants):
        for issue in _trial_issues(cell.raw):
            located.append(_attribute(issue, cell, in_base))
    return located


def _attribute(issue: Issue, cell: Cell, in_base: set) -> tuple[tuple, str]:
    for origin in cell.origins:  # the bad value itself was set by this cell
        if issue.path[:len(origin.key)] == origin.key:
            rest = issue.path[len(origin.key):]
            return origin.at, (f"{fmt_path(rest)}: " if rest else "") + issue.message
    if (issue.path, issue.message) in in_base:
        return issue.path, issue.message
    for candidate in (issue.path, *issue.related):  # a combination: blame a setting that took part
        for origin in cell.origins:
            if overlaps(origin.key, candidate):
                return origin.at, f"{fmt_path(issue.path)}: {issue.message} (with {origin.label})"
    labels = ", ".join(o.label for o in cell.origins)
    return issue.path, f"{issue.message} (with {labels})"


def _trial_issues(raw: dict) -> list[Issue]:
    """The problems of one trial group: each trial section validated on its own (so one bad section does
    not hide the others), then the rules that involve several sections or the file system."""
    issues: list[Issue] = []
    parts: dict[str, tuple[Any, set]] = {}
    for name, model in SECTION_MODELS.items():
        value = raw.get(name, MISSING)
        if value is MISSING or (value is None and name == "teacher"):
            if name == "student":
                issues.append(Issue(("student",), (
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
        issues.append(Issue(("distill", "method"), (
            f"method {distill.method} distils from a teacher, but the spec has no teacher; add a teacher "
            f"block (model, schedule or checkpoint) or use method none"), related=(("teacher",),)))
    return issues + _kd_issues(distill, teacher and teacher.model, student and student.model)


def _validate_part(model: type[BaseModel], value: Any, prefix: tuple, root: Any
                   ) -> tuple[Optional[BaseModel], set, list[Issue]]:
    """(instance, names of its invalid fields, issues). When some fields are invalid the instance is built
    without them, so checks that read only the other fields still run."""
    try:
        return model.model_validate(value), set(), []
    except ValidationError as e:
        issues = pydantic_issues(e, prefix, root)
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
        if isinstance(value, dict) and bad and bad <= set(value):
            try:
                return model.model_validate({k: v for k, v in value.items() if k not in bad}), bad, issues
            except ValidationError:
                pass
        return None, bad, issues


def _file_issues(data: Optional[DataConfig], teacher: Optional[ModelConfig], student: Optional[ModelConfig],
                 checkpoint: Optional[str]) -> list[Issue]:
    """Files the trial will read must exist now, not hours into a run."""
    issues = _coco_issues(data) if data is not None and data.format == "coco" else []
    for role, model in (("teacher", teacher), ("student", student)):
        if model is not None and isinstance(model.backbone_weights, Path) and not model.backbone_weights.is_file():
            issues.append(Issue((role, "model", "backbone_weights"),
                                 f"backbone weights file {model.backbone_weights} does not exist"))
    return issues + (_checkpoint_issues(checkpoint) if checkpoint is not None else [])


def _coco_issues(data: DataConfig) -> list[Issue]:
    root = data.root
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        return [Issue(("data", "root"), (
            f"COCO root {root} is not a directory{where}; put COCO there (annotations/, image folders) or run "
            f"on the synthetic task: --set data.format=synthetic --set data.root=data/synthetic"))]
    issues = []
    for field in ("train", "val"):
        if not (root / getattr(data, field)).is_file():
            issues.append(Issue(("data", field), f"annotation file {root / getattr(data, field)} does not exist"))
    for field in ("train_images", "val_images"):
        if not (root / getattr(data, field)).is_dir():
            issues.append(Issue(("data", field), f"image folder {root / getattr(data, field)} does not exist"))
    return issues


def _checkpoint_issues(checkpoint: str) -> list[Issue]:
    at = ("teacher", "checkpoint")
    if checkpoint.startswith("hf:"):  # the hub cache is looked at by validate's warnings, resolved by run
        if not re.fullmatch(r"hf:[\w.-]+(/[\w.-]+)?(@[\w./-]+)?", checkpoint):
            return [Issue(at, f"expected a hub checkpoint hf:<repo id>[@revision], got {checkpoint!r}")]
        return []
    if checkpoint.startswith("runs:/"):  # resolved by the scheduler, which talks to MLflow; validate does not
        if not re.fullmatch(r"runs:/[0-9A-Za-z_-]+(/\S*)?", checkpoint):
            return [Issue(at, f"expected an MLflow URI runs:/<run_id>/<artifact path>, got {checkpoint!r}")]
        return []
    path = Path(checkpoint)
    if path.is_dir() and not (path / "config.json").is_file():
        return [Issue(at, f"{checkpoint} is a directory but not a transformers save_pretrained one (no config.json)")]
    if not path.exists():
        return [Issue(at, (
            f"teacher checkpoint {checkpoint} does not exist; give a checkpoint file, a transformers "
            f"save_pretrained directory, runs:/<run_id>/<path> or hf:<repo id>, or remove checkpoint to train the teacher"))]
    return []


def _kd_issues(distill: DistillConfig, teacher: Optional[ModelConfig], student: Optional[ModelConfig]
               ) -> list[Issue]:
    """Impossible teacher/student combinations (docs/method.md: layer mapping, query prior, feature maps). Each
    check runs when the models it reads are valid (None: invalid, reported elsewhere)."""
    issues = []
    at, mapping = ("distill", "layer_mapping"), distill.layer_mapping
    if distill.method == "detrdistill" and None not in (student, teacher):
        try:  # the trainer's own mapping decides what is possible
            layer_mapping(mapping, student.decoder_layers, teacher.decoder_layers)
        except ValueError as e:
            out_of_range = [i for i, t in enumerate(mapping) if not 0 <= t < teacher.decoder_layers
                            ] if isinstance(mapping, list) and len(mapping) == student.decoder_layers else []
            issues.append(Issue(at + tuple(out_of_range[:1]), str(e), related=(
                ("student", "model", "decoder_layers"), ("teacher", "model", "decoder_layers"))))
    if distill.method == "detrdistill":
        if None not in (student, teacher) and distill.query_prior.weight > 0 and student.family != teacher.family:
            issues.append(Issue(("teacher", "model", "family"), (
                f"query-prior distillation feeds the teacher's queries to the student's decoder, so both must "
                f"be the same family, but the teacher is {teacher.family} and the student {student.family}; "
                f"set distill.query_prior.weight: 0 to distil across families"),
                related=(("student", "model", "family"),)))
        elif None not in (student, teacher) and distill.query_prior.weight > 0 \
                and student.hidden_dim != teacher.hidden_dim:
            issues.append(Issue(("student", "model", "hidden_dim"), (
                f"query-prior distillation feeds the teacher's {teacher.hidden_dim}-d queries to the student's "
                f"decoder, but the student's hidden_dim is {student.hidden_dim}; make them equal or set "
                f"distill.query_prior.weight: 0"), related=(("teacher", "model", "hidden_dim"),)))
    features = distill.method in ("fitnet", "fgd", "mgd") or (
        distill.method == "detrdistill" and distill.feature.weight > 0)
    if features and None not in (student, teacher) and student.levels != teacher.levels:
        issues.append(Issue(("student", "model", "num_feature_levels"), (
            f"feature distillation compares feature maps level by level, but the student ({student.family}) "
            f"has {student.levels} level(s) and the teacher ({teacher.family}) {teacher.levels}"),
            related=(("student", "model", "family"), ("teacher", "model", "family"),
                     ("teacher", "model", "num_feature_levels"))))
    elif features and None not in (student, teacher) and student.backbone_dilation != teacher.backbone_dilation:
        issues.append(Issue(("student", "model", "backbone_dilation"), (
            f"feature distillation compares feature maps point by point, but only the "
            f"{'student' if student.backbone_dilation else 'teacher'} has a dilated C5 (DC5: twice the map side); "
            f"set backbone_dilation alike for both"), related=(("teacher", "model", "backbone_dilation"),)))
    elif features and None not in (student, teacher) and student.finest_stride != teacher.finest_stride:
        issues.append(Issue(("student", "model", "finest_stride"), (
            f"feature distillation compares feature maps point by point, but the student's finest level has "
            f"stride {student.finest_stride or 8} and the teacher's {teacher.finest_stride or 8} (maps of "
            f"different sides); set finest_stride alike for both"),
            related=(("teacher", "model", "finest_stride"),)))
    return issues


def _table_issues(data, axes, variants) -> list[Issue]:
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
            issues.append(Issue(at, f"{key!r} is already a row or column key"))
            continue
        used.append(key)
        if key in values:
            continue
        error = None if key == "variant" else trial_key_error(key)
        issues.append(Issue(at, error or (
            f"{key!r} is not ablated or varied, so every trial has the same value and it cannot split the "
            f"table; ablate it, or use one of: {', '.join(values)}")))
    for key, value in (table.baseline or {}).items():
        if key not in used:
            issues.append(Issue(("table", "baseline", key), (
                f"{key!r} is not a row or column key of the table ({', '.join(used) or 'none'})")))
        elif key in values and value not in values[key]:
            issues.append(Issue(("table", "baseline", key), (
                f"{show(value)} is not one of the values of {key}: {', '.join(value_label(v) for v in values[key])}")))
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
    cells = grid_cells(data, axes, variants)
    issues += _search_metric_issues(search, params, cells)
    found: dict[tuple[tuple, str], list[str]] = {}  # (where, message) -> labels of the cells that have it
    for cell in cells:
        known = {(i.path, i.message) for i in _trial_issues(cell.raw)}  # reported where they are written
        for key, param in params.items():
            for where, value in param.ends():
                raw = copy.deepcopy(cell.raw)
                set_path(raw, tuple(key.split(".")), value)
                for issue in _trial_issues(raw):
                    if (issue.path, issue.message) not in known:
                        at = "" if issue.path == tuple(key.split(".")) else f"{fmt_path(issue.path)}: "
                        message = f"{key}={value_label(value)}: {at}{issue.message}"
                        found.setdefault((("search", "space", key) + where, message), []).append(
                            ", ".join(o.label for o in cell.origins))
    for (at, message), labels in found.items():  # a problem of only some cells names them
        issues += [(at, message)] if len(labels) == len(cells) else [(at, f"{message} (with {x})") for x in labels]
    return issues


def _search_key_error(key: Any, axes: list[tuple[str, list]], variants: dict[str, dict[str, Any]],
                      searched: list[str]) -> Optional[str]:
    """Why `key` cannot be searched, or None."""
    error = trial_key_error(key)
    if error:
        return error
    if key.split(".")[0] not in SEARCH_SECTIONS:
        return (f"{key!r} cannot be searched: the teacher is trained once and shared by every trial of a search, "
                f"and data, loss and teacher settings shape it too; search student.* and distill.* settings, and "
                f"ablate this one instead (one search per cell)")
    for axis, _ in axes:
        if overlaps(split_key(axis), split_key(key)):
            return f"is also ablated (ablate.{axis}); a setting is searched or ablated, not both"
    for name, settings in variants.items():
        for other in settings:
            if overlaps(split_key(other), split_key(key)):
                return f"is also set by variant {name!r} ({other}); a setting is searched or varied, not both"
    for other in searched:
        if overlaps(split_key(other), split_key(key)):
            return f"overlaps searched key {other!r}: one sets part of the other"
    return None


def _search_type_error(key: str, param: SearchParam) -> Optional[str]:
    """A range of the wrong kind for the setting it searches."""
    ann = strip_annotation(field_annotation(tuple(key.split(".")))[0])
    if param.type in ("uniform", "loguniform") and ann is int:
        return f"{key} is a whole number; search it with type: int (or choice)"
    if param.type != "choice" and ann not in (int, float):
        return f"{key} is not a number ({describe(ann)}); search it with type: choice"
    return None


def _search_metric_issues(search: dict, params: dict[str, SearchParam], cells: list[Cell]
                          ) -> list[tuple[tuple, str]]:
    """The metric must be reported every epoch (Tune and ASHA compare trials epoch by epoch), and ASHA's
    rungs must fit the student's epochs."""
    issues: list[tuple[tuple, str]] = []
    metric = search.get("metric", "AP")
    scheduler = search.get("scheduler")
    for cell in cells:
        labels = ", ".join(o.label for o in cell.origins)
        suffix = f" (with {labels})" if labels else ""
        every = get_path(cell.raw, ("student", "schedule", "eval_every"))
        if isinstance(metric, str) and not metric.startswith("train/") and every not in (MISSING, 1):
            issues.append((("search", "metric"), (
                f"{metric} is measured on evaluation epochs only, but student.schedule.eval_every is {every}; a "
                f"search needs its metric every epoch: set eval_every: 1, or search on a training loss such as "
                f"train/loss_cls{suffix}")))
        if not isinstance(scheduler, dict):
            continue
        epochs = get_path(cell.raw, ("student", "schedule", "epochs"))
        epochs = ScheduleConfig().epochs if epochs is MISSING else epochs
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

