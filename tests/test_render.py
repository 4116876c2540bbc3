"""Tables, CSV and plots (deepzip.render): what a user reads must match the numbers given."""

import csv
import json

from deepzip.cli import main
from deepzip.render import (
    label_axes,
    markdown_table,
    plot_pareto,
    plot_sensitivity,
    pyplot,
    save_figure,
    text_table,
    write_csv,
)

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [{"name": "conv1", "shape": [16, 3, 3, 3], "sparsity": 0.25, "bytes": 293},
        {"name": "linear", "shape": [10, 64], "sparsity": 0.5, "bytes": 1024}]


def test_markdown_table_cells():
    lines = markdown_table(ROWS, ["name", "shape", "sparsity", "missing"]).splitlines()
    assert lines[0] == "| name | shape | sparsity | missing |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| conv1 | 16x3x3x3 | 0.2500 |  |"
    assert len(lines) == 2 + len(ROWS)


def test_text_table_aligns_numbers_right():
    lines = text_table(ROWS, ["name", "bytes"]).splitlines()
    assert len({len(line) for line in lines}) == 1  # every line equally wide
    assert lines[2].endswith(" 293") and lines[3].endswith("1024")
    assert lines[2].startswith("conv1 ")


def test_write_csv_round_trips(tmp_path):
    path = tmp_path / "rows.csv"
    write_csv(path, ROWS)
    with open(path) as f:
        back = list(csv.DictReader(f))
    assert [r["name"] for r in back] == ["conv1", "linear"]
    assert float(back[1]["sparsity"]) == 0.5
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_label_axes_and_save_figure(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="line")
    label_axes(ax, "x", "y", "title", loc="lower left")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("x", "y", "title")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["line"]
    save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG
    assert not plt.get_fignums()  # closed


def test_plot_sensitivity_writes_png(tmp_path):
    rows = [{"layer": "(none)", "level": 0.0, "accuracy": 0.9}]
    rows += [{"layer": layer, "level": lv, "accuracy": 0.9 - lv / 10}
             for layer in ("conv1", "linear") for lv in (0.25, 0.5)]
    plot_sensitivity(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG


def _report(tmp_path, name, acc, ratio):
    d = tmp_path / name
    d.mkdir()
    summary = {"recipe": name, "baseline_acc": 0.92, "decoded_acc": acc, "sparsity": 0.9,
               "formula_ratio": ratio * 1.5, "real_ratio": ratio, "file_bytes": int(1e6 / ratio)}
    (d / "report.json").write_text(json.dumps({"summary": summary}))
    return d


def test_pareto_command_plots_and_tabulates(tmp_path, capsys):
    runs = [_report(tmp_path, "seed", 0.916, 12.3), _report(tmp_path, "default", 0.912, 31.0)]
    out = tmp_path / "pareto.png"
    assert main(["pareto", *map(str, runs), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    table = capsys.readouterr().out
    assert "| seed | seed | 0.9200 | 0.9160 |" in table and "| default | default |" in table
    plot_pareto([], tmp_path / "empty.png")  # no runs: an empty plot, not a crash
    assert main(["pareto", str(tmp_path), "-o", str(out)]) == 2
    assert "no report.json" in capsys.readouterr().err


def test_pareto_refuses_runs_scored_on_different_data(tmp_path, capsys):
    a = _report(tmp_path, "full", 0.91, 30.0)
    b = _report(tmp_path, "quick", 0.80, 30.0)
    for d, n in ((a, 10000), (b, 512)):
        report = json.loads((d / "report.json").read_text())
        report["summary"]["same_predictions"] = f"{n}/{n}"  # how older reports say it
        (d / "report.json").write_text(json.dumps(report))
    assert main(["pareto", str(a), str(b), "-o", str(tmp_path / "p.png")]) == 2
    assert "evaluated differently" in capsys.readouterr().err
