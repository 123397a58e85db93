"""A spec's problems and their wording: where each is (dotted path, YAML line) and what it says, pydantic's
errors rewritten to say what was expected, unknown keys with the closest known one."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from orchestrator.spec.raw import MISSING, fmt_path, get_path, show
from orchestrator.spec.schema import TRIAL_SECTIONS, Spec


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
class Issue:
    """A problem before it is located: `path` is a tuple into the spec, `related` the other settings that
    took part (used to find the ablate entry responsible when the problem occurs in only some trials)."""
    path: tuple
    message: str
    related: tuple = ()



def strip_annotation(ann: Any) -> Any:
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
    ann = strip_annotation(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def field_annotation(parts: tuple, root: Any = Spec) -> tuple[Any, Optional[str]]:
    """(annotation, None) of the field at `parts` under `root`, or (None, why it does not exist)."""
    ann = root
    for i, part in enumerate(parts):
        model, plain = _model_in(ann), strip_annotation(ann)
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
            return None, f"{fmt_path(parts[:i])} is a single value; it has no key {part!r}"
    return ann, None


def _field_description(path: tuple) -> Optional[str]:
    """The pydantic `description` of the field at `path`, if it has one (what a value of it means)."""
    model = _model_in(field_annotation(path[:-1])[0]) if path else None
    field = model.model_fields.get(path[-1]) if model is not None else None
    return field.description if field is not None else None


def _members(ann: Any) -> tuple:
    return get_args(ann) if _is_union(ann) else (ann,)


def _unknown_key_message(key: str, model: type[BaseModel], parent: tuple) -> str:
    known = list(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    # a key written without its prefix or suffix (data.seed for data.synthetic_seed) is too short for difflib
    close = close or [k for k in known if k.endswith(f"_{key}") or k.startswith(f"{key}_")][:1]
    where = f"in {fmt_path(parent)}" if parent else "at the top level"
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} {where}; {hint}known keys: {', '.join(known)}"


def trial_key_error(key: Any) -> Optional[str]:
    """Why `key` cannot be ablated or set by a variant, or None."""
    if not isinstance(key, str) or not key:
        return f"expected a dotted key such as student.model.decoder_layers, got {show(key)}"
    parts = tuple(key.split("."))
    if parts[0] not in TRIAL_SECTIONS:
        return f"{key!r} is not a trial setting: these keys start with one of {', '.join(TRIAL_SECTIONS)}"
    return field_annotation(parts)[1]


def describe(ann: Any) -> str:
    """What a value of this annotation looks like, for messages."""
    ann = strip_annotation(ann)
    if get_origin(ann) is Literal:
        names = [str(a) for a in get_args(ann)]
        return "one of " + ", ".join(names)
    if _is_union(ann):
        return " or ".join(describe(a) for a in get_args(ann) if a is not type(None))
    if get_origin(ann) is list:
        item = describe(get_args(ann)[0]) if get_args(ann) and get_args(ann)[0] is not Any else ""
        return "a list" + (f" of {item.removeprefix('an ').removeprefix('a ')}s" if item.startswith("a") else "")
    simple = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}
    if ann in simple:
        return simple[ann]
    if _model_in(ann) is not None or get_origin(ann) is dict:
        return "a mapping (key: value)"
    return "a valid value"


def pydantic_issues(error: ValidationError, prefix: tuple, root: Any) -> list[Issue]:
    """Pydantic's errors as issues with paths from the spec's root and messages that say what was expected."""
    issues, unions_seen = [], set()
    for err in error.errors(include_url=False):
        path, in_union = _clean_loc(prefix + tuple(err["loc"]))
        ann, _ = field_annotation(path)
        if in_union:  # one message for the whole union, not one per alternative
            if path not in unions_seen:
                unions_seen.add(path)
                issues.append(Issue(path, f"expected {describe(ann)}, got {show(get_path(root, path))}"))
            continue
        if err["type"] in ("value_error", "assertion_error"):
            message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            issues.append(_refine(path, message, root))
            continue
        issues.append(Issue(path, _message(err, path, ann)))
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


def _refine(path: tuple, message: str, root: Any) -> Issue:
    """A model validator's error belongs to the whole model; point at the field its message names."""
    model = _model_in(field_annotation(path)[0]) if path else Spec
    raw = get_path(root, path)
    named = [f for f in (model.model_fields if model else ()) if re.search(rf"\b{f}\b", message)]
    written = [f for f in named if isinstance(raw, dict) and f in raw]
    field = (written or named or [None])[0]
    return Issue(path + (field,), message, related=(path,)) if field else Issue(path, message)


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _message(err: dict, path: tuple, ann: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input", MISSING)
    got = f", got {show(value)}"
    expected = describe(ann) if ann is not None else "a valid value"
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        return f"expected {expected} {op} {ctx[name]}{got}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        parent = _model_in(field_annotation(path[:-1])[0]) if len(path) > 1 else Spec
        return _unknown_key_message(str(path[-1]), parent, path[:-1]) if parent else f"unknown key {path[-1]!r}"
    if kind == "literal_error":
        options = [str(o) for o in get_args(strip_annotation(ann))] if ann is not None else []
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

