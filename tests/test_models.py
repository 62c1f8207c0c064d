"""Unit tests for mnist_track.models: the MLP and CNN, their shapes, and architecture data."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mnist_track.config import TrainConfig
from mnist_track.models import (
    Dropout,
    architecture_of,
    build_model,
    count_parameters,
    describe_architecture,
)


def layers_of(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, kind)]


def test_default_mlp_is_the_classic_784_128_64_10():
    model = build_model(architecture_of(TrainConfig()))
    linears = layers_of(model, nn.Linear)
    assert [(layer.in_features, layer.out_features) for layer in linears] == [
        (784, 128),
        (128, 64),
        (64, 10),
    ]
    # weights + biases: 784*128+128 + 128*64+64 + 64*10+10
    assert count_parameters(model) == 109386
    assert sum(p.numel() for p in model.parameters()) == 109386
    assert len(layers_of(model, nn.Dropout)) == 2
    assert all(layer.p == TrainConfig().dropout for layer in layers_of(model, nn.Dropout))


def test_mlp_follows_hidden_sizes():
    model = build_model({"model": "mlp", "hidden_sizes": [32], "dropout": 0.0})
    linears = layers_of(model, nn.Linear)
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(784, 32), (32, 10)]
    assert count_parameters(model) == 784 * 32 + 32 + 32 * 10 + 10


def test_mlp_without_hidden_layers_is_logistic_regression():
    model = build_model({"model": "mlp", "hidden_sizes": [], "dropout": 0.0})
    assert count_parameters(model) == 784 * 10 + 10


def test_cnn_layers():
    model = build_model(
        architecture_of(TrainConfig(model="cnn", channels=(16, 32), hidden_sizes=(128,)))
    )
    convs = layers_of(model, nn.Conv2d)
    assert [(conv.in_channels, conv.out_channels) for conv in convs] == [(1, 16), (16, 32)]
    assert all(conv.kernel_size == (3, 3) for conv in convs)
    linears = layers_of(model, nn.Linear)
    # Two 2x2 poolings: 28 -> 14 -> 7, with 32 channels.
    assert [(layer.in_features, layer.out_features) for layer in linears] == [
        (32 * 7 * 7, 128),
        (128, 10),
    ]


def test_cnn_with_one_block():
    model = build_model({"model": "cnn", "channels": [8], "hidden_sizes": [], "dropout": 0.1})
    (linear,) = layers_of(model, nn.Linear)
    assert (linear.in_features, linear.out_features) == (8 * 14 * 14, 10)


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(),
        TrainConfig(hidden_sizes=(20, 20, 20)),
        TrainConfig(model="cnn", channels=(4, 8), hidden_sizes=(16,)),
        TrainConfig(model="cnn", channels=(4, 4, 4), hidden_sizes=()),
    ],
    ids=["mlp", "mlp-deep", "cnn", "cnn-3-blocks"],
)
def test_output_is_logits_n_by_10(config):
    model = build_model(architecture_of(config)).eval()
    with torch.no_grad():
        logits = model(torch.randn(5, 1, 28, 28))
    assert logits.shape == (5, 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(hidden_sizes=(64, 32), dropout=0.3),
        TrainConfig(model="cnn", channels=(8, 16), hidden_sizes=(32,), dropout=0.1),
    ],
    ids=["mlp", "cnn"],
)
def test_architecture_round_trip(config):
    architecture = architecture_of(config)
    restored = json.loads(json.dumps(architecture))  # plain JSON data
    assert restored == architecture
    assert restored["model"] == config.model
    assert restored["hidden_sizes"] == list(config.hidden_sizes)
    assert restored["dropout"] == config.dropout

    torch.manual_seed(0)
    original = build_model(architecture).eval()
    rebuilt = build_model(restored).eval()
    assert [(k, v.shape) for k, v in original.state_dict().items()] == [
        (k, v.shape) for k, v in rebuilt.state_dict().items()
    ]
    rebuilt.load_state_dict(original.state_dict())  # strict: same keys and shapes
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(original(images), rebuilt(images))


def test_architecture_of_mlp_has_no_channels():
    assert "channels" not in architecture_of(TrainConfig(model="mlp"))
    assert architecture_of(TrainConfig(model="cnn"))["channels"] == [16, 32]


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="resnet"):
        build_model({"model": "resnet", "hidden_sizes": [], "dropout": 0.0})


@pytest.mark.parametrize(
    ("config", "described"),
    [
        (TrainConfig(), "784-128-64-10"),
        (TrainConfig(hidden_sizes=()), "784-10"),
        (TrainConfig(model="cnn", channels=(16, 32), hidden_sizes=(128,)), "c16-c32-128-10"),
    ],
)
def test_describe_architecture(config, described):
    assert describe_architecture(config) == described


# --- Dropout: torch's meaning, a cheaper CPU mask -----------------------------------------


@pytest.mark.parametrize("p", [0.2, 0.25, 0.5, 0.05])
def test_dropout_keeps_1_minus_p_and_preserves_the_mean(p):
    torch.manual_seed(0)
    inputs = torch.ones(1000, 1000)
    outputs = Dropout(p).train()(inputs)
    kept = outputs != 0
    # 10^6 draws: the kept fraction's standard deviation is under 0.0005.
    assert abs(kept.float().mean().item() - (1 - p)) < 0.002
    assert torch.allclose(outputs[kept], torch.full_like(outputs[kept], 1 / (1 - p)))
    assert abs(outputs.mean().item() - 1.0) < 0.005


def test_dropout_draws_each_element_independently():
    """Pairs of neighbours and of elements four apart (one 64-bit draw feeds four words)
    are both kept as often as independent draws are: (1 - p)^2."""
    torch.manual_seed(0)
    kept = Dropout(0.5).train()(torch.ones(2000, 1000)) != 0
    flat = kept.flatten()
    for gap in (1, 4):
        both = (flat[:-gap] & flat[gap:]).float().mean().item()
        assert abs(both - 0.25) < 0.002, gap


def test_dropout_draws_a_new_mask_each_call_and_repeats_under_a_seed():
    layer = Dropout(0.3).train()
    inputs = torch.ones(64, 33)  # 2112 elements: not a whole number of 64-bit draws per row
    torch.manual_seed(1)
    first, second = layer(inputs), layer(inputs)
    torch.manual_seed(1)
    assert torch.equal(layer(inputs), first)
    assert not torch.equal(first, second)


def test_dropout_gradient_is_the_mask_and_eval_mode_is_the_identity():
    torch.manual_seed(0)
    inputs = torch.randn(128, 300, requires_grad=True)
    layer = Dropout(0.25).train()
    outputs = layer(inputs)
    outputs.sum().backward()
    assert torch.allclose(inputs.grad, (outputs / inputs).detach())
    assert torch.equal(layer.eval()(inputs), inputs)


@pytest.mark.parametrize("p", [0.0, 0.9999999])
def test_dropout_extremes_stay_finite(p):
    torch.manual_seed(0)
    outputs = Dropout(p).train()(torch.ones(100, 100))
    assert torch.isfinite(outputs).all()
    if p == 0.0:
        assert torch.equal(outputs, torch.ones(100, 100))


def test_networks_use_the_cheaper_dropout():
    for family in ("mlp", "cnn"):
        model = build_model(architecture_of(TrainConfig(model=family, dropout=0.3)))
        assert layers_of(model, nn.Dropout), family
        assert all(type(layer) is Dropout for layer in layers_of(model, nn.Dropout)), family
