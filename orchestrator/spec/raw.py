"""A raw spec (the parsed YAML: plain dicts and lists, before pydantic) and the dotted keys that point into it:
reading and setting values by path, writing paths and values in messages, and the cells of the grid."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from typing import Any, Optional

from orchestrator.spec.schema import SearchParam

MISSING = object()  # what get_path finds where nothing is written


def split_key(key: str) -> tuple:
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


def set_path(data: dict, parts: tuple, value: Any) -> Optional[str]:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            return f"cannot set it: {fmt_path(parts[:i + 1])} is not a mapping"
        node = child
    node[parts[-1]] = value
    return None


def get_path(data: Any, parts: tuple) -> Any:
    for part in parts:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return MISSING
    return data


def show(value: Any) -> str:
    if value is MISSING:
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def value_label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))


def fmt_path(path: tuple) -> str:
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else ("." if out else "") + str(seg)
    return out


def overlaps(a: tuple, b: tuple) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


@dataclasses.dataclass
class Origin:
    """One setting a grid cell applies: the trial field `key` gets `value`, written in the spec at `at`."""
    key: tuple
    at: tuple
    value: Any
    label: str


@dataclasses.dataclass
class Cell:
    coords: dict[str, Any]
    origins: list[Origin]
    raw: dict


def grid_cells(data: dict, axes: list[tuple[str, list]], variants: dict[str, dict[str, Any]]) -> list[Cell]:
    """Every trial group: each variant (or the spec itself when there are none) x each grid combination."""
    base = {k: v for k, v in data.items() if k not in ("ablate", "variants")}
    cells = []
    for variant, settings in (list(variants.items()) or [(None, {})]):
        for index in itertools.product(*(range(len(values)) for _, values in axes)):
            origins = [Origin(split_key(k), ("variants", variant, k), v, f"variant {variant}")
                       for k, v in settings.items()]
            origins += [Origin(split_key(key), ("ablate", key, i), values[i], f"{key}={value_label(values[i])}")
                        for (key, values), i in zip(axes, index)]
            raw = copy.deepcopy(base)
            for origin in origins:
                set_path(raw, origin.key, copy.deepcopy(origin.value))
            coords = {"variant": variant} if variant is not None else {}
            coords.update({key: values[i] for (key, values), i in zip(axes, index)})
            cells.append(Cell(coords, origins, raw))
    return cells
