"""Model files from elsewhere: a checkpoint or an artefact that would run code is refused, naming the file."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml

from shoal.compress import CompressError, load_artefact, read_artefact, save_artefact
from shoal.data.base import DatasetBundle
from shoal.models import artefact_file, build_model
from shoal.models.artefact import ArtefactModelOptions, artefact
from shoal.registry import MODELS, load_builtins
from shoal.engine.checkpoint import MAGIC, CorruptCheckpoint, load_checkpoint, load_weights, save_checkpoint
from tests.conftest import run_cli, small_config


class _Touch:
    """Unpickled by a plain pickle loader, it creates ``marker``: code a file chose, run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint with a valid header (the checksum is anyone's to compute) and a payload that runs code."""
    buffer = io.BytesIO()
    torch.save({"model": {"0.weight": torch.zeros(2, 2)}, "run": _Touch(marker)}, buffer)
    payload = buffer.getvalue()
    path.mkdir(parents=True, exist_ok=True)
    file = path / "checkpoint.pt"
    file.write_bytes(MAGIC + b" " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    return file


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "ran"
    file = _crafted_checkpoint(tmp_path / "run", marker)

    for load in (lambda: load_checkpoint(file), lambda: load_weights(torch.nn.Linear(2, 2), tmp_path / "run")):
        with pytest.raises(CorruptCheckpoint, match="would build posix.system") as refused:
            load()
        assert str(file) in str(refused.value) and "could run code" in str(refused.value)
    assert not marker.exists()


def test_what_shoal_writes_loads_as_tensors_and_plain_values(tmp_path):
    state = {"model": {"w": torch.ones(3)}, "run": {"step": 7, "rng": torch.get_rng_state(), "best": None,
                                                     "history": [(1, 0.5), (2, 0.25)], "name": "x"}}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["run"]["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])


@pytest.mark.processes
def test_resuming_from_a_crafted_checkpoint_fails_with_the_reason_and_runs_nothing(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "ran"
    cfg = small_config(run, workers=1, train__steps=4)
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    _crafted_checkpoint(run, marker)

    result = run_cli("train", "--resume", str(run))

    assert result.returncode == 1 and "would build posix.system" in result.stderr, result.stderr
    assert not marker.exists()


MLP = "mlp:hidden=[16]"


def _mlp() -> torch.nn.Module:
    load_builtins(MODELS)
    torch.manual_seed(0)
    return build_model(MODELS.resolve(MLP), DatasetBundle(None, None, (1, 8, 8), 10)).eval()


def _artefact_with_header(path: Path, change) -> Path:
    """A real artefact of a small MLP whose header JSON ``change`` rewrites (as a crafted file would)."""
    save_artefact(path, _mlp(), model_spec=MLP, input_shape=(1, 8, 8), num_classes=10)
    raw = path.read_bytes()
    codec, _, packed = raw[len(artefact_file.MAGIC):].partition(b"\n")
    body = lzma.decompress(packed)
    (size,) = struct.unpack("<I", body[:4])
    header = change(json.loads(body[4:4 + size]))
    encoded = json.dumps(header).encode()
    path.write_bytes(artefact_file.MAGIC + codec + b"\n" + lzma.compress(
        struct.pack("<I", len(encoded)) + encoded + body[4 + size:]))
    return path


def test_an_artefact_naming_an_entry_point_is_refused_unless_the_caller_names_the_model(tmp_path):
    path = _artefact_with_header(tmp_path / "m.shoal", lambda h: {**h, "model": "subprocess:getoutput"})

    with pytest.raises(CompressError, match="'subprocess:getoutput' is not one of shoal's") as refused:
        load_artefact(path)
    assert str(path) in str(refused.value)
    with pytest.raises(CompressError, match="not one of shoal's"):  # the same through `model: artefact:path=`
        artefact(ArtefactModelOptions(path=str(path)), (1, 8, 8), 10)

    # The caller's own config names the architecture: built from it, the file's choice ignored.
    built = artefact(ArtefactModelOptions(path=str(path), model=MLP), (1, 8, 8), 10).eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(built(x), _mlp()(x))


@pytest.mark.parametrize("change, words", [
    (lambda h: {**h, "tensors": [{**h["tensors"][0], "shape": [1 << 20, 1 << 20]}] + h["tensors"][1:]},
     "elements, at most"),
    (lambda h: {**h, "tensors": [{**h["tensors"][0], "dtype": "object"}] + h["tensors"][1:]}, "dtype"),
    (lambda h: {**h, "num_classes": -3}, "num_classes"),
    (lambda h: {**h, "extra": 1}, "extra"),
    (lambda h: {**h, "tensors": [{**h["tensors"][0], "nnz": 10**9}] + h["tensors"][1:]}, "nnz"),
    (lambda h: {**h, "tensors": h["tensors"] + [{**h["tensors"][0], "name": "more"}]}, "damaged"),
])
def test_an_artefact_header_out_of_bounds_is_refused(tmp_path, change, words):
    path = _artefact_with_header(tmp_path / "m.shoal", change)
    with pytest.raises(CompressError, match=words):
        read_artefact(path)


def test_an_artefact_that_inflates_past_the_limit_is_refused(tmp_path, monkeypatch):
    path = _artefact_with_header(tmp_path / "m.shoal", lambda h: h)
    monkeypatch.setattr(artefact_file, "MAX_BODY_BYTES", 100)
    with pytest.raises(CompressError, match="inflates past 100 bytes"):
        read_artefact(path)


def test_a_built_in_model_artefact_still_loads_from_its_own_header(tmp_path):
    model = _mlp()
    save_artefact(tmp_path / "m.shoal", model, model_spec=MLP, input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(load_artefact(tmp_path / "m.shoal")(x), model(x))
