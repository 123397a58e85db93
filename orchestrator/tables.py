"""MLflow runs -> paper-style tables (Markdown, CSV, LaTeX), a plot of the table and the trials' learning curves.

The source is always MLflow: the children of an experiment's parent run, a trial's value being the last
logged value of each metric. Rows and columns come from the spec's `table` block (dotted keys, `variant`,
`seed`); each cell is the mean (± std when there is more than one) over the trials it holds, usually the
seeds. AP values are shown x100, as papers print them.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any, Optional

import yaml

from orchestrator.spec import Spec, TableSpec
from orchestrator.tracking import TAG, Tracker

FORMATS = {"md": "table.md", "csv": "table.csv", "latex": "table.tex"}
PLOT = "plot.png"
LIGHT_BACKBONES = ("resnet18", "resnet34", "mobilenet_v2")
PAPER_HEADER = "COCO paper ΔAP"

# COCO val2017 AP gains of DETRDistill over the same student without distillation, as docs/method.md ("The paper's
# results") gives them: by student family for ResNet-50 students (Deformable DETR from the official README,
# AdaMixer and Conditional DETR from summaries of the paper), for light backbones, and for each component
# alone (logits, feature, query prior). These are COCO numbers at paper scale, shown beside ours for shape,
# never to be matched by a small synthetic run.
PAPER_COCO_AP_GAIN = {
    "deformable_detr": "44.1 → 46.6 (+2.5)",
    "adamixer": "+2.4",
    "conditional_detr": "+2.2",
    "deformable_detr/light": "40.0 → 43.3 (+3.3)",
    "light": "+2.0 to +3.5",
    "logits": "+1.4", "feature": "+1.2", "query_prior": "+0.6",
}


def paper_number(params: dict[str, str]) -> Optional[str]:
    """The paper's AP gain for a trial like this one (its flattened config), or None."""
    if params.get("distill.method") != "detrdistill":
        return None
    on = [c for c in ("logits", "feature", "query_prior") if float(params.get(f"distill.{c}.weight", 1)) > 0]
    if len(on) == 1:
        return PAPER_COCO_AP_GAIN[on[0]]
    if len(on) < 3:
        return None
    family = params.get("model.family", "")
    if params.get("model.backbone") in LIGHT_BACKBONES:
        return PAPER_COCO_AP_GAIN.get(f"{family}/light", PAPER_COCO_AP_GAIN["light"])
    return PAPER_COCO_AP_GAIN.get(family)


# ------------------------------------------------------------------------------------------------ model

@dataclasses.dataclass
class Trial:
    """One child run as the table sees it."""
    name: str
    kind: str  # trial | teacher
    status: str
    cells: list[dict[str, Any]]
    metrics: dict[str, float]
    params: dict[str, str]
    run_id: str = ""


@dataclasses.dataclass
class Table:
    title: str
    subtitle: str
    row_keys: list[str]
    rows: list[tuple]  # the row keys' values, in the spec's order
    column_key: Optional[str]
    columns: list[Any]  # the column key's values ([None] without one)
    metrics: list[str]
    values: dict[tuple[int, int], dict[str, list[float]]]  # (row, column) -> metric -> one value per trial
    failed: dict[tuple[int, int], int]  # (row, column) -> trials that failed
    # (row, column) -> first metric minus its baseline cell's: the mean of the per-seed differences when the
    # two cells share seeds (paired), else the difference of the means
    delta: dict[tuple[int, int], float]
    paper: dict[int, str]  # row -> the paper's numbers for it
    notes: list[str]
    by_seed: dict[tuple[int, int], dict[Any, float]] = dataclasses.field(default_factory=dict)  # first metric
    paired: dict[tuple[int, int], list[tuple[Any, float]]] = dataclasses.field(default_factory=dict)  # (seed, diff)

    def mean_std(self, r: int, c: int, metric: str) -> tuple[Optional[float], Optional[float]]:
        vals = self.values.get((r, c), {}).get(metric, [])
        if not vals:
            return None, None
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        return mean, std

    def delta_columns(self) -> list[int]:
        return [c for c in range(len(self.columns)) if any((r, c) in self.delta for r in range(len(self.rows)))]


def _key(value: Any) -> str:
    """Values compared by their JSON text: a list (a layer mapping) is a value like any other."""
    return json.dumps(value, sort_keys=True)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def trials_of(tracker: Tracker, parent_id: str) -> list[Trial]:
    trials = []
    for run in tracker.child_runs(parent_id):
        tags = run.data.tags
        axes = {k.removeprefix("axis."): _parse(v) for k, v in tags.items() if k.startswith("axis.")}
        cells = json.loads(tags[f"{TAG}cells"]) if f"{TAG}cells" in tags else [axes] if axes else []
        trials.append(Trial(run.info.run_name, tags.get(f"{TAG}kind", "trial"), tags.get(f"{TAG}status", ""),
                            cells, dict(run.data.metrics), dict(run.data.params), run.info.run_id))
    return trials


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_table(spec: Spec, trials: list[Trial], title: Optional[str] = None) -> Table:
    """The spec's table over these trials. Without a table block: one row per ablated combination."""
    table_spec = spec.table or TableSpec(rows=[*(["variant"] if spec.variants else []), *spec.ablate])
    row_keys, column_key = list(table_spec.rows), table_spec.columns
    order = _value_order(spec)

    def coordinate(cell: dict, key: str) -> Any:
        if key in cell:
            return cell[key]
        return spec.variants.get(cell.get("variant"), {}).get(key)  # a key a variant sets

    found_rows: dict[str, tuple] = {}
    found_columns: dict[str, Any] = {}
    placed: list[tuple[Trial, tuple, Any]] = []
    for trial in trials:
        for cell in trial.cells:
            row = tuple(coordinate(cell, k) for k in row_keys)
            column = coordinate(cell, column_key) if column_key else None
            found_rows.setdefault(_key(row), row)
            found_columns.setdefault(_key(column), column)
            placed.append((trial, row, column))
    rows = _ordered(found_rows, [tuple(p) for p in itertools.product(*(order.get(k, []) for k in row_keys))])
    columns = _ordered(found_columns, order.get(column_key, []) if column_key else [None])
    row_index = {_key(r): i for i, r in enumerate(rows)}
    column_index = {_key(c): i for i, c in enumerate(columns)}

    values: dict[tuple[int, int], dict[str, list[float]]] = {}
    failed: dict[tuple[int, int], int] = {}
    by_seed: dict[tuple[int, int], dict[Any, float]] = {}
    paper: dict[int, dict[int, str]] = {}
    for trial, row, column in placed:
        at = (row_index[_key(row)], column_index[_key(column)])
        if trial.status == "failed":
            failed[at] = failed.get(at, 0) + 1
            continue
        if trial.status not in ("finished", "cached"):
            continue
        for metric in table_spec.metrics:
            if metric in trial.metrics:
                values.setdefault(at, {}).setdefault(metric, []).append(trial.metrics[metric])
        if table_spec.metrics[0] in trial.metrics:
            seed = next((cell["seed"] for cell in trial.cells if "seed" in cell), trial.name)
            by_seed.setdefault(at, {})[seed] = trial.metrics[table_spec.metrics[0]]
        number = paper_number(trial.params)
        if number:
            paper.setdefault(at[0], {})[at[1]] = number

    table = Table(
        title=title or f"{spec.name}" + (f": {spec.description}" if spec.description else ""),
        subtitle="", row_keys=row_keys, rows=rows, column_key=column_key, columns=columns,
        metrics=list(table_spec.metrics), values=values, failed=failed, delta={}, paper={}, notes=[],
        by_seed=by_seed)
    table.delta, table.paired = _deltas(table, table_spec.baseline or {})
    table.paper = {r: " · ".join(f"{_show(columns[c])} {n}" if column_key else n for c, n in sorted(by_col.items()))
                   for r, by_col in paper.items()}
    seeds = max((len(v) for cell in values.values() for v in cell.values()), default=0)
    table.subtitle = (f"COCO-style {', '.join(table.metrics)} x100 on the validation set"
                      + (f"; mean ± std over {seeds} trials (seeds) per cell" if seeds > 1 else ""))
    for trial in trials:
        if trial.kind == "teacher" and not trial.cells:
            ap = trial.metrics.get("AP")
            shown = f"AP {100 * ap:.1f}" if ap is not None and trial.status in ("finished", "cached") else trial.status
            table.notes.append(f"{trial.name.capitalize()} ({trial.params.get('model.family', '?')} "
                               f"{trial.params.get('model.backbone', '?')}): {shown}")
    if any(failed.values()):
        table.notes.append("failed: the trial failed (its reason is in the detrdistill.failure tag of its run)")
    return table


def _value_order(spec: Spec) -> dict[str, list]:
    """Each key's values in the order the spec lists them."""
    order: dict[str, list] = {k: list(v) for k, v in spec.ablate.items()}
    for settings in spec.variants.values():
        for key, value in settings.items():
            if value not in order.setdefault(key, []):
                order[key].append(value)
    order["variant"] = list(spec.variants)
    order["seed"] = list(spec.seeds)
    return order


def _ordered(found: dict[str, Any], preferred: list) -> list:
    ordered = [v for v in preferred if _key(v) in found]
    return ordered + [v for k, v in found.items() if k not in {_key(o) for o in ordered}]


def _deltas(table: Table, baseline: dict[str, Any]) -> tuple[dict, dict]:
    """First metric of each cell minus that of its baseline cell (the cell with the baseline's values
    substituted, e.g. the same row's distill.method=none): (cell -> the mean of the per-seed differences over
    the seeds both cells have, else the difference of their means; cell -> [(seed, difference)])."""
    if not baseline:
        return {}, {}
    metric = table.metrics[0]
    row_index = {_key(r): i for i, r in enumerate(table.rows)}
    column_index = {_key(c): i for i, c in enumerate(table.columns)}
    deltas, paired = {}, {}
    for r, row in enumerate(table.rows):
        for c, column in enumerate(table.columns):
            base_row = tuple(baseline.get(k, v) if k in baseline else v for k, v in zip(table.row_keys, row))
            base_column = baseline.get(table.column_key, column) if table.column_key else column
            at = (row_index.get(_key(base_row)), column_index.get(_key(base_column)))
            if None in at or at == (r, c):
                continue
            mine, base = table.by_seed.get((r, c), {}), table.by_seed.get(at, {})
            shared = sorted((seed for seed in mine if seed in base), key=lambda v: (isinstance(v, str), v))
            if shared:
                paired[(r, c)] = [(seed, mine[seed] - base[seed]) for seed in shared]
                deltas[(r, c)] = sum(d for _, d in paired[(r, c)]) / len(shared)
            elif table.mean_std(r, c, metric)[0] is not None and table.mean_std(*at, metric)[0] is not None:
                deltas[(r, c)] = table.mean_std(r, c, metric)[0] - table.mean_std(*at, metric)[0]
    return deltas, paired


def paired_std(diffs: list[tuple[Any, float]]) -> Optional[float]:
    """The sample standard deviation (ddof 1) of per-seed differences; None for fewer than two."""
    if len(diffs) < 2:
        return None
    mean = sum(d for _, d in diffs) / len(diffs)
    return math.sqrt(sum((d - mean) ** 2 for _, d in diffs) / (len(diffs) - 1))


# ------------------------------------------------------------------------------------------- rendering

def _grid(table: Table, numeric: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows of text cells; `numeric` (CSV) splits mean and std into columns."""
    prefix = (lambda c: f"{_show(table.columns[c])} ") if table.column_key else (lambda c: "")
    delta_name = f"Δ{table.metrics[0]}"
    header = list(table.row_keys) or ["trials"]
    for c in range(len(table.columns)):
        for metric in table.metrics:
            header += [f"{prefix(c)}{metric}"] + ([f"{prefix(c)}{metric} std"] if numeric else [])
    delta_columns = table.delta_columns()
    header += [f"{prefix(c)}{delta_name}" for c in delta_columns]
    seed_columns = [c for c in delta_columns if any(len(table.paired.get((r, c), [])) > 1
                                                    for r in range(len(table.rows)))]
    header += [f"{prefix(c)}{delta_name} per seed" for c in seed_columns]
    with_paper = bool(table.paper)
    header += [PAPER_HEADER] if with_paper else []

    lines = []
    for r, row in enumerate(table.rows):
        line = [_show(v) for v in row] or ["all"]
        for c in range(len(table.columns)):
            for metric in table.metrics:
                mean, std = table.mean_std(r, c, metric)
                if mean is None:
                    text = "failed" if table.failed.get((r, c)) else "–" if not numeric else ""
                    line += [text] + ([""] if numeric else [])
                elif numeric:
                    line += [f"{100 * mean:.3f}", f"{100 * std:.3f}" if std is not None else ""]
                else:
                    line.append(f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else ""))
        for c in delta_columns:
            d, std = table.delta.get((r, c)), paired_std(table.paired.get((r, c), []))
            if d is None:
                line.append("")
            elif numeric:
                line.append(f"{100 * d:.3f}")
            else:  # + 0.0 turns a -0.0 from rounding into 0.0
                line.append(f"{round(100 * d, 1) + 0.0:+.1f}" + (f" ± {100 * std:.1f}" if std is not None else ""))
        for c in seed_columns:
            line.append(" / ".join(f"{_show(seed)}: {100 * d:+.1f}" for seed, d in table.paired.get((r, c), [])))
        if with_paper:
            line.append(table.paper.get(r, ""))
        lines.append(line)
    return header, lines


def render(table: Table, fmt: str) -> str:
    if fmt == "md":
        return render_markdown(table)
    if fmt == "csv":
        return render_csv(table)
    if fmt == "latex":
        return render_latex(table)
    raise ValueError(f"unknown table format {fmt!r}; expected one of {', '.join(FORMATS)}")


def render_markdown(table: Table) -> str:
    header, lines = _grid(table, numeric=False)
    out = [f"### {table.title}", "", table.subtitle, "",
           "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    out += [""] + [f"{note}  " for note in table.notes] if table.notes else []
    return "\n".join(out).rstrip() + "\n"


def render_csv(table: Table) -> str:
    header, lines = _grid(table, numeric=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    return buffer.getvalue()


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
          "→": r"$\rightarrow$", "–": "--", "·": r"$\cdot$"}


def _latex(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def render_latex(table: Table) -> str:
    header, lines = _grid(table, numeric=False)
    keys = max(len(table.row_keys), 1)
    out = [r"\begin{table}[t]", r"\centering", f"\\caption{{{_latex(table.title)}. {_latex(table.subtitle)}.}}",
           r"\begin{tabular}{" + "l" * keys + "r" * (len(header) - keys) + "}", r"\toprule",
           " & ".join(_latex(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(_latex(cell) for cell in line) + r" \\" for line in lines]
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def _numeric(values: list) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _series(table: Table, metric: str) -> tuple[list[tuple], list[tuple[str, list]]]:
    """(x values: the first row key's, in table order; [(label, [(x index, mean, std)])] one series per column
    value and value of the other row keys)."""
    xs, rests = [], []
    for row in table.rows:
        xs += [row[:1]] if row[:1] not in xs else []
        rests += [row[1:]] if row[1:] not in rests else []
    series = []
    for c, column in enumerate(table.columns):
        for rest in rests:
            points = [(xs.index(row[:1]), *table.mean_std(r, c, metric)) for r, row in enumerate(table.rows)
                      if row[1:] == rest]
            points = [(x, m, math.nan if s is None else s) for x, m, s in points if m is not None]  # one seed: no bar
            label = " ".join([f"{table.column_key}={_show(column)}"] * bool(table.column_key)
                             + [f"{k}={_show(v)}" for k, v in zip(table.row_keys[1:], rest)]) or metric
            if points:
                series.append((label, points))
    return xs, series


def plot(table: Table, path: Path) -> Path:
    """The table's figure (table_figure) as a PNG."""
    fig = table_figure(table)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def table_figure(table: Table):
    """The first metric (mean over seeds, the sample std as error bars) against the first row key: lines when
    its values are numbers (a depth, a weight), grouped bars when they are categories (methods, mappings)."""
    plt = _pyplot()
    metric = table.metrics[0]
    xs, series = _series(table, metric)
    numeric = _numeric([x[0] for x in xs if x])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    width = 0.8 / max(len(series), 1)
    for i, (label, points) in enumerate(series):
        at = [xs[x][0] if numeric else x + (i - (len(series) - 1) / 2) * width for x, _, _ in points]
        means, stds = [100 * m for _, m, _ in points], [100 * s for _, _, s in points]
        if numeric:
            ax.errorbar(at, means, yerr=stds, marker="o", capsize=3, label=label)
        else:
            ax.bar(at, means, width, yerr=stds, capsize=3, label=label)
    if not numeric:
        ax.set_xticks(range(len(xs)), [" ".join(_show(v) for v in x) or "all" for x in xs])
    ax.set_xlabel(table.row_keys[0] if table.row_keys else "")
    ax.set_ylabel(f"{metric} (x100)")
    ax.set_title(table.title.split(": ")[0], fontsize=10)  # the experiment's name; the description is long
    ax.grid(alpha=0.3, axis="y" if not numeric else "both")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


CURVES = "curves.png"
CURVE_METRICS = ("AP", "train/loss")


def histories(tracker: Tracker, trials: list[Trial]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per trial (teachers too) the per-epoch values of CURVE_METRICS: {name: {metric: [(epoch, value)]}}."""
    out = {}
    for trial in trials:
        if trial.run_id:
            out[trial.name] = {k: sorted((m.step, m.value) for m in tracker.client.get_metric_history(trial.run_id, k))
                               for k in CURVE_METRICS}
    return out


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], title: str, path: Path) -> Path:
    """Learning curves: AP and the training loss against the epoch, one line per trial."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(11, 4.0), dpi=100)
    for ax, metric in zip(axes, CURVE_METRICS):
        scale = 100 if metric == "AP" else 1
        for name, per_metric in curves.items():
            points = per_metric.get(metric, [])
            if points:
                ax.plot([e for e, _ in points], [scale * v for _, v in points], marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (x100)" if scale == 100 else metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=7)
    fig.suptitle(f"{title}: learning curves", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(table: Table, out_dir: Path, curves: Optional[dict] = None) -> list[Path]:
    """results/<experiment>/table.{md,csv,tex}, plot.png and, given the trials' histories, curves.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt, name in FORMATS.items():
        (out_dir / name).write_text(render(table, fmt), encoding="utf-8")
        paths.append(out_dir / name)
    paths.append(plot(table, out_dir / PLOT))
    if curves:
        paths.append(plot_curves(curves, table.title.split(": ")[0], out_dir / CURVES))
    return paths


# ---------------------------------------------------------------------------------------------- sources

def table_for_parent(tracker: Tracker, parent_id: str, spec: Spec) -> Table:
    return build_table(spec, trials_of(tracker, parent_id))


def write_parent_outputs(tracker: Tracker, parent_id: str, spec: Spec, out_dir: Path) -> tuple[Table, list[Path]]:
    """The table of a parent run's trials, written with its plot and the trials' learning curves under
    `out_dir`, and each file logged as an artifact of the parent run."""
    trials = trials_of(tracker, parent_id)
    table = build_table(spec, trials)
    paths = write_outputs(table, out_dir, histories(tracker, trials))
    for path in paths:
        tracker.log_artifact(parent_id, path)
    return table, paths


def stored_spec(tracker: Tracker, parent_id: str) -> Spec:
    """The spec a parent run stored. Structure only: its files (data, checkpoints) need not exist here."""
    return Spec.model_validate(yaml.safe_load(tracker.spec_text(parent_id)))


def table_for_experiment(experiment: str, tracking_uri: Optional[str] = None) -> Table:
    """The table of an experiment's latest parent run, from MLflow alone."""
    tracker = Tracker(experiment, tracking_uri, create=False)
    parent = tracker.latest_parent()
    if parent is None:
        raise LookupError(f"experiment {experiment!r} in {tracker.tracking_uri} has no detrdistill run yet")
    return table_for_parent(tracker, parent.info.run_id, stored_spec(tracker, parent.info.run_id))
