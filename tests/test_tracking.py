"""Experiment tracking: TensorBoard event files beside metrics.jsonl, and ``shoal runs compare``."""

import io
import json

import pytest
from matplotlib.image import imread
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

import shoal
from shoal.cli import app
from shoal.config import load_config
from shoal.fl.config import load_fl_config
from shoal.fl.simulate import simulate
from shoal.metrics.compare import MISSING, RunError, compare_table, load_runs, pick_metric, plot_runs
from shoal.metrics.writer import MetricsWriter, read_metrics, tensorboard_scalars, tensorboard_tag
from tests.conftest import invoke_cli, small_config


def _board(out):
    """OUT/tensorboard read back: tag -> [(step, value)]."""
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real 2-worker training runs and a federated simulation, each seconds long."""
    root = tmp_path_factory.mktemp("tracking")
    shoal.train(small_config(root / "sync", train__steps=40, train__eval_every=10, train__target_accuracy=0.5))
    shoal.train(small_config(root / "topk", codec="topk:ratio=0.1", train__steps=30, train__eval_every=10))
    simulate(load_fl_config({
        "data": {"dataset": "digits", "batch_size": 16}, "model": "mlp:hidden=[32]",
        "fl": {"clients": 6, "clients_per_round": 3, "rounds": 4, "eval_every": 2}, "out": str(root / "fed"),
    }), progress=False)
    return root


@pytest.mark.processes
def test_a_training_run_writes_event_files_holding_its_metrics(runs):
    out = runs / "sync"
    records = read_metrics(out / "metrics.jsonl")

    board = _board(out)

    evals = [r for r in records if "test_accuracy" in r]
    assert [step for step, _ in board["test/accuracy"]] == [r["step"] for r in evals] == [10, 20, 30, 40]
    assert [v for _, v in board["test/accuracy"]] == pytest.approx([r["test_accuracy"] for r in evals], rel=1e-6)
    assert [v for _, v in board["test/loss"]] == pytest.approx([r["test_loss"] for r in evals], rel=1e-6)
    assert [step for step, _ in board["train/loss"]] == [r["step"] for r in records] == list(range(1, 41))
    assert [v for _, v in board["train/loss"]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert sum(v for _, v in board["comm/wire_bytes"]) == sum(r["wire_bytes"] for r in records) > 0
    assert {"train/lr", "time/compute_s", "comm/comm_s"} <= set(board)


@pytest.mark.processes
def test_a_federated_run_logs_against_its_rounds(runs):
    board = _board(runs / "fed")
    assert [step for step, _ in board["test/accuracy"]] == [2, 4]
    assert [step for step, _ in board["clients/participating"]] == [1, 2, 3, 4]
    assert "comm/uplink_bytes_total" in board and "train/loss" in board


def test_a_resumed_log_appends_without_showing_the_lost_steps_twice(tmp_path):
    first = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        first.write({"step": step, "loss": 1.0})
    first.close()  # the run stopped after step 5; its last checkpoint is at step 3

    resumed = MetricsWriter(tmp_path / "metrics.jsonl", resume_step=3)
    for step in (4, 5, 6):
        resumed.write({"step": step, "loss": 2.0})
    resumed.close()

    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert _board(tmp_path)["train/loss"] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]


def test_a_fresh_run_in_an_old_out_starts_a_new_log(tmp_path):
    for loss in (1.0, 2.0):
        writer = MetricsWriter(tmp_path / "metrics.jsonl")
        writer.write({"step": 1, "loss": loss})
        writer.close()
    assert _board(tmp_path)["train/loss"] == [(1, 2.0)]


def test_tensorboard_off_writes_only_metrics_jsonl(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists()
    assert load_config(None).train.tensorboard and not load_config(None, ["train.tensorboard=false"]).train.tensorboard


@pytest.mark.processes
def test_a_run_with_tensorboard_off_writes_no_event_files(tmp_path):
    shoal.train(small_config(tmp_path / "run", train__steps=10, train__tensorboard=False))
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_tags_group_the_records_keys_and_skip_what_is_no_scalar():
    record = {"step": 3, "round": 3, "loss": 0.5, "test_perplexity": 12.0, "wire_bytes": 40, "time_s": 1.5,
              "aggregated": True, "dropped_clients": [1, 2], "name": "x"}
    assert dict(tensorboard_scalars(record)) == {"train/loss": 0.5, "test/perplexity": 12.0, "comm/wire_bytes": 40.0,
                                                 "time/time_s": 1.5, "clients/aggregated": 1.0}
    assert tensorboard_tag("staleness") == "train/staleness"


def _render(renderable, width=80):
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def _cells(text):
    """A compare table read back: row name -> its cells, each cell's wrapped lines joined."""
    rows, name = {}, None
    for line in text.splitlines():
        if line.startswith("│"):
            first, *cells = (cell.strip() for cell in line.split("│")[1:-1])
            if first:
                name = first
                rows[name] = [""] * len(cells)
            rows[name] = [(held + " " + cell).strip() for held, cell in zip(rows[name], cells)]
    return rows


@pytest.mark.processes
def test_compare_table_sets_the_runs_figures_side_by_side_at_80_columns(runs):
    loaded = load_runs([runs / "sync", runs / "topk", runs / "fed"])
    sync, topk, fed = (json.loads((runs / name / "summary.json").read_text()) for name in ("sync", "topk", "fed"))

    text = _render(compare_table(loaded, pick_metric(loaded)))

    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    rows = _cells(text)
    assert rows["kind"] == ["train", "train", "federated"]
    assert rows["codec"] == [sync["codec"], "topk", fed["codec"]]
    assert rows["workers"] == ["2", "2", MISSING] and rows["clients"] == [MISSING, MISSING, "3 of 6 a round"]
    assert rows["steps"] == ["40", "30", MISSING] and rows["rounds"] == [MISSING, MISSING, "4"]
    assert rows["final accuracy"] == [f"{s['final_accuracy']:.4f}" for s in (sync, topk, fed)]
    assert rows["best accuracy"] == [f"{s['best_accuracy']:.4f}" for s in (sync, topk, fed)]
    assert rows["time to target"][0] == f"{sync['time_to_target_s']:,.1f} s (step {sync['steps_to_target']})"
    assert rows["time to target"][1:] == [MISSING, MISSING]  # no target set
    assert rows["samples/s"][:2] == [f"{s['samples_per_s']:,.0f}" for s in (sync, topk)]
    assert rows["wire bytes / worker"][2] == MISSING and rows["uplink bytes"][:2] == [MISSING, MISSING]
    assert rows["wire bytes / worker"][0] != rows["wire bytes / worker"][1]  # top-k sends less


@pytest.mark.processes
def test_compare_plot_is_written(runs, tmp_path):
    loaded = load_runs([runs / "sync", runs / "fed"])
    plot_runs(loaded, "accuracy", tmp_path / "deep" / "cmp.png")
    image = imread(tmp_path / "deep" / "cmp.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 800
    assert list((tmp_path / "deep").iterdir()) == [tmp_path / "deep" / "cmp.png"]  # no temporary file left


def _task_run(tmp_path, source, name, metric):
    """A copy of a real run's outputs as a run measuring ``metric`` would write them."""
    out = tmp_path / name
    out.mkdir()
    summary = json.loads((source / "summary.json").read_text())
    summary.update(metric=metric, final_metric=summary.pop("final_accuracy") * 100,
                   best_metric=summary.pop("best_accuracy") * 100)
    (out / "summary.json").write_text(json.dumps(summary))
    records = [{("test_" + metric if k == "test_accuracy" else k): v for k, v in r.items()}
               for r in read_metrics(source / "metrics.jsonl")]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


@pytest.mark.processes
def test_compare_takes_the_metric_the_summaries_name_or_the_one_asked_for(runs, tmp_path):
    a = _task_run(tmp_path, runs / "sync", "a", "perplexity")
    b = _task_run(tmp_path, runs / "topk", "b", "perplexity")
    both = load_runs([a, b])

    assert pick_metric(both) == "perplexity" and pick_metric(both, "test_perplexity") == "perplexity"
    rows = _cells(_render(compare_table(both, "perplexity")))
    assert rows["final perplexity"][0] == f"{json.loads((a / 'summary.json').read_text())['final_metric']:.4f}"
    with pytest.raises(RunError, match="measured different metrics .accuracy, perplexity.: pick one"):
        pick_metric(load_runs([a, runs / "sync"]))
    assert pick_metric(load_runs([a, runs / "sync"]), "accuracy") == "accuracy"
    with pytest.raises(RunError, match="--metric mse: no run recorded it .they recorded: loss, perplexity."):
        pick_metric(both, "mse")


def test_runs_sharing_a_directory_name_are_told_apart_by_their_paths(tmp_path):
    for where in ("a/run", "b/run", "c/other"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "summary.json").write_text('{"steps": 1}')
        (tmp_path / where / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')

    loaded = load_runs([tmp_path / "a/run", tmp_path / "b/run", tmp_path / "c/other"])

    assert [run.label for run in loaded] == ["a/run", "b/run", "other"]


@pytest.mark.processes
def test_runs_compare_command_prints_the_table_and_writes_the_plot(runs, tmp_path):
    result = CliRunner().invoke(app, ["runs", "compare", str(runs / "sync"), str(runs / "fed"),
                                      "--out", str(tmp_path / "c.png")], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "final accuracy" in result.stdout and "federated" in result.stdout
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.processes
def test_runs_compare_exits_2_naming_a_directory_that_is_no_run(runs, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "summary.json").write_text("{}")

    missing = invoke_cli("runs", "compare", str(runs / "sync"), str(tmp_path / "nowhere"), cwd=tmp_path)
    half = invoke_cli("runs", "compare", str(tmp_path / "half"), cwd=tmp_path)
    none = invoke_cli("runs", "compare", cwd=tmp_path)

    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"runs compare: {tmp_path / 'nowhere'}: no summary.json there (not the OUT of a finished shoal train or "
        "shoal fl run)"]
    assert half.returncode == 2 and len(half.stderr.strip().splitlines()) == 1 and "no metrics.jsonl" in half.stderr
    assert none.returncode == 2 and "Missing argument" in none.stderr
    assert not (tmp_path / "runs-compare.png").exists()


@pytest.mark.parametrize("command", [["runs"], ["runs", "compare"]])
def test_h_is_help(command):
    result = CliRunner().invoke(app, [*command, "-h"])
    assert result.exit_code == 0 and "Usage:" in result.stdout


def test_comparing_runs_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, shoal.cli.runs, shoal.metrics.compare; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
