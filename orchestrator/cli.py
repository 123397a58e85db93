"""The `detrdistill` command line.

Each subcommand is one entry of COMMANDS: a function that adds its arguments to an argparse parser and a
handler that takes the parsed arguments and returns the exit status (0 ok, 2 bad input). The handler's
docstring is its help. Imports stay light here: validating a spec must not start Ray, MLflow or torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

from orchestrator.plan import resolve_weights, weights_warnings
from orchestrator.spec import PlannedTrial, Spec, SpecError, expand_trials, load_spec, parse_spec
from trainers.pretrained import WeightsUnavailable

EXIT_OK, EXIT_INVALID, EXIT_INTERRUPTED = 0, 2, 130


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec setting before validation; KEY is dotted, VALUE is YAML "
             "(e.g. --set student.schedule.epochs=2 --set 'ablate.distill.method=[none, detrdistill]'); "
             "repeatable, applied in order, and wins over variants")


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="spec YAML file(s)")
    add_set_argument(parser)
    parser.add_argument("--plan", action="store_true",
                        help="also list every trial (teachers first) with its model, epochs, hash and what the "
                             "trial store holds of it: finished, started (resumed) or to train")
    parser.add_argument("--store", default="runs", metavar="DIR",
                        help="the trial store --plan looks in (default ./runs)")


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
        trials = expand_trials(spec)
        print(summary(file, spec, trials))
        for line in weights_warnings(spec):
            print(f"{file}: {line}", file=sys.stderr)
        if args.plan:
            print("\n".join(plan_lines(spec, trials, args.store)))
    return EXIT_INVALID if invalid else EXIT_OK


def plan_lines(spec: Spec, trials: Sequence[PlannedTrial], store: str) -> list[str]:
    """One line per trial in the order a run starts them (each teacher before its students; a trial that
    several cells share, once): label, model, epochs, hash, and what the store holds of it."""
    from orchestrator.plan import store_status

    def model(config) -> str:
        m = config.model  # AdaMixer has no encoder: its depth is its decoder stages
        depth = (f"{m.decoder_layers} stages" if m.family == "adamixer"
                 else f"{m.encoder_layers}+{m.decoder_layers} layers")
        return f"{m.family} {m.backbone} {depth}, {config.schedule.epochs} epochs"

    rows, seen = [], set()
    for trial in trials:
        if trial.teacher is not None and trial.teacher.hash not in seen:
            seen.add(trial.teacher.hash)
            rows.append(("teacher", model(trial.teacher.config), trial.teacher.hash,
                         store_status(store, trial.teacher.hash)))
    for trial in trials:
        if spec.search is not None:
            rows.append((trial.label, model(trial.config), "-", f"a search of {spec.search.num_samples} trials"))
        elif trial.hash not in seen:
            seen.add(trial.hash)
            rows.append((trial.label, model(trial.config), trial.hash, store_status(store, trial.hash)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3] for row in rows]


def summary(file: str, spec: Spec, trials: Sequence[PlannedTrial]) -> str:
    """One line: the spec's name, how many trials, and where its teacher comes from."""
    distinct = len({t.hash for t in trials})
    count = f"{len(trials)} trial{'s' * (len(trials) != 1)}"
    if distinct != len(trials):
        count += f" ({distinct} distinct)"
    if spec.search is not None:  # one search per cell: its trials are what the sampler makes of the cell
        cells, search = len({json.dumps(t.coords, sort_keys=True, default=str) for t in trials}), spec.search
        searches = f"{cells} searches of {search.num_samples}" if cells > 1 else "a search"
        count = (f"{cells * search.num_samples} trials ({searches} over {', '.join(search.space)}, "
                 f"{search.direction}imising {search.metric}{', ASHA' if search.scheduler else ''})")
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


def add_place_arguments(parser: argparse.ArgumentParser) -> None:
    """Where runs happen and are kept: shared by run and resume."""
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"), metavar="ADDRESS",
                        help="a Ray cluster to run on (its head, e.g. head:6379; or auto); default: RAY_ADDRESS, "
                             "else a local Ray started in this process with every CPU (and GPU) of this machine")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking URI; default: the spec's tracking.tracking_uri, else "
                             "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory")
    parser.add_argument("--store", default=None, metavar="DIR",
                        help="trial store: one folder per trial hash with its checkpoint, log and result, "
                             "shared by all experiments (finished trials are never trained again); default ./runs")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="spec YAML file")
    add_set_argument(parser)
    add_place_arguments(parser)


def _print_spec_error(e: SpecError, command: str) -> None:
    for problem in e.problems:
        print(problem.format(e.file), file=sys.stderr)
    count = len(e.problems)
    print(f"{e.file}: {count} problem{'s' * (count != 1)}; nothing was run. Fix {'them' if count != 1 else 'it'} "
          f"(or override with --set KEY=VALUE) and run `detrdistill {command}` again", file=sys.stderr)


def _run_options(args: argparse.Namespace, store: Optional[str] = None):
    from pathlib import Path

    from orchestrator.scheduler import RunOptions
    return RunOptions(store=Path(args.store or store or "runs"), tracking_uri=args.tracking_uri,
                      ray_address=args.ray_address)


def _execute(spec, options, parent_run_id: Optional[str] = None) -> int:
    """Run (or resume) an ablation, or a search when the spec has a search block."""
    if spec.search is not None:
        from orchestrator.search import run_search as run_experiment
    else:
        from orchestrator.scheduler import run_experiment
    try:
        resolve_weights(spec)
    except WeightsUnavailable as e:
        print(f"detrdistill: {e}; nothing was run", file=sys.stderr)
        return EXIT_INVALID
    try:
        outcome = run_experiment(spec, options, parent_run_id)
    except KeyboardInterrupt:  # during start-up or the final table; the trial loop handles its own
        print("\ndetrdistill: interrupted; checkpoints are kept: run the same command (or resume) again",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.message:
        print(f"detrdistill: {outcome.message}", file=sys.stderr)
    return outcome.exit_code


def run(args: argparse.Namespace) -> int:
    """Run every trial of a spec on Ray, track them in MLflow, print and save the table.

    Teachers train first (once per distinct teacher; a finished one is reused by any experiment); trials
    already finished in the store are not run again. A spec with a search block runs a hyperparameter search
    instead (Ray Tune + Optuna, one per ablate cell) and writes the best configuration as a spec. Exit status
    0 when every trial finished (a search: when each found a best trial), 1 when some failed (named at the
    end), 2 for an invalid spec (nothing is run or written), 130 when interrupted (resume it with
    `detrdistill resume EXPERIMENT`)."""
    try:
        spec = load_spec(args.spec, args.overrides)
    except SpecError as e:
        _print_spec_error(e, f"run {args.spec}")
        return EXIT_INVALID
    return _execute(spec, _run_options(args))


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", metavar="EXPERIMENT", help="MLflow experiment name (the spec's name)")
    add_place_arguments(parser)


def resume(args: argparse.Namespace) -> int:
    """Finish an interrupted experiment: its latest run again, from the spec stored in MLflow.

    Finished trials are not run again, interrupted ones continue from their last checkpoint, all in the
    same MLflow parent run. A search continues with its searcher's state (Tuner.restore) and ends with
    exactly num_samples trials. Exit status as for run."""
    from orchestrator.scheduler import quiet_logging
    from orchestrator.tracking import TAG, Tracker
    quiet_logging()
    try:
        tracker = Tracker(args.experiment, _tracking_uri(args), create=False)
    except LookupError as e:
        print(f"detrdistill: {e}", file=sys.stderr)
        return EXIT_INVALID
    parent = tracker.latest_parent()
    if parent is None:
        print(f"detrdistill: experiment {args.experiment!r} has no run to resume; start one with "
              f"`detrdistill run SPEC`", file=sys.stderr)
        return EXIT_INVALID
    where = f"runs:/{parent.info.run_id}/spec.yaml"
    try:
        spec = parse_spec(tracker.spec_text(parent.info.run_id), file=where)
    except SpecError as e:
        _print_spec_error(e, f"resume {args.experiment}")
        return EXIT_INVALID
    options = _run_options(args, store=parent.data.tags.get(f"{TAG}store"))
    options.tracking_uri = tracker.tracking_uri
    print(f"Resuming {args.experiment} (MLflow run {parent.info.run_id}) from {where}", flush=True)
    return _execute(spec, options, parent_run_id=parent.info.run_id)


def _tracking_uri(args: argparse.Namespace) -> str:
    """The tracking URI to read an experiment from; LookupError for a SQLite file that does not exist
    (opening it would create an empty database)."""
    from pathlib import Path

    from orchestrator.cluster import tracking_uri_problem
    from orchestrator.scheduler import absolute_tracking_uri, default_tracking_uri
    uri = absolute_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise LookupError(f"no MLflow database at {uri.removeprefix('sqlite:///')}; run from the directory where "
                          f"`detrdistill run` ran, or give --tracking-uri")
    problem = tracking_uri_problem(uri)
    if problem:
        raise LookupError(problem)
    return uri


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", metavar="EXPERIMENT", help="MLflow experiment name (the spec's name)")
    parser.add_argument("--format", choices=["md", "csv", "latex"], default="md", help="default: md")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
                             "working directory")


def table(args: argparse.Namespace) -> int:
    """Print an experiment's table again, from its latest run in MLflow (Markdown, CSV or LaTeX)."""
    from orchestrator import tables
    from orchestrator.scheduler import quiet_logging
    quiet_logging()
    try:
        result = tables.table_for_experiment(args.experiment, _tracking_uri(args))
    except LookupError as e:
        print(f"detrdistill: {e}", file=sys.stderr)
        return EXIT_INVALID
    sys.stdout.write(tables.render(result, args.format))
    return EXIT_OK


def add_make_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["synthetic"], help="the dataset to make")
    parser.add_argument("out", metavar="OUT", help="folder to write (images and annotations/instances_*.json)")
    parser.add_argument("--train", type=int, default=2000, metavar="N", help="training images (default 2000)")
    parser.add_argument("--val", type=int, default=300, metavar="M", help="validation images (default 300)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="default 0")
    parser.add_argument("--image-size", type=int, default=256, metavar="P",
                        help="longer image side in pixels (default 256)")
    parser.add_argument("--max-objects", type=int, default=8, metavar="K",
                        help="1 to K objects per image (default 8; fewer is easier)")
    parser.add_argument("--min-size", type=float, default=0.08, metavar="F",
                        help="smallest object's longer side / shorter image side (default 0.08; larger is easier)")
    parser.add_argument("--classes", type=int, default=10, metavar="C",
                        help="the first C of the ten shape classes (default 10; fewer is easier)")


def make_dataset(args: argparse.Namespace) -> int:
    """Write the synthetic detection dataset in COCO format (deterministic by seed).

    A spec reads it with data: {format: coco, root: OUT}, or generates its own with format: synthetic."""
    from pydantic import ValidationError

    from trainers.config import DataConfig
    from trainers.data.synthetic import make_synthetic, print_progress
    flags = {"synthetic_train": "train", "synthetic_val": "val", "synthetic_image_size": "image_size",
             "synthetic_max_objects": "max_objects", "synthetic_min_size": "min_size", "synthetic_classes": "classes"}
    try:  # the bounds a spec's data.synthetic_* fields have, checked by the same model
        DataConfig(format="synthetic", **{field: getattr(args, flag) for field, flag in flags.items()})
    except ValidationError as e:
        for err in e.errors(include_url=False):
            flag = "--" + flags[err["loc"][0]].replace("_", "-")
            print(f"detrdistill make-dataset: {flag}: {err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']}",
                  file=sys.stderr)
        return EXIT_INVALID
    out = make_synthetic(args.out, args.train, args.val, args.seed, args.image_size, args.max_objects,
                         args.min_size, progress=print_progress, classes=args.classes)
    print(f"{out}: {args.train} train / {args.val} val synthetic images at {args.image_size} px (seed {args.seed}); "
          f"annotations in {out}/annotations/")
    return EXIT_OK


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a trial's checkpoint.pt (runs/<hash>/) or a "
                        "transformers save_pretrained directory")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the drawn images (<stem>.png)")
    parser.add_argument("--threshold", type=float, default=0.3, metavar="T",
                        help="draw detections scoring at least T (default 0.3)")


def predict(args: argparse.Namespace) -> int:
    """Draw a trained model's detections (boxes, class names, scores) on images."""
    from trainers.predict import predict as draw_predictions
    missing = [image for image in [args.checkpoint, *args.images] if not os.path.exists(image)]
    if missing:
        print(f"detrdistill predict: not found: {', '.join(missing)}", file=sys.stderr)
        return EXIT_INVALID
    for path in draw_predictions(args.checkpoint, args.images, args.out, args.threshold):
        print(path)
    return EXIT_OK


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a trial's checkpoint.pt or a transformers directory")
    parser.add_argument("spec", metavar="SPEC", help="the spec whose data block names the validation split")
    add_set_argument(parser)


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a spec's validation split: COCO box AP, AP50, AP75, APs, APm, APl (x100)."""
    from trainers.predict import evaluate_checkpoint
    if not os.path.exists(args.checkpoint):
        print(f"detrdistill eval: not found: {args.checkpoint}", file=sys.stderr)
        return EXIT_INVALID
    try:
        spec = load_spec(args.spec, args.overrides)
    except SpecError as e:
        _print_spec_error(e, f"eval {args.checkpoint} {args.spec}")
        return EXIT_INVALID
    try:
        metrics = evaluate_checkpoint(args.checkpoint, spec.data)
    except ValueError as e:
        print(f"detrdistill eval: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(" ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items()))
    return EXIT_OK


Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler]] = {
    "validate": (add_validate_arguments, validate),
    "run": (add_run_arguments, run),
    "resume": (add_resume_arguments, resume),
    "table": (add_table_arguments, table),
    "make-dataset": (add_make_dataset_arguments, make_dataset),
    "predict": (add_predict_arguments, predict),
    "eval": (add_eval_arguments, evaluate),
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
    if getattr(args, "ray_address", None):  # run, resume: before any handler imports Ray
        from orchestrator.cluster import use_ray_token_auth
        use_ray_token_auth(args.ray_address)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
