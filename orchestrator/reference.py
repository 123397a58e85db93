"""The spec reference, generated from the pydantic models: docs/spec.md (Markdown) and docs/spec.schema.json.

`spec_reference()` walks every model reachable from `Spec` through its fields' annotations (Optional, Union,
list, dict, Literal, Annotated, nested models) and renders one section per model: where it sits in a spec, its
docstring, and a table of its keys with their type, default and meaning. A key's meaning is its pydantic
`description`, else the comment on its line in the source (or the comment lines just above it), else the first
paragraph of its nested model's docstring. Nothing here names a field: a field added to a model appears in the
reference when it is generated again.

    python -m orchestrator.reference           rewrite docs/spec.md and docs/spec.schema.json
    python -m orchestrator.reference --check   exit 1 when they differ from what would be written
"""
from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator.spec import Spec

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKDOWN, SCHEMA = "spec.md", "spec.schema.json"

INTRO = """\
# Spec reference

Generated from the pydantic models by `python -m orchestrator.reference`: edit the models, not this file.
The same schema as JSON Schema, for editors: [spec.schema.json](spec.schema.json).

A spec is one YAML mapping of plain data (read with `yaml.safe_load`: no tags, no code, no imports).
`detrdistill validate SPEC...` checks it without running anything and lists every problem at once as
`FILE:LINE: dotted.path: message` (exit 2; exit 0 when valid). What it refuses:

- **Unknown keys** anywhere (with the closest known key as a hint), wrong types, values out of range.
- **Combinations** that cannot train, checked for every cell of the grid as the trial it becomes: a layer mapping
  against both decoder depths, the query prior across families or widths, feature distillation across different
  numbers of feature levels, a distilling trial without a teacher, data or checkpoint files that do not exist.

How a spec becomes trials:

- `--set KEY=VALUE` (repeatable) overrides any key by its dotted path, the value read as YAML:
  `--set student.schedule.epochs=24`, `--set data.format=synthetic`. An override wins over variants; an ablated
  key is overridden through its list: `--set ablate.distill.method=[none,detrdistill]`.
- `ablate` maps dotted keys to lists of values; their cartesian product is the grid.
- `variants` names groups of settings changed together (`{adamixer: {student.model.family: adamixer, ...}}`);
  each variant is crossed with the grid.
- `seeds` are the students' seeds; a teacher always trains with seed 0. Trials = variants x grid x seeds.
- A trial is identified by a hash of its resolved config, the method's code version and its dataset's identity,
  so the same trial is never trained twice, by this experiment or any other that shares the trial store, and a
  trial finished under other code or data is never reused. The `runtime` section (how a trial runs rather than
  what it learns) is not part of the hash.
- `search` turns the spec into one hyperparameter search (Ray Tune with Optuna's sampler) per cell of the grid,
  with one seed. It may vary only `student.*` and `distill.*` keys (the teacher is shared by every trial), not a
  key that ablate or a variant sets. Both ends of every range (every choice) are validated in every cell as the
  trial they make, before anything runs, and each sampled point is validated again as a whole spec before its
  trial starts. An evaluation metric needs `student.schedule.eval_every: 1`; the mode must maximise AP and
  minimise losses.
- Relative paths are relative to the working directory.

Types: `a` / `b` is a choice among those values; "or null" means the key may be `null` (or left out, when its
default is null). Defaults of nested blocks are their own tables' defaults unless the default column says otherwise.
"""


# ------------------------------------------------------------------------------------------------ annotations

def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType)


def _unwrap(ann: Any) -> tuple[Any, list]:
    """Annotated[X, ...] -> (X, its constraints); anything else -> (ann, [])."""
    constraints: list = []
    while get_origin(ann) is Annotated:
        ann, *meta = get_args(ann)
        for m in meta:
            constraints.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return ann, constraints


def _models_in(ann: Any) -> list[tuple[str, type[BaseModel]]]:
    """(path suffix, model) of every model inside an annotation: '' for the value itself, '[]' for a list item,
    '.<key>' for a mapping's value."""
    ann, _ = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [("", ann)]
    origin, args = get_origin(ann), get_args(ann)
    if _is_union(ann):
        return [found for a in args for found in _models_in(a)]
    if origin in (list, tuple, set, frozenset) and args:
        return [("[]" + suffix, m) for a in args if a is not Ellipsis for suffix, m in _models_in(a)]
    if origin is dict and len(args) == 2:
        return [(".<key>" + suffix, m) for suffix, m in _models_in(args[1])]
    return []


def _scalar(value: Any) -> str:
    """A value as YAML writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _flow(value: Any) -> str:
    """A default as YAML flow style: scalars, [lists] and {mappings}."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


_CONSTRAINTS = (("ge", ">= {}"), ("gt", "> {}"), ("le", "<= {}"), ("lt", "< {}"), ("multiple_of", "multiple of {}"),
                ("min_length", "at least {} {}"), ("max_length", "at most {} {}"), ("pattern", "matching `{}`"))


def _constraints(items: list, text: bool = False) -> list[str]:
    """pydantic / annotated-types constraints as words; lengths count characters of a string, else items."""
    out = []
    for item in items:
        for name, form in _CONSTRAINTS:
            value = getattr(item, name, None)
            if value is not None:
                unit = ("character" if text else "item") + ("s" if value != 1 else "")
                out.append(form.format(value, unit))
    return out


def _grouped(ann: Any) -> str:
    """A type inside another (a list's items, a mapping's values): in parentheses when it is a union."""
    text = _type(ann)
    return f"({text})" if " or " in text else text


def _type(ann: Any, constraints: list = ()) -> str:
    """A readable type: int, `a` / `b`, list of int, mapping of str to X, [Model](#model), ... or null."""
    ann, inner = _unwrap(ann)
    constraints = list(constraints) + inner
    origin, args = get_origin(ann), get_args(ann)
    if _is_union(ann):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: the field's constraints are X's
            text, constraints = _type(members[0], constraints), []
        else:
            text = " or ".join(_type(a) for a in members)
        if len(members) < len(args):
            text += " or null"
    elif origin is Literal:
        text = " / ".join(f"`{_scalar(a)}`" for a in args)
    elif origin in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        text = "list" + (f" of {_grouped(items[0])}" if items and items[0] is not Any else "")
    elif origin is dict:
        key, value = args if len(args) == 2 else (Any, Any)
        plain_key, key_limits = _unwrap(key)
        text = "mapping"
        if key is not Any and (plain_key is not str or key_limits):  # plain string keys go without saying
            text += f" of {_grouped(key)}"
        text += f" to {_grouped(value)}" if value is not Any else ""
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        text = f"[{ann.__name__}](#{ann.__name__.lower()})"
    elif ann is Any:
        text = "any"
    elif ann is type(None):
        text = "null"
    elif isinstance(ann, type) and issubclass(ann, Path):
        text = "path"
    else:
        text = getattr(ann, "__name__", str(ann))
    limits = _constraints(constraints, text=text == "str")
    return f"{text} ({', '.join(limits)})" if limits else text


# ------------------------------------------------------------------------------------------------ descriptions

def _doc(model: type[BaseModel]) -> str:
    """The model's own docstring (not one inherited from a base class), paragraphs kept."""
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _source_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment on its line in the model's source, else the comment lines just above it."""
    try:
        source = textwrap.dedent("".join(inspect.getsourcelines(model)[0]))
        tree = ast.parse(source)
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else ():
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if node.lineno in comments and not lines[node.lineno - 1].lstrip().startswith("#"):
            out[node.target.id] = comments[node.lineno]
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        if above:
            out[node.target.id] = " ".join(above)
    return out


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Source comments of every field, looked up in the class of the MRO that declares it."""
    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            out.update(_source_comments(cls))
    return out


def _description(model: type[BaseModel], name: str, field: FieldInfo, comments: dict[str, str]) -> str:
    if field.description:
        return " ".join(field.description.split())
    if name in comments:
        return comments[name]
    nested = [m for _, m in _models_in(field.annotation)]
    if nested and _doc(nested[0]):
        return _paragraphs(_doc(nested[0]))[0]
    return ""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    try:
        value = field.get_default(call_default_factory=True, validated_data={})
    except TypeError:  # a factory that needs other fields' values
        return "computed"
    if isinstance(value, BaseModel):
        try:
            plain = type(value)().model_dump(mode="json")
        except Exception:  # noqa: BLE001 - a model with required fields has no plain default to compare with
            plain = None
        changed = {k: v for k, v in value.model_dump(mode="json").items() if plain is None or plain.get(k) != v}
        return "defaults" + (f", `{_flow(changed)}`" if changed else "")
    return f"`{_flow(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# ------------------------------------------------------------------------------------------------ the walk

def _walk(root: type[BaseModel]) -> dict[type[BaseModel], list[str]]:
    """Every model reachable from `root`, in first-seen order, with the dotted paths where it sits."""
    places: dict[type[BaseModel], list[str]] = {root: []}

    def visit(model: type[BaseModel], path: str, ancestry: tuple) -> None:
        for name, field in model.model_fields.items():
            for suffix, nested in _models_in(field.annotation):
                where = f"{path}.{name}{suffix}" if path else f"{name}{suffix}"
                places.setdefault(nested, [])
                if where not in places[nested]:
                    places[nested].append(where)
                if nested not in ancestry:
                    visit(nested, where, ancestry + (nested,))

    visit(root, "", (root,))
    return places


def _section(model: type[BaseModel], where: list[str]) -> str:
    out = [f"## {model.__name__}", ""]
    out.append("At " + ", ".join(f"`{w}`" for w in where) + "." if where else "The whole spec (the top level).")
    out.append("")
    for paragraph in _paragraphs(_doc(model)):
        out += [paragraph, ""]
    comments = _field_comments(model)
    out += ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        row = [f"`{name}`", _type(field.annotation, field.metadata), _default(field),
               _description(model, name, field, comments)]
        out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(out) + "\n"


def spec_reference() -> str:
    """The spec reference in Markdown: an introduction, then one section per model reachable from Spec."""
    places = _walk(Spec)
    contents = ", ".join(f"[{m.__name__}](#{m.__name__.lower()})" for m in places)
    return INTRO + "\nModels: " + contents + ".\n\n" + "\n".join(_section(m, w) for m, w in places.items())


def spec_json_schema() -> dict:
    """JSON Schema of a spec (`Spec.model_json_schema()`), for editors that complete and check YAML."""
    return Spec.model_json_schema()


def generated() -> dict[str, str]:
    """File name under docs/ -> its generated text."""
    return {MARKDOWN: spec_reference(), SCHEMA: json.dumps(spec_json_schema(), indent=2) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the files differ; write nothing")
    parser.add_argument("--docs", type=Path, default=DOCS, metavar="DIR", help=f"default: {DOCS}")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generated().items():
        path = args.docs / name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check:
        for path in stale:
            print(f"{path}: out of date; run python -m orchestrator.reference", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
