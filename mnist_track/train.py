"""The training loop: `fit(config, splits, on_epoch=...)` trains one network and returns it
with its per-epoch history. It knows nothing of MLflow or Optuna: they listen through
`on_epoch` (which may raise, e.g. to prune) and read the result.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mnist_track.data import MnistSplits, Split
from mnist_track.defaults import PROGRESS_EVERY
from mnist_track.errors import MnistTrackError
from mnist_track.models import architecture_of, build_model

if TYPE_CHECKING:
    from mnist_track.config import TrainConfig

# Inference needs no small batches, but the CNN's activations at 4096 images (200 MB for
# the first conv) leave the CPU's caches: 10,000 test images took 0.70 s at 4096 and
# 0.28 s at 1024 (2-core EPYC); the MLP is the same at both (15-16 ms).
EVAL_BATCH_SIZE = 1024
# TrainConfig.precision: the dtype training's forward and backward autocast to (None:
# none). Evaluation is always float32, as the logged model serves.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


class TrainingDiverged(MnistTrackError, RuntimeError):
    """The loss became NaN or infinite; the run cannot produce a useful model."""


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    validation_loss: float
    validation_accuracy: float
    seconds: float  # wall time of this epoch's training and validation

    def as_dict(self) -> dict[str, float]:
        """Namespaced metric names, as they are logged."""
        return {
            "train/loss": self.train_loss,
            "train/accuracy": self.train_accuracy,
            "val/loss": self.validation_loss,
            "val/accuracy": self.validation_accuracy,
            "time/epoch_seconds": self.seconds,
        }


@dataclass
class FitResult:
    model: nn.Module  # in eval mode, on the training device
    history: list[EpochMetrics] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def best_validation_accuracy(self) -> float:
        return max((epoch.validation_accuracy for epoch in self.history), default=0.0)

    @property
    def final_validation_accuracy(self) -> float:
        return self.history[-1].validation_accuracy if self.history else 0.0


def resolve_device(name: str = "auto") -> torch.device:
    """The one place a device is chosen: CUDA, then MPS, then CPU; or exactly `name`."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise ValueError(f"unknown device {name!r}: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision training runs in: `name`, or for "auto" bf16 where `device` computes
    bfloat16 natively and fp32 elsewhere. Emulated bf16 is no shortcut: the CNN recipe
    took 229 s in bf16 against 23 s in fp32 on an AVX2-only CPU (AMD EPYC, Zen 3)."""
    if name != "auto":
        return name
    return "bf16" if has_native_bf16(device) else "fp32"


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, a CPU
    with AVX512-BF16 or AMX (torch's own checks, private, hence the defaults)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    return False  # MPS: bf16 autocast is not worth it there yet


def build_optimizer(
    name: str, parameters, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    # The fused kernels update all tensors in one call: about 0.3 ms less per CPU step.
    fused = device.type in ("cpu", "cuda") or None
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}")


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-batch learning-rate schedule over the whole run."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    if name == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"unknown lr_schedule {name!r}")


def prepare_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """The network of `config` on `device`, in the memory layout training uses."""
    model = build_model(architecture_of(config)).to(device)
    if config.model == "cnn" and device.type != "mps":
        # oneDNN/cuDNN convolutions and pooling run much faster in NHWC (measured 1.6x on CPU).
        model = model.to(memory_format=torch.channels_last)
    return model


def fit(
    config: TrainConfig,
    splits: MnistSplits,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    on_batches: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Train a network described by `config` (a TrainConfig) on `splits.train`, validating
    on `splits.validation` after every epoch; `on_epoch` sees each epoch's metrics, and
    `on_batches(done, total)` the progress within an epoch every PROGRESS_EVERY batches."""
    device = splits.train.images.device
    torch.manual_seed(config.seed)  # weights and dropout
    shuffle = torch.Generator().manual_seed(config.seed)
    model = prepare_model(config, device)
    optimizer = build_optimizer(config.optimizer, model.parameters(), config.lr, device)
    steps_per_epoch = -(-len(splits.train) // config.batch_size)
    scheduler = build_scheduler(
        config.lr_schedule, optimizer, config.lr, steps_per_epoch * config.epochs
    )
    autocast_dtype = AUTOCAST_DTYPES[resolve_precision(config.precision, device)]
    result = FitResult(model=model)
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        train_loss, train_accuracy = _train_one_epoch(
            model,
            optimizer,
            scheduler,
            splits.train,
            config.batch_size,
            shuffle,
            on_batches,
            autocast_dtype=autocast_dtype,
        )
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch}")
        validation_loss, validation_accuracy = evaluate_loss_accuracy(model, splits.validation)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            validation_loss=validation_loss,
            validation_accuracy=validation_accuracy,
            seconds=time.perf_counter() - epoch_started,
        )
        result.history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def _train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    split: Split,
    batch_size: int,
    shuffle: torch.Generator,
    on_batches: Callable[[int, int], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    model.train()
    images, labels = split.images, split.labels
    cast = (
        torch.autocast(images.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    order = torch.randperm(len(split), generator=shuffle).to(images.device)
    # Sums stay on the device: reading them per batch would sync a GPU every step.
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    batches = order.split(batch_size)
    for done, batch in enumerate(batches, start=1):
        # index_select is several times faster than fancy indexing for row gathers.
        batch_images, batch_labels = images.index_select(0, batch), labels.index_select(0, batch)
        with cast:
            logits = model(batch_images)
            loss = F.cross_entropy(logits, batch_labels)  # float32: autocast's loss list
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            loss_sum += loss * len(batch)
            correct += (logits.argmax(dim=1) == batch_labels).sum()
        if on_batches is not None and done % PROGRESS_EVERY == 0:
            on_batches(done, len(batches))  # a count only: nothing is read from the device
    count = len(split)
    return loss_sum.item() / count, correct.item() / count


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits for normalized images, in large batches, with the model in eval mode."""
    model.eval()
    return torch.cat([model(chunk) for chunk in images.split(EVAL_BATCH_SIZE)])


def evaluate_loss_accuracy(model: nn.Module, split: Split) -> tuple[float, float]:
    logits = predict_logits(model, split.images)
    loss = F.cross_entropy(logits, split.labels).item()
    accuracy = (logits.argmax(dim=1) == split.labels).float().mean().item()
    return loss, accuracy
