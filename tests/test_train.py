"""Unit tests for mnist_track.train: the training loop, determinism, devices, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from mnist_track import train as train_module
from mnist_track.config import TrainConfig
from mnist_track.data import MnistSplits, Split
from mnist_track.defaults import PROGRESS_EVERY
from mnist_track.train import (
    EpochMetrics,
    TrainingDiverged,
    build_optimizer,
    build_scheduler,
    evaluate_loss_accuracy,
    fit,
    predict_logits,
    prepare_model,
    resolve_device,
)

CPU = torch.device("cpu")


def subset(splits: MnistSplits, train: int, validation: int) -> MnistSplits:
    return MnistSplits(
        train=Split(splits.train.images[:train], splits.train.labels[:train]),
        validation=Split(
            splits.validation.images[:validation], splits.validation.labels[:validation]
        ),
        test=splits.test,
    )


@pytest.fixture(scope="module")
def tiny_splits(small_splits) -> MnistSplits:
    return subset(small_splits, train=256, validation=256)


def test_fit_learns_and_reports_every_epoch(small_splits):
    seen: list[EpochMetrics] = []
    config = TrainConfig(epochs=3, lr=3e-3, seed=0)
    result = fit(config, small_splits, on_epoch=seen.append)

    assert [metrics.epoch for metrics in seen] == [1, 2, 3]
    assert all(isinstance(metrics, EpochMetrics) for metrics in seen)
    assert result.history == seen
    for metrics in seen:
        for value in metrics.as_dict().values():
            assert math.isfinite(value)
        assert 0.0 <= metrics.train_accuracy <= 1.0
        assert 0.0 <= metrics.validation_accuracy <= 1.0
        assert metrics.seconds > 0
    # 2,000 images, 3 epochs: far above chance (0.1).
    assert result.final_validation_accuracy > 0.6
    assert result.best_validation_accuracy >= result.final_validation_accuracy
    assert seen[-1].train_loss < seen[0].train_loss
    assert result.seconds >= sum(metrics.seconds for metrics in seen) * 0.99

    # The returned model is the trained one, in eval mode: re-evaluating it gives the
    # last epoch's validation numbers.
    assert not result.model.training
    loss, accuracy = evaluate_loss_accuracy(result.model, small_splits.validation)
    assert accuracy == pytest.approx(seen[-1].validation_accuracy)
    assert loss == pytest.approx(seen[-1].validation_loss, rel=1e-5)


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_predict_logits_in_chunks_equals_one_forward_pass(family, small_splits):
    # More images than one chunk, and a last chunk that is not full.
    images = small_splits.train.images[: train_module.EVAL_BATCH_SIZE + 7]
    model = prepare_model(TrainConfig(model=family, seed=0), CPU)
    model.train()  # predict_logits must switch dropout off itself
    logits = predict_logits(model, images)
    with torch.inference_mode():
        whole = model.eval()(images)
    assert logits.shape == (len(images), 10)
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-5)


def test_fit_without_listener(tiny_splits):
    result = fit(TrainConfig(epochs=1, hidden_sizes=(16,)), tiny_splits)
    assert len(result.history) == 1


def test_fit_reports_progress_within_each_epoch(tiny_splits):
    # 256 images in batches of 4: 64 batches an epoch, a report every PROGRESS_EVERY.
    reports: list[tuple[int, int]] = []
    fit(
        TrainConfig(epochs=2, hidden_sizes=(16,), batch_size=4),
        tiny_splits,
        on_batches=lambda done, total: reports.append((done, total)),
    )
    per_epoch = [(done, 64) for done in range(PROGRESS_EVERY, 65, PROGRESS_EVERY)]
    assert reports == per_epoch * 2


def state_of(config: TrainConfig, splits: MnistSplits) -> dict[str, torch.Tensor]:
    return fit(config, splits).model.state_dict()


def test_same_seed_gives_bit_identical_weights(tiny_splits):
    config = TrainConfig(epochs=2, hidden_sizes=(32,), seed=3, batch_size=64)
    first, second = state_of(config, tiny_splits), state_of(config, tiny_splits)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_different_seed_gives_different_weights(tiny_splits):
    first = state_of(TrainConfig(epochs=1, hidden_sizes=(32,), seed=3), tiny_splits)
    other = state_of(TrainConfig(epochs=1, hidden_sizes=(32,), seed=4), tiny_splits)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_cnn_is_deterministic_too(tiny_splits):
    config = TrainConfig(
        model="cnn", channels=(4,), hidden_sizes=(16,), epochs=1, batch_size=64, seed=1
    )
    first, second = state_of(config, tiny_splits), state_of(config, tiny_splits)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize(
    ("precision", "computed_in"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_precision_sets_what_training_computes_in(
    tiny_splits, monkeypatch, model, precision, computed_in
):
    """bf16: the training steps' linear and conv layers compute in bfloat16 (autocast);
    the weights, the validation and the returned network stay float32, as the logged
    model serves."""
    seen: dict[str, set] = {"train": set(), "eval": set()}

    def record(layer, inputs, output):
        seen["train" if layer.training else "eval"].add(output.dtype)

    def hooked(config, device):
        network = prepare_model(config, device)
        for layer in network.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                layer.register_forward_hook(record)
        return network

    monkeypatch.setattr(train_module, "prepare_model", hooked)
    config = TrainConfig(
        model=model, channels=(4,), hidden_sizes=(16,), epochs=1, batch_size=64,
        precision=precision,
    )  # fmt: skip
    result = fit(config, tiny_splits)
    assert seen == {"train": {computed_in}, "eval": {torch.float32}}
    assert {parameter.dtype for parameter in result.model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("native", "computed_in"), [(True, torch.bfloat16), (False, torch.float32)]
)
def test_precision_auto_trains_in_bf16_only_where_the_device_has_it(
    tiny_splits, monkeypatch, native, computed_in
):
    seen = set()

    def record(layer, inputs, output):
        if layer.training:
            seen.add(output.dtype)

    def hooked(config, device):
        network = prepare_model(config, device)
        for layer in network.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(record)
        return network

    monkeypatch.setattr(train_module, "has_native_bf16", lambda device: native)
    monkeypatch.setattr(train_module, "prepare_model", hooked)
    fit(TrainConfig(hidden_sizes=(16,), epochs=1, batch_size=64, precision="auto"), tiny_splits)
    assert seen == {computed_in}


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"),
    [(True, False, True), (False, True, True), (False, False, False)],
)
def test_a_cpu_has_native_bf16_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert train_module.has_native_bf16(torch.device("cpu")) is native
    assert train_module.resolve_precision("auto", torch.device("cpu")) == (
        "bf16" if native else "fp32"
    )
    assert train_module.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # as asked
    assert train_module.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_bf16_precision_learns_as_well_as_fp32(small_splits):
    accuracies = {
        precision: fit(
            TrainConfig(epochs=2, lr=3e-3, seed=0, precision=precision), small_splits
        ).final_validation_accuracy
        for precision in ("fp32", "bf16")
    }
    assert accuracies["bf16"] > 0.6  # 2,000 images, 2 epochs: far above chance (0.1)
    assert abs(accuracies["bf16"] - accuracies["fp32"]) < 0.05, accuracies


class Prune(Exception):
    pass


def test_on_epoch_exception_stops_training(tiny_splits):
    calls = []

    def listener(metrics: EpochMetrics) -> None:
        calls.append(metrics.epoch)
        raise Prune

    with pytest.raises(Prune):
        fit(TrainConfig(epochs=3, hidden_sizes=(16,)), tiny_splits, on_epoch=listener)
    assert calls == [1]


def test_huge_learning_rate_diverges(tiny_splits):
    calls = []
    # 1e30 overflows float32 within epoch 1 whatever the random draws; 1e6 took one or
    # two epochs, depending on the dropout masks.
    config = TrainConfig(optimizer="sgd", lr=1e30, epochs=2, hidden_sizes=(32,), batch_size=32)
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        fit(config, tiny_splits, on_epoch=calls.append)
    assert calls == []  # no metrics of a diverged epoch reach the listener
    # Control: the same run with a sane learning rate trains normally.
    sane = config.model_copy(update={"lr": 0.01})
    assert len(fit(sane, tiny_splits, on_epoch=calls.append).history) == 2
    assert calls and all(math.isfinite(metrics.train_loss) for metrics in calls)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_fit_runs_every_schedule_and_optimizer(tiny_splits, schedule, optimizer):
    # onecycle raises if stepped more often than its total: two epochs check the count.
    config = TrainConfig(
        epochs=2, hidden_sizes=(16,), lr_schedule=schedule, optimizer=optimizer, batch_size=100
    )
    assert len(fit(config, tiny_splits).history) == 2


# --- devices -----------------------------------------------------------------------------


def test_resolve_device_cpu():
    assert resolve_device("cpu") == CPU


def test_resolve_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")


def test_resolve_device_auto_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device() == CPU


def test_resolve_device_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_resolve_device_unknown_name():
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("abacus")


# --- optimizers and schedules ------------------------------------------------------------


def learning_rates(schedule: str, lr: float, total_steps: int) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer("sgd", [parameter], lr, CPU)
    scheduler = build_scheduler(schedule, optimizer, lr, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_schedule_decays_from_lr_to_zero():
    rates = learning_rates("cosine", 0.1, 100)
    assert rates[0] == pytest.approx(0.1)
    assert rates[50] == pytest.approx(0.05, rel=1e-6)
    assert rates[-1] < 1e-3
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_onecycle_schedule_rises_to_lr_and_falls():
    rates = learning_rates("onecycle", 0.1, 100)
    peak = max(rates)
    assert peak == pytest.approx(0.1, rel=0.01)
    assert rates[0] < 0.1 * peak and rates[-1] < 0.1 * peak


def test_constant_schedule_keeps_lr():
    assert learning_rates("constant", 0.1, 20) == pytest.approx([0.1] * 20)


def test_unknown_schedule_and_optimizer_raise():
    parameter = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="lr_schedule"):
        build_scheduler("step", build_optimizer("adam", [parameter], 0.1, CPU), 0.1, 10)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("rmsprop", [parameter], 0.1, CPU)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_build_optimizer_kinds(name, kind):
    optimizer = build_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], 0.02, CPU)
    assert isinstance(optimizer, kind)
    assert optimizer.param_groups[0]["lr"] == 0.02
