"""mnist-track: train, tune, track, register and serve MNIST digit classifiers."""

__version__ = "0.1.0"
