"""Read a logged mnist-track model's files into a network, never executing code from the
model.

A models-from-code model is code: `mlflow.pyfunc.load_model` (and `mlflow models serve`)
runs the model's `model_code.py` and imports its `code/` folder, so "no pickle" does not
make a foreign model safe to load. Here only three data files are fetched (MLmodel as
YAML, the architecture as JSON, the weights as safetensors), checked against what
`tracking.log_model` writes, and the network is built by the installed package. A model
that mnist-track did not log, or whose files disagree, is refused with `ForeignModel`.
"""

from __future__ import annotations

import json
import math
import posixpath
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from mnist_track import model_folder, tracking
from mnist_track.errors import MnistTrackError
from mnist_track.models import IMAGE_SIDE, build_model
from mnist_track.serving import ARCHITECTURE_ARTIFACT, WEIGHTS_ARTIFACT, DigitClassifier

MLMODEL_FILE = model_folder.MLMODEL_FILE
ARTIFACTS_FOLDER = "artifacts"  # where pyfunc keeps a model's artifacts
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's models-from-code loader
ARTIFACT_PATHS = {
    WEIGHTS_ARTIFACT: f"{ARTIFACTS_FOLDER}/{model_folder.WEIGHTS_FILE}",
    ARCHITECTURE_ARTIFACT: f"{ARTIFACTS_FOLDER}/{model_folder.ARCHITECTURE_FILE}",
}
MAX_TEXT_BYTES = 1 << 20  # MLmodel and architecture.json; ours are about 1 KB
MAX_LAYERS = 64  # far beyond any network here; keeps a hostile list from costing minutes
# Each conv block halves the side (28 -> 14 -> 7 -> 3 -> 1): a fifth leaves nothing.
MAX_CONV_BLOCKS = int(math.log2(IMAGE_SIDE))
ARCHITECTURE_KEYS = {
    "mlp": {"model", "hidden_sizes", "dropout"},
    "cnn": {"model", "hidden_sizes", "dropout", "channels"},
}


class ForeignModel(MnistTrackError, ValueError):
    """A model mnist-track did not log, or whose files were altered: refused, not loaded."""


def load_classifier(model_uri: str) -> DigitClassifier:
    """The model at `model_uri` as the served model's classifier (same input decoding and
    probabilities), built from its weights and architecture by this package; its MLmodel,
    weights and architecture must be what `tracking.log_model` writes."""
    artifacts = tracking.ModelArtifacts(model_uri)
    with tempfile.TemporaryDirectory() as folder:
        mlmodel = _fetch(artifacts, MLMODEL_FILE, Path(folder), model_uri)
        check_mlmodel(_read_text(mlmodel, model_uri), model_uri)
        paths = {
            name: _fetch(artifacts, path, Path(folder), model_uri)
            for name, path in ARTIFACT_PATHS.items()
        }
        architecture = read_architecture(paths[ARCHITECTURE_ARTIFACT], model_uri)
        check_weights(paths[WEIGHTS_ARTIFACT], architecture, model_uri)
        # The installed serving code, given only the two data files: the model's own
        # model_code.py and code/ folder are never fetched, let alone run.
        return DigitClassifier.from_data_files(paths)


def _fetch(artifacts: tracking.ModelArtifacts, path: str, folder: Path, model_uri: str) -> Path:
    """One file of the model, checked present (and small, unless it is the weights) before
    it is downloaded."""
    parent, name = posixpath.split(path)
    listed = artifacts.files(parent)
    if name not in listed:
        raise _refusal(model_uri, f"it has no {path}")
    size = listed[name]
    if name != model_folder.WEIGHTS_FILE and size is not None and size > MAX_TEXT_BYTES:
        raise _refusal(model_uri, f"its {path} is {size} bytes")
    return artifacts.download(path, folder)


def _read_text(path: Path, model_uri: str) -> str:
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise _refusal(model_uri, f"its {path.name} is {path.stat().st_size} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _refusal(model_uri, f"its {path.name} is not UTF-8 text") from None


def check_mlmodel(text: str, model_uri: str) -> None:
    """MLmodel must describe a models-from-code pyfunc built by our model_code.py with
    exactly our two artifacts."""
    try:
        mlmodel = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        raise _refusal(model_uri, "its MLmodel is not valid YAML") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    if not isinstance(pyfunc, dict):
        raise _refusal(model_uri, "its MLmodel has no python_function flavor")
    loader = pyfunc.get("loader_module")
    code = pyfunc.get("model_code_path")
    if loader != CODE_MODEL_LOADER or not isinstance(code, str):
        raise _refusal(model_uri, f"its python_function loader is {_short(loader)}, not ours")
    if posixpath.basename(code.replace("\\", "/")) != model_folder.MODEL_CODE.name:
        raise _refusal(
            model_uri, f"its python model is {_short(code)}, not {model_folder.MODEL_CODE.name}"
        )
    declared = pyfunc.get("artifacts")
    paths = (
        {name: entry.get("path") for name, entry in declared.items() if isinstance(entry, dict)}
        if isinstance(declared, dict)
        else None
    )
    if paths != ARTIFACT_PATHS:
        raise _refusal(
            model_uri, f"its MLmodel declares the artifacts {_short(paths)}, not {ARTIFACT_PATHS}"
        )


def read_architecture(path: Path, model_uri: str) -> dict[str, Any]:
    """The architecture JSON, if it is one `models.architecture_of` could have written."""
    try:
        architecture = json.loads(_read_text(path, model_uri))
    except (ValueError, RecursionError):
        raise _refusal(model_uri, "its architecture.json is not valid JSON") from None
    problem = _architecture_problem(architecture)
    if problem:
        raise _refusal(model_uri, f"its architecture.json {problem}")
    return architecture


def _architecture_problem(architecture: Any) -> str | None:
    if not isinstance(architecture, dict):
        return "is not a JSON object"
    family = architecture.get("model")
    if family not in ARCHITECTURE_KEYS:
        return f"names the model family {_short(family)}, not 'mlp' or 'cnn'"
    if set(architecture) != ARCHITECTURE_KEYS[family]:
        return (
            f"has the keys {_short(sorted(architecture))}, not {sorted(ARCHITECTURE_KEYS[family])}"
        )
    sizes = _sizes_problem(architecture["hidden_sizes"], "hidden_sizes", 0, MAX_LAYERS)
    if sizes:
        return sizes
    if family == "cnn":
        channels = _sizes_problem(architecture["channels"], "channels", 1, MAX_CONV_BLOCKS)
        if channels:
            return channels
    dropout = architecture["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        return f"has a dropout of {_short(dropout)}, not a number"
    if not 0 <= dropout < 1:
        return f"has a dropout of {dropout!r}, not in [0, 1)"
    return None


def _sizes_problem(sizes: Any, key: str, fewest: int, most: int) -> str | None:
    if (
        not isinstance(sizes, list)
        or not fewest <= len(sizes) <= most
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
    ):
        return f"has {key} {_short(sizes)}, not a list of {fewest} to {most} positive integers"
    return None


def check_weights(path: Path, architecture: Mapping[str, Any], model_uri: str) -> None:
    """The safetensors file must hold float32 tensors with exactly the names and shapes
    of the network `architecture` describes (read from its header, nothing allocated)."""
    from safetensors import SafetensorError, safe_open

    try:
        with torch.device("meta"):  # shapes only: no memory, however large the claim
            network = build_model(architecture)
    except (RuntimeError, TypeError, ValueError, OverflowError):
        raise _refusal(model_uri, "its architecture.json describes no buildable network") from None
    expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as weights:
            names = weights.keys()  # a safetensors file handle is not iterable itself
            found = {key: weights.get_slice(key) for key in names}
            shapes = {key: tuple(item.get_shape()) for key, item in found.items()}
            dtypes = {key: item.get_dtype() for key, item in found.items()}
    except (SafetensorError, OSError, ValueError):
        raise _refusal(model_uri, "its model.safetensors is not a safetensors file") from None
    if set(shapes) != set(expected):
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        raise _refusal(
            model_uri,
            f"its weights do not fit its architecture (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})",
        )
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise _refusal(
                model_uri,
                f"its weight {key} has the shape {list(shapes[key])}, the architecture "
                f"needs {list(shape)}",
            )
        if dtypes[key] != "F32":
            raise _refusal(model_uri, f"its weight {key} is {dtypes[key]}, not float32 (F32)")


def _short(value: Any) -> str:
    """A value from a foreign file, cut short for a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refusal(model_uri: str, reason: str) -> ForeignModel:
    return ForeignModel(
        f"refusing {model_uri}: not a model mnist-track logged ({reason}); "
        "predict reads only mnist-track's own models and never runs a model's code"
    )
