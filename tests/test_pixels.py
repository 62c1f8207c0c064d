"""Unit tests for mnist_track.pixels: the scale networks see, and back."""

from __future__ import annotations

import torch

from mnist_track.pixels import PIXEL_MEAN, PIXEL_STD, normalize_pixels, to_pixels


def test_normalize_pixels_accepts_flat_and_square_input():
    pixels = torch.arange(2 * 784, dtype=torch.int64).remainder(256).to(torch.uint8)
    flat = normalize_pixels(pixels.reshape(2, 784))
    square = normalize_pixels(pixels.reshape(2, 28, 28))
    assert flat.shape == square.shape == (2, 1, 28, 28)
    assert torch.equal(flat, square)
    expected = (pixels.double() / 255 - PIXEL_MEAN) / PIXEL_STD
    assert (flat.reshape(-1).double() - expected).abs().max().item() < 1e-5


def test_normalize_pixels_leaves_float_input_unchanged():
    pixels = torch.full((1, 784), 255.0)
    before = pixels.clone()
    normalize_pixels(pixels)
    assert torch.equal(pixels, before)


def test_to_pixels_undoes_normalize_pixels():
    pixels = torch.arange(3 * 784, dtype=torch.int64).remainder(256).to(torch.uint8)
    again = to_pixels(normalize_pixels(pixels.reshape(3, 784)))
    assert again.shape == (3, 28, 28)
    assert (again.reshape(3, 784) == pixels.reshape(3, 784).numpy()).all()
