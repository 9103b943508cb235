import textwrap

import pytest

from shoal.config import ConfigError, RunConfig, load_config
from tests.conftest import ROOT, invoke_cli


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None)
    assert cfg.train.steps == 1000 and cfg.model.name == "cnn1d" and cfg.strategy.name == "sync"
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).model_dump(mode="json") == cfg.model_dump(mode="json")


def test_example_configs_validate():
    from shoal.bench.compress import load_bench as load_compress_bench
    from shoal.bench.fl import load_bench
    from shoal.fl.config import FlRunConfig, load_fl_config

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        if path.name.startswith("fl_"):  # federated configs
            assert isinstance(load_fl_config(path), FlRunConfig)
        elif path.name == "bench_fl.yaml":
            assert isinstance(load_bench(path, [])[0], FlRunConfig)
        elif path.name == "bench_privacy.yaml":  # the training workload, and the FL rows' config checked too
            from shoal.bench.privacy import load_bench as load_privacy_bench

            cfg, options = load_privacy_bench(path, [])
            assert isinstance(cfg, RunConfig) and cfg.privacy is None and options.fl_config
        elif path.name == "bench_compress.yaml":  # one training config per model, and the rows
            cfgs, _ = load_compress_bench(path, [])
            assert set(cfgs) == {"cnn1d", "cnn2d"} and all(isinstance(c, RunConfig) for c in cfgs.values())
        else:
            assert isinstance(load_config(path), RunConfig)


def test_overrides_apply_dotted_keys_with_yaml_values():
    cfg = load_config(None, ["train.steps=7", "optimizer.lr=0.5", "model=mlp:hidden=[8]", "data.batch_size=4"])
    assert cfg.train.steps == 7 and cfg.optimizer.lr == 0.5 and cfg.model.options.hidden == [8]
    assert cfg.data.batch_size == 4


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (["workers=0"], "workers", "greater than or equal to 1"),
        (["optimizer.lr=0"], "optimizer.lr", "greater than 0"),
        (["optimizer.lr=-1"], "optimizer.lr", "greater than 0"),
        (["optimizer.name=sgdx"], "optimizer.name", "allowed: 'sgd', 'adam' or 'adamw'"),
        (["train.stepz=3"], "train.stepz", "unknown key"),
        (["bogus=1"], "bogus", "unknown key"),
        (["train.steps=many"], "train.steps", "valid integer"),
        (["model=no_such_pkg.models:make_model"], "model", "cannot import 'no_such_pkg.models'"),
        (["model=shoal.models:no_such_fn"], "model", "has no attribute 'no_such_fn'"),
        (["model=cnn1d:channels=0"], "model", "channels"),
        (["data.dataset=imagenet"], "data.dataset", "unknown dataset 'imagenet'"),
        (["train.steps=5", "train.epochs=1"], "train", "not both"),
        (["train.target_accuracy=1.5"], "train.target_accuracy", "less than or equal to 1"),
    ],
)
def test_bad_values_name_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert message.startswith(f"{field}:") or f"; {field}:" in message, message
    assert words in message


@pytest.mark.processes
@pytest.mark.quick
def test_cli_bad_config_exits_2_with_one_message_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        workers: 0
        optimizer: {lr: 0.1}
    """))
    result = invoke_cli("train", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "workers:" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # rejected before any process started


@pytest.mark.processes
@pytest.mark.parametrize(
    "args, words",
    [
        (["no/such/file.yaml"], "does not exist"),
        (["CFG", "--set", "optimizer.lr=-3"], "optimizer.lr"),
        (["CFG", "--set", "noequals"], "expected key=value"),
        (["--resume", "no/such/run"], "no checkpoint.pt"),
        (["CFG", "--workers", "16", "--set", "backend=nccl"], "nccl needs one GPU per worker"),
        (["CFG", "--kill", "1:5:disk"], "expected RANK:STEP or RANK:STEP:server"),
    ],
)
def test_cli_errors_exit_2(tmp_path, args, words):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("train: {steps: 1}\n")
    result = invoke_cli("train", *[str(cfg) if a == "CFG" else a for a in args])
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


def test_cli_not_yaml_mapping(tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- 1\n- 2\n")
    result = invoke_cli("train", str(cfg))
    assert result.returncode == 2 and "top level must be a mapping" in result.stderr


def test_codec_with_a_strategy_that_takes_none():
    with pytest.raises(ConfigError, match="codec: strategy 'ddp' takes no codec"):
        load_config(None, ["strategy=ddp:hook=fp16", "codec=topk"])


def test_the_command_line_starts_without_torch():
    # Every shoal command (and --help, and each bad-config exit) pays for what
    # `import shoal.cli` imports: torch comes in only where a command needs it.
    import subprocess
    import sys

    code = "import sys, shoal, shoal.cli, shoal.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
