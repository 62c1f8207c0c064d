"""The pixel scale the networks see: MNIST's mean and standard deviation, and the
conversions between uint8 pixels and normalized images. Training and the served model both
go through here; it imports only torch and numpy, so a logged model ships it without the
data-loading code."""

from __future__ import annotations

import numpy as np
import torch

# Mean and standard deviation of the training pixels scaled to 0..1.
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) pixels of shape (N, 28, 28) or (N, 784) -> the float32
    (N, 1, 28, 28) tensor the networks take. Training and serving both go through here."""
    images = pixels.reshape(-1, 1, 28, 28).to(torch.float32)
    # Out of place: float input must not be changed under its caller.
    return images * (1.0 / (255.0 * PIXEL_STD)) - PIXEL_MEAN / PIXEL_STD


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Normalized images back to uint8 pixels (N, 28, 28), for plots and input examples:
    the inverse of `normalize_pixels`."""
    pixels = (images.detach().cpu().float() * PIXEL_STD + PIXEL_MEAN) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8).reshape(-1, 28, 28).numpy()
