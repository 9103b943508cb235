"""report.html's labels and number formats, the Pareto plots' label placement, plain tick labels."""

import itertools
import json

import pytest

from shoal.bench import comm, compress, fl, straggler
from shoal.bench.labels import label_points
from shoal.bench.report import FIELDS, MISSING, format_value, plt, write_html
from shoal.metrics import plots
from shoal.metrics.ticks import plain_number, plain_ticks, significant


@pytest.mark.parametrize("name, value, shown", [
    ("artefact_bytes", 42381, "42.4"),
    ("artefact_bytes", 1_234_567, "1,235"),
    ("latency_ms_batch1", 0.035412, "0.0354"),
    ("time_to_target_s", 123.456, "123"),
    ("speedup_vs_sync", 2.2812, "2.28x"),
    ("size_ratio", 13.21, "13.2x"),
    ("nonzero_parameters", 1234567, "1,234,567"),
    ("final_accuracy", 0.97234, "97.23"),
    ("accuracy_delta", -0.0041, "-0.41"),
    ("accuracy_vs_fedavg", 0.0, "+0.00"),
    ("uplink_bytes", 482000, "0.482"),
    ("rounds_to_target", 5, "5"),
    ("time_to_target_s", None, MISSING),
    ("speedup_vs_sync", float("nan"), MISSING),
    ("codec", "topk:ratio=0.05", "topk:ratio=0.05"),
    ("strategy", None, MISSING),
])
def test_a_value_is_shown_with_its_fields_precision_separators_and_unit(name, value, shown):
    assert format_value(name, value) == shown


def test_significant_digits_keep_the_whole_integer_part():
    assert [significant(v) for v in (0.0, 0.1234, 9.999, 1234.56)] == ["0", "0.123", "10.0", "1,235"]


@pytest.mark.parametrize("columns", [comm.COLUMNS, straggler.COLUMNS, fl.COLUMNS, compress.COLUMNS],
                         ids=["comm", "straggler", "fl", "compress"])
def test_every_benchs_column_has_a_label_in_words(columns):
    labels = [FIELDS[c].label for c in columns]  # a KeyError names a column nobody labelled
    assert all("_" not in label for label in labels)
    assert len(set(labels)) == len(labels)


def test_the_page_shows_labels_formatted_values_bounds_and_failures_and_bench_json_keeps_raw_names(tmp_path):
    rows = [
        {"label": "fedavg-iid", "partition": "iid", "rounds_to_target": 5, "rounds_vs_fedavg": None,
         "uplink_bytes": 482000, "failed": False},
        {"label": "fedsgd", "partition": "iid", "rounds_to_target": None, "rounds_vs_fedavg": 6.0,
         "rounds_vs_fedavg_bound": "lower", "uplink_bytes": 1446000, "failed": False},
        {"label": "fedprox-a0.1", "failed": True, "error": "ValueError: mu must be > 0"},
    ]
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    columns = ["label", "partition", "rounds_to_target", "rounds_vs_fedavg", "uplink_bytes"]

    page = write_html(rows, tmp_path, [], "shoal bench fl", "shoal bench fl --quick", columns).read_text()

    assert '<th class=num title="bench.json: uplink_bytes">uplink, all rounds (MB)</th>' in page
    assert "<td class=num>0.482</td>" in page and f"<td class=num>{MISSING}</td>" in page
    assert "<td class=num>&gt;&nbsp;6.00x</td>" in page
    assert "<td class=failed colspan=4>failed: ValueError: mu must be &gt; 0</td>" in page
    assert "rounds vs FedAvg: its rounds to target over FedAvg&#x27;s, lower is better" in page  # the legend
    assert "percentage points" not in page  # no column in points: the legend leaves them out
    assert json.loads((tmp_path / "bench.json").read_text()) == rows


def test_labels_of_crowded_points_overlap_neither_each_other_nor_the_axes_edge():
    fig, ax = plt.subplots(figsize=(6, 4))
    xy = [(12.3, 0.9516), (12.5, 0.9527), (12.4, 0.952), (42.4, 0.9533), (3.2, 0.8977), (15.2, 0.9411)]
    labels = ["int8-dynamic", "int8-static", "prune-50+int8-static", "fp32", "channels-50+int8-static", "prune-80"]
    ax.scatter(*zip(*xy))
    ax.set_xscale("log")
    fig.tight_layout()

    notes = label_points(ax, xy, labels)

    renderer = fig.canvas.get_renderer()
    boxes = [n.get_window_extent(renderer) for n in notes]
    frame = ax.get_window_extent(renderer)
    assert [n.get_text() for n in notes] == labels and [n.xy for n in notes] == xy
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in boxes)
    plt.close(fig)


def test_plain_numbers_have_no_exponent_and_no_float_noise():
    assert [plain_number(x) for x in (0.30000000000000004, 2.0, 0.00002, 20000.0, 2.3)] == \
        ["0.3", "2", "0.00002", "20,000", "2.3"]


@pytest.mark.parametrize("scale, limits", [("log", (0.065, 2.0)), ("log", (2.1, 2.4)), ("linear", (2.15, 2.42)),
                                           ("symlog", (0, 0.7))])
def test_tick_labels_are_plain_decimals_on_every_scale(scale, limits):
    fig, ax = plt.subplots()
    ax.plot(limits, limits)
    ax.set(xscale=scale, yscale=scale, xlim=limits, ylim=limits)
    plain_ticks(ax)
    fig.canvas.draw()

    shown = [t.get_text() for t in [*ax.get_xticklabels(), *ax.get_xticklabels(minor=True)] if t.get_text()]

    assert len(shown) >= 2
    assert all(float(s.replace(",", "")) >= 0 and not set(s) & set("$^e×") for s in shown)
    assert ax.xaxis.get_offset_text().get_text() == ""
    plt.close(fig)


def test_a_federated_runs_curves_are_drawn_against_rounds_with_integer_ticks(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": r, "round": r, "time_s": 2.1 + r / 37, "loss": 2 / r,
                                           **({"test_accuracy": 0.9} if r % 5 == 0 else {})}) + "\n"
                               for r in range(1, 11)))
    drawn = []
    monkeypatch.setattr(plots.plt, "close", drawn.append)  # keep the figure to look at

    plots.plot_curves(metrics, tmp_path / "curves.png")

    (fig,) = drawn
    for ax in fig.axes:
        assert ax.get_xlabel() == "round"
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert all(t.get_text().isdigit() for t in ax.get_xticklabels() if t.get_text())
    assert fig.axes[0].get_lines()[0].get_xdata().tolist() == list(range(1, 11))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    monkeypatch.undo()
    plt.close(fig)


def test_plain_ticks_leave_a_categorical_axis_its_names():
    fig, ax = plt.subplots()
    ax.barh(["ddp-fp32", "shoal-topk-ef"], [740.0, 30.0])
    ax.set_xscale("symlog", linthresh=30.0)
    plain_ticks(ax)
    fig.canvas.draw()

    assert [t.get_text() for t in ax.get_yticklabels()] == ["ddp-fp32", "shoal-topk-ef"]
    assert {"10", "100"} <= {t.get_text() for t in ax.get_xticklabels()}
    plt.close(fig)
