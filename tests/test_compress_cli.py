"""``shoal compress`` as a user runs it."""

import json

import pytest
from typer.testing import CliRunner

import shoal
from shoal.cli import app
from shoal.engine.checkpoint import save_checkpoint
from tests.conftest import invoke_cli, small_config
from tests.test_compress import digits_run, make_model


@pytest.mark.processes
def test_cli_prunes_channels_quantizes_and_prints_the_table(tmp_path):
    run = digits_run(tmp_path / "run")

    # In-process (the bad-input tests below run the real command): a fresh
    # interpreter would pay torch's and the ONNX exporter's imports again.
    result = CliRunner().invoke(app, [  # no CONFIG: the run's own config.yaml
        "compress", "--checkpoint", str(run), "--prune", "channels:ratio=0.5",
        "--quantize", "int8-static", "--repeats", "3", "--out", str(tmp_path / "out")])

    assert result.exit_code == 0, result.output
    for text in ("uncompressed", "compressed", "int8-static", "latency b=32", "channels:ratio=0.5,importance=l2",
                 "median of 3 runs", "report.json"):
        assert text in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    base, comp, quant = report["rows"]
    assert comp["parameters"] < 0.5 * base["parameters"]  # channels really gone, not masked
    assert comp["nonzero_parameters"] == comp["parameters"]
    assert comp["onnx_bytes"] < 0.5 * base["onnx_bytes"]
    assert report["artefact_max_abs_diff"] == 0.0  # fp32 values: the artefact restores the pruned model exactly
    assert comp["max_abs_diff"] < 1e-4 and quant["accuracy"] > 0.5
    restored = shoal.compress.load_artefact(tmp_path / "out" / "model.shoal")
    assert sum(p.numel() for p in restored.parameters()) == comp["parameters"]


@pytest.mark.processes
def test_cli_refuses_a_checkpoint_of_another_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "checkpoint.pt", {"model": make_model("mlp:hidden=[32]").state_dict()})
    (run / "config.yaml").write_text("data: {dataset: digits}\nmodel: mlp:hidden=[32]\n")
    config = tmp_path / "c.yaml"
    config.write_text("data: {dataset: digits}\nmodel: mlp:hidden=[16]\n")

    result = invoke_cli("compress", str(config), "--checkpoint", str(run), "--out", str(tmp_path / "out"))

    assert result.returncode == 2
    assert "compress error:" in result.stderr and "does not match the config's model" in result.stderr
    assert f"the run trained with {run / 'config.yaml'}: leave CONFIG out" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_gradual_pruning_needs_fine_tuning(tmp_path):
    with pytest.raises(shoal.compress.CompressError, match="give --finetune STEPS"):
        shoal.compress({"data": {"dataset": "digits"}, "model": "mlp:hidden=[16]"}, checkpoint=tmp_path,
                       prune="magnitude:sparsity=0.5,schedule=gradual")


@pytest.mark.processes
def test_cli_refuses_a_bad_spec(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: {dataset: digits}\nmodel: mlp:hidden=[16]\n")

    result = invoke_cli("compress", str(config), "--checkpoint", str(tmp_path), "--prune", "magnitude:sparsity=1.5")

    assert result.returncode == 2
    assert "pruner 'magnitude': sparsity: Input should be less than 1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_compress_a_run_of_shoal_train_and_fine_tune_it_with_fixed_masks(tmp_path):
    cfg = small_config(tmp_path / "run", model="cnn2d:channels=8,hidden=32", train__steps=60)
    shoal.train(cfg)

    report = shoal.compress(tmp_path / "run" / "config.yaml", checkpoint=tmp_path / "run",
                            prune=["magnitude:sparsity=0.8"], quantize="int8-static", out=tmp_path / "out",
                            repeats=3, finetune_steps=20)

    # Fine-tuned through shoal train on the run's 2 workers, the pruned weights held at zero
    # and only the kept ones' gradients sent.
    tuned = report.finetune
    assert tuned["steps"] == 20 and tuned["workers"] == 2 and tuned["schedule"] == "oneshot"
    assert tuned["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert tuned["wire_bytes_per_worker"] < 0.4 * tuned["dense_bytes_per_worker"]
    finetuned = json.loads((tmp_path / "out" / "finetune" / "summary.json").read_text())
    assert finetuned["steps"] == 20 and finetuned["model"] == "artefact"

    assert report.rows[0].accuracy == pytest.approx(report.rows[0].torch_accuracy)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert report.rows[0].torch_accuracy == pytest.approx(summary["final_accuracy"])
    assert report.rows[1].nonzero_parameters < 0.3 * report.rows[1].parameters
