"""Tables from MLflow runs: cells, mean ± std over seeds, deltas, the paper's numbers, the three formats, the plot.

The runs are real MLflow runs in SQLite, logged the way the scheduler logs them (tracking.Tracker); no
training is needed to check how a table is read from them.
"""
import csv
import io
import json

import pytest

from orchestrator import tables
from orchestrator.plan import spec_text
from orchestrator.spec import parse_spec
from orchestrator.tracking import TAG, Tracker

SPEC = """name: depth
description: student depth
student: {model: {backbone: resnet18}}
teacher: {model: {backbone: resnet50}}
distill: {method: detrdistill}
ablate:
  student.model.decoder_layers: [6, 2]
  distill.method: [none, detrdistill]
seeds: [0, 1]
table: {rows: [student.model.decoder_layers], columns: distill.method, metrics: [AP, AP50],
        baseline: {distill.method: none}}
"""

# (decoder layers, method) -> per seed (AP, AP50); the 2-layer detrdistill seed 1 failed
RESULTS = {(6, "none"): [(0.30, 0.50), (0.32, 0.52)], (6, "detrdistill"): [(0.34, 0.55), (0.36, 0.57)],
           (2, "none"): [(0.20, 0.40), (0.22, 0.42)], (2, "detrdistill"): [(0.25, 0.45), None]}


@pytest.fixture
def experiment(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(SPEC)
    tracker = Tracker("depth", tracking_uri)
    parent = tracker.parent_run("h1", spec_text(spec))
    teacher, _ = tracker.trial_run(parent, "t0", "teacher", "teacher",
                                   {"model": {"family": "conditional_detr", "backbone": "resnet50"}}, {})
    tracker.log_epoch(teacher, {"epoch": 1, "AP": 0.40})
    tracker.set_status(teacher, "cached")
    for (layers, method), seeds in RESULTS.items():
        for seed, values in enumerate(seeds):
            cell = {"student.model.decoder_layers": layers, "distill.method": method, "seed": seed}
            params = {"model": {"family": "conditional_detr", "backbone": "resnet18"},
                      "distill": {"method": method, "logits": {"weight": 1.0}}}
            run, _ = tracker.trial_run(parent, f"{layers}{method}{seed}", f"{layers} {method} {seed}", "trial",
                                       params, cell, tags={f"{TAG}cells": json.dumps([cell])})
            if values is None:
                tracker.set_status(run, "failed", reason="NonFiniteLossError: loss became nan")
                continue
            tracker.log_epoch(run, {"epoch": 1, "AP": 0.01, "AP50": 0.02})  # the last value counts, not this
            tracker.log_epoch(run, {"epoch": 2, "AP": values[0], "AP50": values[1]})
            tracker.set_status(run, "finished")
    return spec, tracker, parent


def test_markdown_table(experiment):
    spec, tracker, parent = experiment
    table = tables.table_for_parent(tracker, parent, spec)
    assert tables.render(table, "md") == (
        "### depth: student depth\n\n"
        "COCO-style AP, AP50 x100 on the validation set; mean ± std over 2 trials (seeds) per cell\n\n"
        "| student.model.decoder_layers | none AP | none AP50 | detrdistill AP | detrdistill AP50 "
        "| detrdistill ΔAP | detrdistill ΔAP per seed | COCO paper ΔAP |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| 6 | 31.0 ± 1.4 | 51.0 ± 1.4 | 35.0 ± 1.4 | 56.0 ± 1.4 | +4.0 ± 0.0 | 0: +4.0 / 1: +4.0 "
        "| detrdistill +2.0 to +3.5 |\n"
        # the distilled 2-layer student of seed 1 failed: the pair of seed 0 alone, 25 - 20
        "| 2 | 21.0 ± 1.4 | 41.0 ± 1.4 | 25.0 | 45.0 | +5.0 | 0: +5.0 | detrdistill +2.0 to +3.5 |\n\n"
        "Teacher (conditional_detr resnet50): AP 40.0  \n"
        "failed: the trial failed (its reason is in the detrdistill.failure tag of its run)\n")


def test_csv_and_latex(experiment):
    spec, tracker, parent = experiment
    table = tables.table_for_parent(tracker, parent, spec)
    rows = list(csv.reader(io.StringIO(tables.render(table, "csv"))))
    assert rows[0][:5] == ["student.model.decoder_layers", "none AP", "none AP std", "none AP50", "none AP50 std"]
    assert rows[1][:3] == ["6", "31.000", "1.414"]
    assert rows[2][5:7] == ["25.000", ""]  # one seed left: no std
    latex = tables.render(table, "latex")
    assert r"\begin{tabular}{lrrrrrrr}" in latex and r"\toprule" in latex
    assert r"student.model.decoder\_layers & none AP" in latex
    assert r"31.0 $\pm$ 1.4" in latex and r"detrdistill $\Delta$AP" in latex


def test_outputs_and_the_latest_parent(experiment, tmp_path):
    spec, tracker, parent = experiment
    paths = tables.write_outputs(tables.table_for_parent(tracker, parent, spec), tmp_path / "results" / "depth")
    assert [p.name for p in paths] == ["table.md", "table.csv", "table.tex", "plot.png"]
    assert paths[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `detrdistill table` reads the experiment's latest parent run, with the spec it stored
    assert tables.render(tables.table_for_experiment("depth", tracker.tracking_uri), "md") == paths[0].read_text()
    other = tracker.parent_run("h2", spec_text(parse_spec(SPEC.replace("seeds: [0, 1]", "seeds: [5]"))))
    assert tracker.latest_parent().info.run_id == other
    tracker.reopen_parent(parent)  # a resume makes an older parent the latest again
    assert tracker.latest_parent().info.run_id == parent
    with pytest.raises(LookupError, match="no experiment 'nope'"):
        tables.table_for_experiment("nope", tracker.tracking_uri)


def test_cells_a_trial_stands_for_and_component_numbers(tracking_uri, tmp_path, monkeypatch):
    """A trial that ignores an ablated setting fills every cell it stands for; the paper's numbers follow
    the components that are on."""
    monkeypatch.chdir(tmp_path)
    spec = parse_spec("name: comp\nstudent: {}\nteacher: {}\ndistill: {method: detrdistill}\n"
                      "variants: {no_kd: {distill.method: none}, kd: {}}\n"
                      "ablate: {distill.feature.weight: [0.0, 1.0]}\n"
                      "table: {rows: [distill.feature.weight], columns: variant, metrics: [AP],"
                      " baseline: {variant: no_kd}}\n")
    tracker = Tracker("comp", tracking_uri)
    parent = tracker.parent_run("h", spec_text(spec))
    cells = [{"variant": "no_kd", "distill.feature.weight": w, "seed": 0} for w in (0.0, 1.0)]
    run, _ = tracker.trial_run(parent, "plain", "plain", "trial", {"distill": {"method": "none"}}, cells[0],
                               tags={f"{TAG}cells": json.dumps(cells)})
    tracker.log_epoch(run, {"epoch": 1, "AP": 0.2})
    tracker.set_status(run, "finished")
    for weight, ap in ((0.0, 0.21), (1.0, 0.25)):
        cell = {"variant": "kd", "distill.feature.weight": weight, "seed": 0}
        params = {"model": {"family": "deformable_detr", "backbone": "resnet50"},
                  "distill": {"method": "detrdistill", "logits": {"weight": 0.0}, "feature": {"weight": weight},
                              "query_prior": {"weight": 0.0}}}
        run, _ = tracker.trial_run(parent, f"kd{weight}", "kd", "trial", params, cell,
                                   tags={f"{TAG}cells": json.dumps([cell])})
        tracker.log_epoch(run, {"epoch": 1, "AP": ap})
        tracker.set_status(run, "finished")
    _, lines = tables._grid(tables.table_for_parent(tracker, parent, spec), numeric=False)
    assert lines == [["0.0", "20.0", "21.0", "+1.0", ""], ["1.0", "20.0", "25.0", "+5.0", "kd +1.2"]]


def test_numbers_are_lines_and_categories_bars(experiment):
    """Decoder depth (a number) against AP: one line per method, the seeds' sample std as error bars. With the
    method as the row key (a category): bars, one per method, each as high as the mean."""
    spec, tracker, parent = experiment
    fig = tables.table_figure(tables.table_for_parent(tracker, parent, spec))
    ax = fig.axes[0]
    series = {c.get_label(): c for c in ax.containers}  # ErrorbarContainer per line, BarContainer per bar group
    assert not ax.patches and set(series) == {"distill.method=none", "distill.method=detrdistill"}
    none = series["distill.method=none"].lines[0]  # the data line; [1], [2]: the error bars' caps and bars
    assert list(none.get_xdata()) == [6, 2] and list(none.get_ydata()) == pytest.approx([31.0, 21.0])

    by_method = parse_spec(SPEC.replace("rows: [student.model.decoder_layers], columns: distill.method",
                                        "rows: [distill.method]"))
    fig = tables.table_figure(tables.table_for_parent(tracker, parent, by_method))
    bars = fig.axes[0].patches
    kinds = {type(c).__name__: c for c in fig.axes[0].containers}
    assert len(bars) == 2 and set(kinds) == {"BarContainer", "ErrorbarContainer"}
    assert kinds["ErrorbarContainer"].lines[0] is None  # error bars on the bars, no line joining them
    # none: seeds of both depths (0.30, 0.32, 0.20, 0.22); detrdistill: 0.34, 0.36, 0.25
    assert [b.get_height() for b in bars] == pytest.approx([26.0, 31.666666])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["none", "detrdistill"]


def test_learning_curves_of_every_trial(experiment, tmp_path):
    spec, tracker, parent = experiment
    trials = tables.trials_of(tracker, parent)
    curves = tables.histories(tracker, trials)
    assert curves["6 none 0"]["AP"] == [(1, 0.01), (2, 0.30)] and curves["teacher"]["AP"] == [(1, 0.40)]
    table, paths = tables.write_parent_outputs(tracker, parent, spec, tmp_path / "out")
    assert [p.name for p in paths] == ["table.md", "table.csv", "table.tex", "plot.png", "curves.png"]
    assert paths[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in tracker.client.list_artifacts(parent)}
    assert {"plot.png", "curves.png", "table.md"} <= logged


def test_paired_std_is_the_sample_std_of_the_differences():
    """ddof 1, by hand: differences 0.02, 0.05, 0.08 have mean 0.05 and std sqrt((0.03^2 + 0 + 0.03^2) / 2)."""
    assert tables.paired_std([(0, 0.02), (1, 0.05), (2, 0.08)]) == pytest.approx(0.03)
    assert tables.paired_std([(0, 0.02)]) is None
