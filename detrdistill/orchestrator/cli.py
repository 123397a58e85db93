"""The `detrdistill` command line.

Each subcommand is one entry of COMMANDS: a function that adds its arguments to an argparse parser and a
handler that takes the parsed arguments and returns the exit status (0 ok, 2 bad input). The handler's
docstring is its help. Imports stay light here: validating a spec must not start Ray, MLflow or torch.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from detrdistill.orchestrator.spec import PlannedTrial, Spec, SpecError, expand_trials, load_spec

EXIT_OK, EXIT_INVALID = 0, 2


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec setting before validation; KEY is dotted, VALUE is YAML "
             "(e.g. --set student.schedule.epochs=2 --set 'ablate.distill.method=[none, detrdistill]'); "
             "repeatable, applied in order, and wins over variants")


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="spec YAML file(s)")
    add_set_argument(parser)


def validate(args: argparse.Namespace) -> int:
    """Check specs without running anything: every problem is listed with its file, line and key.

    Exit status 0 when every spec is valid, 2 otherwise."""
    invalid = 0
    for file in args.specs:
        try:
            spec = load_spec(file, args.overrides)
        except SpecError as e:
            invalid += 1
            for problem in e.problems:
                print(problem.format(e.file), file=sys.stderr)
            count = len(e.problems)
            print(f"{file}: {count} problem{'s' * (count != 1)}; fix {'them' if count != 1 else 'it'} in the "
                  f"file (or override with --set KEY=VALUE) and run `detrdistill validate {file}` again",
                  file=sys.stderr)
            continue
        print(summary(file, spec, expand_trials(spec)))
    return EXIT_INVALID if invalid else EXIT_OK


def summary(file: str, spec: Spec, trials: Sequence[PlannedTrial]) -> str:
    """One line: the spec's name, how many trials, and where its teacher comes from."""
    distinct = len({t.hash for t in trials})
    count = f"{len(trials)} trial{'s' * (len(trials) != 1)}"
    if distinct != len(trials):
        count += f" ({distinct} distinct)"
    teachers = {t.teacher.hash: t.teacher.config.model for t in trials if t.teacher is not None}
    if teachers:
        names = sorted({f"{m.family} {m.backbone}" for m in teachers.values()})
        teacher = f"{len(teachers)} teacher{'s' * (len(teachers) != 1)} trained first ({', '.join(names)})"
    elif any(t.config.teacher is not None for t in trials):
        teacher = "teacher from " + ", ".join(sorted({t.teacher_ref or str(t.config.teacher.checkpoint)
                                                      for t in trials if t.config.teacher is not None}))
    else:
        teacher = "no distillation, no teacher"
    return f"{file}: ok: {spec.name}: {count}, {teacher}"


Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler]] = {
    "validate": (add_validate_arguments, validate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detrdistill", description="Knowledge-distillation experiments for DETR-family detectors.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, handler) in COMMANDS.items():
        doc = (handler.__doc__ or "").strip()
        sub = commands.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
