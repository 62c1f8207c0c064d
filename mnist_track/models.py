"""The networks: an MLP and a small CNN, built from the architecture part of a config.

Both take normalized images of shape (N, 1, 28, 28) and return logits (N, 10). The
architecture is plain data (`architecture_of`) so a saved model is weights + this dict,
never a pickled module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

N_CLASSES = 10
IMAGE_SIDE = 28
_WORD_VALUES = 1 << 16  # the mask is drawn as 16-bit random words


class Dropout(nn.Dropout):
    """nn.Dropout, with the CPU mask drawn from 16-bit random words.

    Torch's CPU dropout draws one Bernoulli sample per element, serially
    (pytorch/pytorch#138199): about 20% of an MLP or CNN training step here. Four words
    per 64-bit draw make the mask about 5x cheaper. `p` is rounded to 1/65536 and kept
    values are scaled by the inverse of the kept fraction actually used, so the layer's
    expected output still equals its input. Other devices keep torch's fused kernel.
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or inputs.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(inputs)
        count = inputs.numel()
        bits = torch.empty(-(-count // 4), dtype=torch.int64).random_(-(1 << 63), None)
        words = bits.view(torch.int16)[:count].view(inputs.shape)
        dropped = min(round(self.p * _WORD_VALUES), _WORD_VALUES - 1)
        keep = words >= dropped - _WORD_VALUES // 2  # int16 words run from -32768
        return inputs * keep.to(inputs.dtype).mul_(_WORD_VALUES / (_WORD_VALUES - dropped))


def build_mlp(hidden_sizes: Sequence[int], dropout: float) -> nn.Sequential:
    """Flatten, then Linear+ReLU+Dropout per hidden layer, then a Linear to 10 logits."""
    return nn.Sequential(nn.Flatten(), *_dense_head(IMAGE_SIDE * IMAGE_SIDE, hidden_sizes, dropout))


def build_cnn(
    channels: Sequence[int], hidden_sizes: Sequence[int], dropout: float
) -> nn.Sequential:
    """Per entry of `channels`: 3x3 conv (padded) + 2x2 max-pool + ReLU; then an MLP head.
    Pooling before the ReLU gives the same result (both are monotonic) on 4x fewer values."""
    layers: list[nn.Module] = []
    in_channels, side = 1, IMAGE_SIDE
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(),
        ]
        in_channels, side = out_channels, side // 2
    layers += [nn.Flatten(), Dropout(dropout)]
    layers += _dense_head(in_channels * side * side, hidden_sizes, dropout)
    return nn.Sequential(*layers)


def _dense_head(width: int, hidden_sizes: Sequence[int], dropout: float) -> list[nn.Module]:
    """Linear+ReLU+Dropout per hidden size, then a Linear to the 10 logits."""
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU(), Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, N_CLASSES))
    return layers


def architecture_of(config: Any) -> dict[str, Any]:
    """The fields of a TrainConfig that decide the network's shape, as plain JSON data."""
    architecture = {
        "model": config.model,
        "hidden_sizes": list(config.hidden_sizes),
        "dropout": config.dropout,
    }
    if config.model == "cnn":
        architecture["channels"] = list(config.channels)
    return architecture


def describe_architecture(config: Any) -> str:
    """The network's shape in one line, e.g. 784-128-64-10 or c16-c32-128-10."""
    if config.model == "mlp":
        return "-".join(map(str, (IMAGE_SIDE * IMAGE_SIDE, *config.hidden_sizes, N_CLASSES)))
    conv = "-".join(f"c{c}" for c in config.channels)
    return "-".join([conv, *map(str, config.hidden_sizes), str(N_CLASSES)])


def build_model(architecture: Mapping[str, Any]) -> nn.Sequential:
    """The one place a network is built: from plain architecture data (`architecture_of`
    a TrainConfig, or the architecture.json of a logged model)."""
    family = architecture["model"]
    if family == "mlp":
        return build_mlp(architecture["hidden_sizes"], architecture["dropout"])
    if family == "cnn":
        return build_cnn(
            architecture["channels"], architecture["hidden_sizes"], architecture["dropout"]
        )
    raise ValueError(f"unknown model family {family!r}; expected 'mlp' or 'cnn'")


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
