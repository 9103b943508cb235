"""comm/layout.py: many tensors as one flat vector and back, and packing to a mask's kept entries."""

import pytest
import torch

from shoal.comm import layout


def test_flatten_then_copy_into_round_trips_in_each_tensors_own_storage_and_dtype():
    a, b = torch.arange(6.0).view(2, 3), torch.tensor([7.0, 8.0], dtype=torch.float16)
    storage = (a.data_ptr(), b.data_ptr())
    flat = layout.flatten([a, b], dtype=torch.float32)
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 8] and flat.dtype == torch.float32

    layout.copy_into([a, b], flat * 2)

    assert a.tolist() == [[0, 2, 4], [6, 8, 10]] and b.tolist() == [14, 16] and b.dtype == torch.float16
    assert (a.data_ptr(), b.data_ptr()) == storage  # written in place, not made views of the vector


def test_a_missing_gradient_counts_as_zeros_shaped_like_its_parameter():
    params = [torch.ones(2, 2), torch.ones(3)]
    assert layout.flatten([None, torch.full((3,), 5.0)], like=params).tolist() == [0, 0, 0, 0, 5, 5, 5]
    with pytest.raises(ValueError, match="tensor 0 is None"):
        layout.flatten([None])


def test_as_grads_gives_every_parameter_a_copy_of_its_piece():
    params = [torch.zeros(2, requires_grad=True), torch.zeros(1, 2, requires_grad=True)]
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0])
    layout.as_grads(params, flat)
    flat.zero_()
    assert params[0].grad.tolist() == [1, 2] and params[1].grad.tolist() == [[3, 4]]


def test_pieces_refuse_a_vector_of_the_wrong_size():
    with pytest.raises(ValueError, match="a flat vector of 3 values for tensors of 4"):
        list(layout.pieces(torch.zeros(3), [torch.zeros(2, 2)]))


def test_pack_and_unpack_keep_only_the_masks_entries():
    flat, mask = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, False, False, True])
    kept = layout.pack(flat, mask)
    assert kept.tolist() == [1, 4]
    assert layout.unpack(kept, mask).tolist() == [1, 0, 0, 4]
    assert layout.pack(flat, None) is flat and layout.unpack(flat, None) is flat
    with pytest.raises(ValueError, match="3 values for a mask that keeps 2"):
        layout.unpack(torch.zeros(3), mask)
