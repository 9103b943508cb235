"""``shoal list``, ``-h`` on every command, and the tables the commands print."""

import inspect
import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from shoal.cli import app
from shoal.registry import ALL, TOPOLOGIES, load_builtins


def _cells(output: str) -> dict[str, dict[str, tuple[str, str]]]:
    """A ``shoal list`` page read back: title -> name -> (options, what it is), each cell's wrapped lines
    joined with no whitespace at all (a folded word is split without one)."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    title, name = None, None
    for line in output.splitlines():
        if not line.startswith(("│", "┃", "┏", "┡", "└")) and line.strip():
            title = line.strip()
            tables[title] = {}
        elif line.startswith("│"):
            first, options, what = (cell.strip() for cell in line.split("│")[1:4])
            if first:
                name = first
                tables[title][name] = ("", "")
            previous = tables[title][name]
            tables[title][name] = (previous[0] + options.replace(" ", ""), previous[1] + what.replace(" ", ""))
    return tables


@pytest.mark.parametrize("columns", [80, 120])
def test_list_shows_every_registry_whole_at_80_and_120_columns(columns):
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": str(columns)})

    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= columns
    assert "PydanticUndefined" not in result.stdout and "…" not in result.stdout
    tables = _cells(result.stdout)
    train = "train options (train.KEY in a config, or --set train.KEY=...)"
    assert list(tables) == [registry.plural for registry in ALL] + [train]  # federated strategies, partitions too
    for key in ("precision", "accumulate", "clip_grad_norm", "keep_best", "early_stopping", "target"):
        assert key in tables[train], key
    assert tables[train]["precision"][1].startswith("fp32|bf16|fp16:")
    assert TOPOLOGIES.plural not in tables
    for registry in ALL:
        for name, summary in registry:
            options, what = tables[registry.plural][name]
            assert what == "".join(summary.split()), (registry.plural, name)  # no description cut off
    assert "path=<required>" in tables["models"]["artefact"][0]
    assert "hidden=[256,256]" in tables["models"]["mlp"][0]  # a default_factory's value, not "..."


def test_every_registered_component_describes_itself_in_one_whole_sentence():
    load_builtins()
    for registry in ALL:
        for name, summary in registry:
            own = inspect.cleandoc(registry.target(name).__doc__ or "")
            # Its own docstring (not one inherited from a base class), whose first line is a sentence.
            assert own and summary == own.split("\n", 1)[0], (registry.plural, name)
            assert summary.endswith("."), (registry.plural, name, summary)


@pytest.mark.parametrize("command", [
    [], ["train"], ["list"], ["plan"], ["compress"], ["bench"], ["bench", "codecs"], ["netem"], ["netem", "up"],
    ["fl"], ["fl", "simulate"], ["fl", "token"], ["fl", "token", "add"], ["fl", "privacy"], ["fl", "privacy", "plan"],
    ["fl", "keys"],
    ["bench", "privacy"], ["bench", "secure"], ["sched"], ["sched", "simulate"],
])
def test_h_is_help_on_every_app_and_command(command):
    short = CliRunner().invoke(app, [*command, "-h"], env={"COLUMNS": "100"})
    long = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "100"})

    assert short.exit_code == 0, short.output
    assert short.stdout == long.stdout and "Usage:" in short.stdout


def _render(renderable, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_codec_table_gives_the_identity_codec_no_throughput_and_shows_the_memory_copy_baseline():
    from shoal.bench.codecs import report_table

    report = {
        "numel": 25_000_000, "repeats": 5, "threads": 2, "copy_s": 0.0081, "copy_gb_per_s": 12.345,
        "rows": [
            {"codec": "none", "median_s": 6.4e-5, "gb_per_s": None, "passthrough": True, "wire_bytes": 1e8,
             "compression": 1.0},
            {"codec": "qsgd:levels=7", "median_s": 0.6661, "gb_per_s": 0.1501, "passthrough": False,
             "wire_bytes": 1.25e7, "compression": 8.0},
            {"codec": "randk:ratio=0.001", "median_s": 0.0287, "gb_per_s": 3.484, "passthrough": False,
             "wire_bytes": 1e5, "compression": 1000.0},
        ],
        "sampled_topk_speedup": None,
    }

    text = _render(report_table(report))

    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:6]]
            for line in text.splitlines() if line.startswith("│")}
    assert rows["(memory copy)"] == ["8.1 ms", "12.3", "-", "-"]
    assert rows["none"] == ["64 us", "-", "100.0 MB", "1x"]
    assert rows["qsgd:levels=7"][:2] == ["666.1 ms", "0.150"] and rows["randk:ratio=0.001"][1] == "3.48"
    assert "none: hands the tensor back untouched" in " ".join(text.split())
    assert "sampled top-k" not in text  # only when both top-k rows ran


def test_summary_tables_show_the_runs_figures():
    from shoal.fl.report import summary_table as fl_table
    from shoal.metrics.report import summary_table

    run = {"out": "runs/x", "final_accuracy": 0.97, "best_accuracy": 0.975, "target_accuracy": 0.9,
           "time_to_target_s": None, "steps_to_target": None, "steps": 400, "workers": 2, "strategy": "sync",
           "codec": "auto", "codec_chosen": "topk", "model": "mlp", "parameters": 12345, "train_time_s": 8.04,
           "wall_time_s": 9.0, "samples_per_s": 4321.0, "wire_bytes_per_worker": 1.5e6,
           "dense_bytes_per_worker": 2.5e7, "resumed_from_step": 200}
    federated = {"out": "runs/f", "final_accuracy": 0.9, "best_accuracy": 0.91, "target_accuracy": None,
                 "rounds_to_target": 7, "time_to_target_s": 3.31, "rounds": 10, "clients": 8, "clients_per_round": 4,
                 "strategy": "fedavg", "partition": "iid", "codec": "none", "model": "mlp", "parameters": 100,
                 "uplink_bytes": 2e6, "downlink_bytes": 4e6, "wall_time_s": 5.0, "peak_memory_bytes": 3e8,
                 "mean_participants": 2.5}

    text, fl_text = _render(summary_table(run)), _render(fl_table(federated))

    for words in ("shoal run: runs/x", "not reached", "sync / auto -> topk", "mlp (12,345)", "1.5 MB",
                  "25.0 MB", "4,321 samples/s", "resumed from step"):
        assert words in text
    for words in ("shoal federated run: runs/f", "7 (3.3 s)", "2.5 of 4 asked", "fedavg / iid / none", "2.0 MB / 4.0 MB",
                  "300.0 MB"):
        assert words in fl_text
    older = _render(fl_table({k: v for k, v in federated.items() if k != "mean_participants"}))
    assert "4 asked" in older  # a summary.json from before the count still renders
