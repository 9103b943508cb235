"""Error feedback rescues a biased compressor in real 2-worker training."""

import pytest

import shoal
from tests.conftest import small_config


def train_with(codec: str, out) -> float:
    cfg = small_config(out, model="mlp:hidden=[64]", codec=codec, train__steps=300, train__eval_every=100)
    cfg["optimizer"]["lr"] = 0.05
    return shoal.train(cfg).final_accuracy


@pytest.mark.processes
def test_error_feedback_rescues_aggressive_topk(tmp_path):
    # Top-0.2% without memory drops the same small coordinates step after step;
    # with error feedback they accumulate until they are sent.
    plain = train_with("topk:ratio=0.002", tmp_path / "plain")
    with_ef = train_with("topk:ratio=0.002,memory=ef", tmp_path / "ef")
    assert with_ef >= 0.85
    assert with_ef >= plain + 0.08, (plain, with_ef)
