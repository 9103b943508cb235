import pytest
import torch
from torch import nn

from shoal.data.base import DatasetBundle
from shoal.models import build_model, count_parameters
from shoal.registry import MODELS, load_builtins

load_builtins()


def bundle(shape, classes=7):
    return DatasetBundle(None, None, shape, classes)


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("mlp", (1, 40)),
        ("mlp:hidden=[16, 16, 16]", (1, 8, 8)),
        ("cnn1d", (1, 40)),
        ("cnn1d:channels=8,hidden=32,fc_layers=2", (3, 64)),
        ("cnn1d:channels=25,growth=1,first_stride=2,padding=1,fc_layers=0", (1, 40)),
        ("cnn2d", (1, 8, 8)),
        ("cnn2d", (3, 32, 32)),
        ("resnet", (1, 40)),
        ("resnet:width=8,stages=2,blocks=2", (1, 8, 8)),
        ("transformer", (1, 40)),
        ("transformer:d_model=32,heads=2,layers=1", (1, 8, 8)),
    ],
)
def test_registered_models_classify_and_train(spec, shape):
    model = build_model(MODELS.resolve(spec), bundle(shape))
    x = torch.randn(5, *shape)
    logits = model(x)
    assert logits.shape == (5, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert count_parameters(model) > 0


def test_cnn1d_options_build_the_mnist1d_papers_cnn_and_keep_the_default():
    paper = build_model(MODELS.resolve("cnn1d:channels=25,growth=1,first_stride=2,padding=1,fc_layers=0"),
                        bundle((1, 40), classes=10))
    convs = [m for m in paper if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == \
        [(25, 5, 2, 1), (25, 3, 2, 1), (25, 3, 2, 1)]
    assert sum(isinstance(m, nn.Linear) for m in paper) == 1 and count_parameters(paper) == 5210
    assert count_parameters(build_model(MODELS.resolve("cnn1d"), bundle((1, 40), classes=10))) == 185_418


@pytest.mark.parametrize("spec, shape", [("cnn1d", (1, 8, 8)), ("cnn2d", (1, 40)), ("resnet", (40,))])
def test_wrong_input_rank_is_a_clear_error(spec, shape):
    with pytest.raises(ValueError, match="needs"):
        build_model(MODELS.resolve(spec), bundle(shape))


def test_transformer_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        build_model(MODELS.resolve("transformer:d_model=30,heads=4"), bundle((1, 40)))


def test_entry_point_model_gets_its_options_and_must_return_a_module():
    model = build_model(MODELS.resolve("torch.nn:Linear:in_features=3,out_features=2"), bundle((3,)))
    assert isinstance(model, nn.Linear) and model.out_features == 2
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        build_model(MODELS.resolve("builtins:dict"), bundle((3,)))
