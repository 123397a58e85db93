"""Reading a spec: YAML (safe loading, the line of every key, duplicate keys), `--set KEY=VALUE` overrides,
then every check at once (checks.py); the result is a Spec or a SpecError listing each problem with its
dotted path and YAML line."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from orchestrator.spec.checks import check
from orchestrator.spec.errors import SpecError, SpecProblem, field_annotation
from orchestrator.spec.raw import fmt_path, set_path, split_key
from orchestrator.spec.schema import TRIAL_SECTIONS, Spec


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
    data = copy.deepcopy(data)
    set_from, found = _apply_overrides(data, overrides)
    for key in [k for k, v in data.items() if v is None and k != "name"]:
        # `distill:` with every line commented out means the defaults, not an error
        if key == "student":
            data[key] = {}
        else:
            del data[key]
    seen = set()
    for at, message in check(data):
        problem = _locate(at, message, lines, set_from)
        if problem not in seen:
            seen.add(problem)
            found.append(problem)
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
                    problems.append(SpecProblem(fmt_path(path + (key,)), line, (
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


def _locate(at: tuple, message: str, lines: dict[tuple, int], set_from: dict[tuple, str]) -> SpecProblem:
    for key, text in set_from.items():
        if at[:len(key)] == key:  # the value there came from the command line, not the file
            return SpecProblem(fmt_path(at), None, f"{message} (from --set {text})")
    path = at
    while path and path not in lines:  # a missing key: point at its nearest existing parent
        path = path[:-1]
    return SpecProblem(fmt_path(at), lines.get(path), message)


def _apply_overrides(data: dict, overrides: Sequence[str]) -> tuple[dict[tuple, str], list[SpecProblem]]:
    """Apply `KEY=VALUE` strings (dotted key; VALUE parsed as YAML) to the raw spec, in order. An override
    of a trial setting changes every trial: it also wins over the variants that set it. An ablated key
    is overridden through its list (ablate.KEY=[...])."""
    set_from: dict[tuple, str] = {}
    problems: list[SpecProblem] = []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        parts = split_key(key.strip())
        if not sep or not key.strip():
            problems.append(SpecProblem("", None, (
                f"expected KEY=VALUE, e.g. --set student.schedule.epochs=2 (from --set {text})")))
            continue
        _, error = field_annotation(parts)
        ablated = [k for k in (data.get("ablate") or {})
                   if isinstance(k, str) and parts[:len(split_key(k))] == split_key(k)]
        if error is None and parts[0] in TRIAL_SECTIONS and ablated:
            error = f"is ablated; override its values instead: --set ablate.{ablated[0]}=[...]"
        if error is None:
            try:
                value = yaml.safe_load(value_text)
            except yaml.YAMLError as e:
                error = f"cannot read the value {value_text!r} as YAML: {getattr(e, 'problem', None) or e}"
        if error is None:
            error = set_path(data, parts, value)
        if error is not None:
            problems.append(SpecProblem(fmt_path(parts), None, f"{error} (from --set {text})"))
            continue
        set_from[parts] = text
        if parts[0] in TRIAL_SECTIONS:
            _override_variants(data, parts, value)
    return set_from, problems


def _override_variants(data: dict, parts: tuple, value: Any) -> None:
    variants = data.get("variants")
    for settings in (variants.values() if isinstance(variants, dict) else ()):
        for key in list(settings) if isinstance(settings, dict) else ():
            inner = split_key(key) if isinstance(key, str) else ()
            if inner[:len(parts)] == parts:  # the variant sets (part of) the overridden value: drop it
                del settings[key]
            elif parts[:len(inner)] == inner and isinstance(settings[key], dict):  # it sets a mapping around it
                set_path(settings[key], parts[len(inner):], copy.deepcopy(value))

