import pytest

from shoal.registry import MODELS, load_builtins, parse_spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("sync", ("sync", {})),
        ("topk:ratio=0.01,memory=ef", ("topk", {"ratio": 0.01, "memory": "ef"})),
        ("mlp:hidden=[64, 32]", ("mlp", {"hidden": [64, 32]})),
        ("pkg.models:make_model", ("pkg.models:make_model", {})),
        ("waves:make_model:width=32", ("waves:make_model", {"width": 32})),
        ({"name": "cnn1d", "channels": 8}, ("cnn1d", {"channels": 8})),
        ("x:flag=true", ("x", {"flag": True})),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "topk:=3", "mlp:hidden=[1", {"ratio": 1}])
def test_parse_spec_rejects(spec):
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_resolve_validates_options_against_the_implementation():
    load_builtins()
    comp = MODELS.resolve("cnn1d:channels=8")
    assert comp.options.channels == 8 and not comp.entry_point
    with pytest.raises(ValueError, match="channels"):
        MODELS.resolve("cnn1d:channels=zero")
    with pytest.raises(ValueError, match="unknown model .nope.; allowed: artefact, cnn1d"):
        MODELS.resolve("nope")
    with pytest.raises(ValueError, match="cannot import 'cnn1d'"):
        MODELS.resolve("cnn1d:channels")  # no '=': read as an entry point, which does not exist


def test_entry_point_resolution_and_signature_check():
    comp = MODELS.resolve("torch.nn:Linear:in_features=3,out_features=2")
    assert comp.entry_point and comp.option_dict() == {"in_features": 3, "out_features": 2}
    with pytest.raises(ValueError, match="cannot import"):
        MODELS.resolve("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        MODELS.resolve("torch.nn:NoSuchLayer")
    with pytest.raises(ValueError, match="cannot take options"):
        MODELS.resolve("torch.nn:Linear:bogus=1")
