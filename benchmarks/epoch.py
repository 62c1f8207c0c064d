"""Seconds per epoch of the classic MLP: the project's path (tensors held on the device,
`mnist_track.train.fit`) against the usual torchvision pipeline (MNIST dataset, PIL
transforms, DataLoader), and against this machine's FLOP floor.

Run alone for the side-by-side table: `python -m benchmarks.epoch [--quick]`.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import TRAIN_IMAGES, Context, Figure, data_dir, log
from mnist_track.pixels import PIXEL_MEAN, PIXEL_STD

NAME = "epoch"
REFERENCE = "torchvision MNIST + ToTensor/Normalize + DataLoader(workers=0)"
PROJECT_EPOCHS = 4  # the first epoch is a warm-up; the figure is the median of the rest
QUICK_PROJECT_EPOCHS = 2
REFERENCE_EPOCHS = 2
QUICK_REFERENCE_STEPS = 60  # quick mode: this many batches after 5 warm-up ones, extrapolated
MATMUL_SIDE = 2048


# --- the project's path ----------------------------------------------------------------


def project_epoch_seconds(splits, batch_size: int, epochs: int) -> float:
    """Median EpochMetrics.seconds over epochs 2..n (training + the 5,000-image validation
    pass that `fit` runs every epoch)."""
    from mnist_track.config import TrainConfig
    from mnist_track.train import fit

    result = fit(TrainConfig(batch_size=batch_size, epochs=epochs), splits)
    return statistics.median(epoch.seconds for epoch in result.history[1:])


# --- the reference pipeline ------------------------------------------------------------


def torchvision_root(folder: Path) -> Path:
    """The shared .gz files decompressed into FOLDER/MNIST/raw/, where torchvision's
    MNIST looks for them (there is no internet to download them)."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for source in sorted(data_dir().glob("*-ubyte.gz")):
        with gzip.open(source, "rb") as packed, open(raw / source.stem, "wb") as plain:
            shutil.copyfileobj(packed, plain)
    return folder


def reference_dataset(root: Path, splits, val_size: int = 5000, split_seed: int = 0):
    """torchvision's MNIST with the classic transforms, restricted to the same 55,000
    training images as make_splits (same seeded permutation; checked by the labels)."""
    import torch
    from torch.utils.data import Subset
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((PIXEL_MEAN,), (PIXEL_STD,))]
    )
    dataset = datasets.MNIST(str(root), train=True, download=False, transform=transform)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(split_seed))
    train_index = order[val_size:]
    if not torch.equal(dataset.targets[train_index], splits.train.labels.cpu()):
        raise RuntimeError("the reference subset is not the project's training split")
    return Subset(dataset, train_index.tolist())


def reference_epoch_seconds(
    dataset, batch_size: int, device, epochs: int, max_steps: int | None = None
) -> float:
    """Median seconds of epochs 2..n of the tutorial loop; with `max_steps`, one partial
    epoch (after 5 warm-up batches) extrapolated to a whole one."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from mnist_track.config import TrainConfig
    from mnist_track.models import architecture_of, build_model

    torch.manual_seed(0)
    model = build_model(architecture_of(TrainConfig())).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)

    def step(images, labels) -> None:
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    if max_steps is not None:
        batches = iter(loader)
        for _ in range(5):
            step(*next(batches))
        started = time.perf_counter()
        for _ in range(max_steps):
            step(*next(batches))
        per_step = (time.perf_counter() - started) / max_steps
        return per_step * len(loader)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, labels in loader:
            step(images, labels)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


# --- the FLOP floor --------------------------------------------------------------------


def matmul_gflops(device=None, side: int = MATMUL_SIDE, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of square matmuls (2*n^3 FLOPs each) with torch on `device`."""
    import torch

    a = torch.randn(side, side, device=device)
    b = torch.randn(side, side, device=device)
    sync = torch.cuda.synchronize if a.device.type == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        started = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - started

    once()  # warm-up
    return 2 * side**3 / min(once() for _ in range(repeats)) / 1e9


def mlp_layers(hidden_sizes=(128, 64)) -> list[tuple[int, int]]:
    widths = [784, *hidden_sizes, 10]
    return list(zip(widths[:-1], widths[1:], strict=True))


def mlp_epoch_flops(
    train_images: int = TRAIN_IMAGES, validation_images: int = 5000, hidden_sizes=(128, 64)
) -> float:
    """FLOPs of one epoch as `fit` runs it. With M = sum of in*out over the Linear layers
    (MACs per image) and M1 = the first layer's: training costs N_train * (2M forward +
    2M weight gradients + 2(M - M1) input gradients), validation N_val * 2M. Biases,
    activations, dropout, the loss and the optimizer are left out (all O(parameters) or
    O(activations), small beside the matmuls), so the floor is a lower bound."""
    layers = mlp_layers(hidden_sizes)
    macs = sum(i * o for i, o in layers)
    first = layers[0][0] * layers[0][1]
    return train_images * (6 * macs - 2 * first) + validation_images * 2 * macs


# --- the group -------------------------------------------------------------------------


def measure(context: Context) -> list[dict]:
    """One row per batch size: project and reference seconds per epoch."""
    quick = context.quick
    splits = context.full_splits
    batch_sizes = (128,) if quick else (64, 128, 256)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-torchvision-") as folder:
        dataset = reference_dataset(torchvision_root(Path(folder)), splits)
        for batch_size in batch_sizes:
            log(f"epoch: project path, batch {batch_size}")
            project = project_epoch_seconds(
                splits, batch_size, QUICK_PROJECT_EPOCHS if quick else PROJECT_EPOCHS
            )
            log(f"epoch: torchvision reference, batch {batch_size}")
            reference = reference_epoch_seconds(
                dataset,
                batch_size,
                context.device,
                REFERENCE_EPOCHS,
                max_steps=QUICK_REFERENCE_STEPS if quick else None,
            )
            rows.append({"batch_size": batch_size, "project": project, "reference": reference})
    return rows


def run(context: Context) -> list[Figure]:
    quick = context.quick
    rows = measure(context)
    log("epoch: matmul GFLOP/s")
    gflops = matmul_gflops(context.device, repeats=3 if quick else 5)
    flops = mlp_epoch_flops()
    floor = flops / (gflops * 1e9)
    project_epochs = QUICK_PROJECT_EPOCHS if quick else PROJECT_EPOCHS
    project_note = (
        f"EpochMetrics.seconds, median of {project_epochs - 1} epoch(s) after a warm-up one,"
        " of mnist_track.train.fit (TrainConfig defaults, 55,000 images; includes the "
        "per-epoch 5,000-image validation pass); reference: training loop only, "
        + (
            f"{QUICK_REFERENCE_STEPS} batches extrapolated to a full epoch (quick)"
            if quick
            else f"median of {REFERENCE_EPOCHS - 1} epoch(s) after a warm-up one"
        )
    )
    figures = [
        Figure(
            NAME,
            f"classic MLP epoch, batch {row['batch_size']}",
            row["project"],
            "s",
            reference=REFERENCE,
            reference_value=row["reference"],
            reference_unit="s",
            ratio=row["reference"] / row["project"],
            ratio_of="reference / project",
            target=("ratio", ">=", 10),
            estimate=quick,
            note=project_note,
        )
        for row in rows
    ]
    at_128 = next(row for row in rows if row["batch_size"] == 128)
    figures.append(
        Figure(
            NAME,
            "classic MLP epoch vs FLOP floor, batch 128",
            at_128["project"],
            "s",
            reference=f"floor: {flops / 1e9:.1f} GFLOP / {gflops:.1f} GFLOP/s",
            reference_value=floor,
            reference_unit="s",
            ratio=at_128["project"] / floor,
            ratio_of="project / floor",
            target=("ratio", "<=", 2),
            estimate=quick,
            note=(
                "FLOPs/epoch = N_train*(6M - 2*M1) + N_val*2M with M = 784*128 + 128*64 + "
                "64*10 MACs per image, M1 = 784*128, N_train = 55,000, N_val = 5,000 "
                "(forward 2M, weight grads 2M, input grads 2M except the first layer; "
                "validation forward only); GFLOP/s: best of "
                f"{3 if quick else 5} fp32 {MATMUL_SIDE}x{MATMUL_SIDE} torch matmuls"
            ),
        )
    )
    figures.append(
        Figure(
            NAME,
            "fp32 matmul throughput",
            gflops,
            "GFLOP/s",
            estimate=quick,
            note=f"torch, {MATMUL_SIDE}x{MATMUL_SIDE} @ {MATMUL_SIDE}x{MATMUL_SIDE}",
        )
    )
    return figures


def side_by_side(figures: list[Figure]) -> str:
    lines = [
        f"{'batch':>5}  {'project s/epoch':>15}  {'torchvision s/epoch':>19}  {'speed-up':>8}  "
        f"{'target':>6}  met",
    ]
    for figure in figures:
        if figure.name.startswith("classic MLP epoch, batch"):
            batch = figure.name.rsplit(" ", 1)[1]
            lines.append(
                f"{batch:>5}  {figure.value:>15.3f}  {figure.reference_value:>19.3f}  "
                f"{figure.ratio:>7.1f}x  {'>= 10x':>6}  {'yes' if figure.met else 'NO'}"
            )
    for figure in figures:
        if "floor" in figure.name:
            lines.append(
                f"FLOP floor (batch 128): {figure.reference_value:.3f} s/epoch "
                f"({figure.reference}); project/floor = {figure.ratio:.2f}x "
                f"(target <= 2x: {'yes' if figure.met else 'NO'})"
            )
    if any(figure.estimate for figure in figures):
        lines.append("quick mode: batch 128 only; reference extrapolated from a partial epoch")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="batch 128 only, partial epochs")
    args = parser.parse_args(argv)
    figures = run(Context(quick=args.quick))
    print(side_by_side(figures))


if __name__ == "__main__":
    main()
