"""N-worker synchronous training must equal one process on the same global batch."""

import pytest
import torch
import torch.nn.functional as F

import shoal
from shoal.config import load_config
from shoal.data import build_dataset
from shoal.models import build_model
from shoal.engine.checkpoint import load_checkpoint
from tests.conftest import small_config

GLOBAL_BATCH = 32
STEPS = 60  # digits has 1,438 training images: 44 steps per epoch, so this crosses an epoch


def single_process_weights(cfg_dict: dict) -> dict[str, torch.Tensor]:
    """Plain PyTorch: one model, full global batches drawn as DistributedSampler(num_replicas=1) does."""
    cfg = load_config(cfg_dict)
    data = build_dataset(cfg.data.dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum)
    x, y = data.train.tensors
    usable = len(y) - 1  # DistributedSampler(drop_last=True) with one replica keeps n - 1
    per_epoch = usable // GLOBAL_BATCH
    for step in range(STEPS):
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed + epoch))[:usable]
        idx = perm[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.processes
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_sync_matches_single_process_on_the_same_global_batch(tmp_path, workers):
    cfg = small_config(
        tmp_path / "run",
        workers=workers,
        data__batch_size=GLOBAL_BATCH // workers,
        train__steps=STEPS,
        train__eval_every=STEPS,
    )
    summary = shoal.train(cfg)
    distributed = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    expected = single_process_weights(cfg)
    assert summary.workers == workers and summary.steps == STEPS
    assert distributed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(distributed[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # Sanity: the weights did move, so equality is not trivially true.
    torch.manual_seed(0)
    initial = build_model(load_config(cfg).model, build_dataset(load_config(cfg).data.dataset)).state_dict()
    assert any(not torch.allclose(initial[k], expected[k]) for k in expected)
