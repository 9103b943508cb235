"""The byte-level ``text`` dataset and the ``transformer_lm`` model."""

import math

import pytest
import torch
import torch.nn.functional as F

from shoal.data import ShardedBatches, build_dataset
from shoal.data.shard import fetch
from shoal.data.text import source_bytes
from shoal.models import build_model
from shoal.registry import DATASETS, MODELS, load_builtins

load_builtins(DATASETS, MODELS)


def text(spec: str | dict = "text:bytes=50000,seq_len=64,test_fraction=0.1"):
    return build_dataset(DATASETS.resolve(spec))


def lm(spec: str, seq_len: int = 64):
    return build_model(MODELS.resolve(spec), text(f"text:bytes=4096,seq_len={seq_len}"))


def test_text_is_the_same_bytes_every_time_it_is_built():
    first, second = text(), text()
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))


def test_text_sizes_and_shapes_follow_the_options():
    data = text()
    n_train = (45000 - 1) // 64  # the first 90% of 50,000 bytes, one byte kept for the last target
    n_test = (5000 - 1) // 64
    assert len(data.train) == n_train and len(data.test) == n_test
    assert data.input_shape == (64,) and data.num_classes == 256
    x, y = data.train[0]
    assert x.shape == y.shape == (64,) and x.dtype == y.dtype == torch.long
    assert 0 <= int(data.train.tensors[0].min()) and int(data.train.tensors[0].max()) <= 255


def test_windows_tile_the_text_and_targets_are_the_next_bytes():
    data = text()
    for part in (data.train, data.test):
        inputs, targets = part.tensors
        stream = inputs.flatten()  # non-overlapping windows, back to back: the text itself
        assert torch.equal(targets.flatten()[:-1], stream[1:])  # every target is the next byte
        assert torch.equal(targets[:, :-1], inputs[:, 1:])


def test_train_and_test_are_disjoint_spans_of_the_text():
    options = DATASETS.resolve("text:bytes=50000,seq_len=64,test_fraction=0.1").options
    stream = torch.tensor(list(source_bytes(options)))
    data = text()

    def span(part):  # the bytes a part covers: its inputs, then its last target
        return torch.cat([part.tensors[0].flatten(), part.tensors[1][-1, -1:]])

    train, test = span(data.train), span(data.test)
    assert len(stream) == 50000 and len(train) <= 45000 < 45000 + len(test) <= 50000
    assert torch.equal(stream[: len(train)], train)
    assert torch.equal(stream[45000 : 45000 + len(test)], test)  # the test set starts after the train set ends


def test_text_reads_a_users_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abcdefghij" * 100)
    (tmp_path / "b.txt").write_bytes(b"0123456789" * 100)
    (tmp_path / "skip.md").write_bytes(b"#" * 5000)
    one = text({"name": "text", "path": str(tmp_path / "a.txt"), "bytes": 5000, "seq_len": 10, "test_fraction": 0.2})
    assert len(one.train) == 79 and len(one.test) == 19  # 800 and 200 of the file's 1,000 bytes
    assert bytes(one.train[0][0].tolist()) == b"abcdefghij" and bytes(one.train[0][1].tolist()) == b"bcdefghija"

    both = text({"name": "text", "path": str(tmp_path), "pattern": "*.txt", "bytes": 5000, "seq_len": 10,
                 "test_fraction": 0.5})
    assert set(bytes(both.train.tensors[0].flatten().tolist())) == set(b"abcdefghij")  # a.txt first, by name
    assert set(bytes(both.test.tensors[0].flatten().tolist())) == set(b"0123456789")


def test_text_rejects_a_missing_path_and_too_little_text(tmp_path):
    with pytest.raises(ValueError, match="path: .*is no file or directory"):
        DATASETS.resolve({"name": "text", "path": str(tmp_path / "nope.txt")})
    (tmp_path / "short.txt").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="seq_len=64"):
        text({"name": "text", "path": str(tmp_path / "short.txt"), "seq_len": 64})


def test_text_batches_shard_across_workers_like_any_tensor_dataset():
    data = text()
    batches = [next(ShardedBatches(data.train, rank=r, world_size=2, batch_size=8, seed=0).iterate()) for r in (0, 1)]
    for x, y in batches:
        assert x.shape == y.shape == (8, 64) and x.dtype == torch.long
    assert not torch.equal(batches[0][0], batches[1][0])
    x, y = fetch(data.test, [0, 3])
    assert torch.equal(x[1], data.test.tensors[0][3]) and torch.equal(y[1], data.test.tensors[1][3])


def test_lm_gives_next_byte_logits_at_every_position():
    model = lm("transformer_lm:d_model=32,heads=2,layers=2")
    logits = model(torch.randint(0, 256, (3, 64)))
    assert logits.shape == (3, 64, 256)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model, torch.nn.Sequential) and len(model) == 2 + 2 + 1  # cut between blocks by pipeline


def test_lm_is_causal():
    model = lm("transformer_lm:d_model=32,heads=2,layers=2").eval()
    x = torch.randint(0, 256, (2, 64))
    t = 20
    changed = x.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 256
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-5)
    assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-3  # later positions do see it


def test_lm_rejects_data_longer_than_its_context_or_not_bytes():
    with pytest.raises(ValueError, match="context=32 is shorter than the dataset's seq_len=64"):
        lm("transformer_lm:context=32")
    with pytest.raises(ValueError, match="needs token sequences"):
        build_model(MODELS.resolve("transformer_lm"), build_dataset(DATASETS.resolve("synthetic")))
    with pytest.raises(ValueError, match="divisible by heads"):
        lm("transformer_lm:d_model=30,heads=4")


def test_lm_starts_near_uniform_and_adamw_lowers_its_cross_entropy():
    torch.manual_seed(0)
    data = text()
    model = build_model(MODELS.resolve("transformer_lm:d_model=32,heads=2,layers=1"), data)
    test_x, test_y = data.test.tensors[0][:64], data.test.tensors[1][:64]

    def test_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(test_x).flatten(0, 1), test_y.flatten()).item()

    start = test_loss()
    assert abs(start - math.log(256)) < 0.1  # perplexity ~256 at initialisation
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = ShardedBatches(data.train, rank=0, world_size=1, batch_size=16, seed=0).iterate()
    for _ in range(20):
        x, y = next(batches)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert test_loss() < start - 1.0
