"""The package boundaries of trainers/: it never imports Ray or MLflow (whoever runs a trial brings them), and
the engine reaches the GPU machinery only through trainers.accel's functions, never its classes."""
import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import trainers

ROOT = Path(trainers.__file__).resolve().parent


def _modules() -> list[str]:
    """Every module under trainers/, packages included."""
    names = ["trainers"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="trainers."):
        names.append(info.name)
    return sorted(names)


def test_no_module_under_trainers_imports_ray_or_mlflow():
    modules = _modules()
    assert "trainers.engine" in modules and "trainers.accel.training" in modules
    script = ("import importlib, json, sys\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT.parent,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _accel_classes() -> set[str]:
    names = set()
    for path in (ROOT / "accel").rglob("*.py"):
        names |= {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)}
    return names


def _names_in(path: Path) -> set[str]:
    """Every identifier the code of `path` uses: names, attributes, imported names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names |= {node.name.split(".")[-1], node.asname or node.name}
    return names


def test_the_engine_names_none_of_the_accel_classes():
    classes = _accel_classes()
    assert {"BF16Weights", "GraphedModel", "GraphedTeacher", "RunAhead", "FiniteLossCheck", "LossSums"} <= classes
    assert _names_in(ROOT / "engine.py") & classes == set()
    assert "accel" in _names_in(ROOT / "engine.py")
