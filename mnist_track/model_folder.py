"""The folder of a model as mnist-track logs it (`tracking.log_model` uploads it): what
`mlflow.pyfunc.save_model` writes for the served model's code, weights and architecture,
and the check MLflow's log_model makes before an upload (the folder loads and scores its
own input example).

A study logs a model per trial, and every one has the same code, environment, signature
and input example: only the weights, the architecture and the model's identity (its id,
run, artifact location and time) differ. So MLflow saves and checks the first model of a
process, and its files become the process's template. Each later folder is the template
with its own two data files and identity: the bytes MLflow would write (the tests compare
them), in about 8 ms rather than 55. Its check loads those two files into the served
model's class and scores the example (about 2 ms of CPU rather than 40): what MLflow's
check adds (reading MLmodel three times, importing the code folder) is the same for every
folder and was passed by the template's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME as MLMODEL_FILE

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CODE = PACKAGE_DIR / "model_code.py"
# The model's data files, under its artifacts/ folder (`model_files` reads them back).
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.json"
# What the served model imports: only these go into its code/ folder (each file is one
# upload to a tracking server, and the rest of the package is not the model's business).
# Not model_code.py: MLflow runs its own copy at the model's top, and nothing imports it.
SERVED_MODULES = (
    "__init__.py",
    "errors.py",
    "pixels.py",
    "models.py",
    "serving.py",
)
# The MLmodel fields that name one model; the rest are its template's.
IDENTITY_FIELDS = ("artifact_path", "run_id", "model_id", "model_uuid", "utc_time_created")
# The module name MLflow gives a models-from-code file each time it runs it.
CODE_MODEL_MODULE_PREFIX = "code_model_"

Check = Callable[[], None]


@functools.cache
def pip_requirements() -> tuple[str, ...]:
    """Explicit requirements (inferring them costs seconds per model): the packages the
    served model imports, pinned to the versions that trained it."""
    names = ["mlflow", "torch", "numpy", "pandas", "safetensors", "pillow"]
    return tuple(f"{name}=={installed_version(name).split('+')[0]}" for name in names)


@dataclass(frozen=True)
class _Template:
    """A folder MLflow saved and that passed MLflow's check, less its own data."""

    files: Mapping[str, bytes]  # by relative path: all but MLmodel and the two data files
    mlmodel: Mapping[str, Any]  # its MLmodel's fields
    data_bytes: int  # the size of its two data files, part of MLmodel's model_size_bytes


# One template per input example (in practice one per process), made by the first model
# whose folder passes MLflow's check.
_templates: dict[bytes, _Template] = {}
_templates_lock = threading.Lock()


def save(
    path: Path,
    identity: Model,
    state_dict: Mapping[str, Any],
    architecture: Mapping[str, Any],
    example_pixels: np.ndarray,
    scratch: Path,
) -> Check:
    """Write the model's folder at `path` (`identity` holds its id, run, artifact location
    and time; `scratch` is an empty folder for files on their way in). Returns its check,
    for the caller to run while the files upload: it warns, as MLflow's log_model does,
    if the model cannot score its own input example. Saving and checking with MLflow
    import the model's code: the caller undoes that (`imports_undone`)."""
    data_files = _write_data_files(scratch, state_dict, architecture)
    key = _template_key(example_pixels)
    template = _templates.get(key)
    if template is not None:
        _fill_template(template, path, identity, data_files)
        return lambda: _check_data_files(path, template, example_pixels)
    _save_with_mlflow(path, identity, data_files, scratch, example_pixels)
    made = _template_of(path, data_files)

    def check_then_keep() -> None:
        if _check_with_mlflow(path):
            with _templates_lock:
                _templates.setdefault(key, made)

    return check_then_keep


def forget_templates() -> None:
    """The next model is saved by MLflow again (tests; a process whose package changed)."""
    with _templates_lock:
        _templates.clear()


def _template_key(example_pixels: np.ndarray) -> bytes:
    return f"{example_pixels.dtype.str}{example_pixels.shape}".encode() + example_pixels.tobytes()


def _write_data_files(
    scratch: Path, state_dict: Mapping[str, Any], architecture: Mapping[str, Any]
) -> dict[str, Path]:
    """The weights (safetensors) and architecture (JSON) under `scratch`, by the name of
    the artifact the served model loads them as."""
    from safetensors.torch import save_file

    from mnist_track.serving import ARCHITECTURE_ARTIFACT, WEIGHTS_ARTIFACT

    scratch.mkdir(parents=True, exist_ok=True)
    weights, architecture_path = scratch / WEIGHTS_FILE, scratch / ARCHITECTURE_FILE
    save_file(
        {key: value.detach().cpu().contiguous() for key, value in state_dict.items()},
        str(weights),
    )
    architecture_path.write_text(json.dumps(dict(architecture), indent=2))
    return {WEIGHTS_ARTIFACT: weights, ARCHITECTURE_ARTIFACT: architecture_path}


def _save_with_mlflow(path, identity, data_files, scratch, example_pixels) -> None:
    from mnist_track.serving import model_signature

    code = scratch / "code" / PACKAGE_DIR.name
    code.mkdir(parents=True)
    for module in SERVED_MODULES:
        shutil.copy2(PACKAGE_DIR / module, code / module)
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(MODEL_CODE),
        artifacts={name: str(file) for name, file in data_files.items()},
        code_paths=[str(code)],
        signature=model_signature(),
        input_example=example_pixels,
        pip_requirements=list(pip_requirements()),
        mlflow_model=identity,
    )
    for cache in list(path.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)


def _artifacts_of(mlmodel: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The MLmodel's artifacts: name -> {"path": in the folder, "uri": where it came from}."""
    return mlmodel["flavors"]["python_function"]["artifacts"]


def _template_of(path: Path, data_files: Mapping[str, Path]) -> _Template:
    mlmodel = Model.load(str(path / MLMODEL_FILE)).to_dict()
    own = {MLMODEL_FILE, *(entry["path"] for entry in _artifacts_of(mlmodel).values())}
    files = {
        file.relative_to(path).as_posix(): file.read_bytes()
        for file in sorted(path.rglob("*"))
        if file.is_file() and file.relative_to(path).as_posix() not in own
    }
    return _Template(files, mlmodel, _size_of(data_files))


def _size_of(data_files: Mapping[str, Path]) -> int:
    return sum(file.stat().st_size for file in data_files.values())


def _fill_template(
    template: _Template, path: Path, identity: Model, data_files: Mapping[str, Path]
) -> None:
    """The template's files, this model's data files, and the template's MLmodel with
    this model's identity, its data files' origin and its size."""
    for relative, content in template.files.items():
        (path / relative).parent.mkdir(parents=True, exist_ok=True)
        (path / relative).write_bytes(content)
    mlmodel = copy.deepcopy(dict(template.mlmodel))
    own = identity.to_dict()
    for field in IDENTITY_FIELDS:
        mlmodel.pop(field, None)
        if field in own:
            mlmodel[field] = own[field]
    for name, entry in _artifacts_of(mlmodel).items():
        (path / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_files[name], path / entry["path"])
        entry["uri"] = str(data_files[name])
    if "model_size_bytes" in mlmodel:  # MLflow leaves it out where it could not add up
        size = mlmodel["model_size_bytes"] - template.data_bytes + _size_of(data_files)
        mlmodel["model_size_bytes"] = size
    Model.from_dict(mlmodel).save(str(path / MLMODEL_FILE))


def _check_with_mlflow(path: Path) -> bool:
    """What MLflow's log_model checks before it uploads: the saved model loads and scores
    its own input example (a warning if not, as MLflow's)."""
    try:
        # No check of the requirements against this environment: they were pinned from
        # it (pip_requirements), and the check reads every package's metadata.
        model = mlflow.pyfunc.load_model(str(path), suppress_warnings=True)
        # The loaded model's MLmodel, not a second read of it (its YAML parse is ~4 ms).
        example = model.metadata.load_input_example(str(path))
        if example is not None:
            model.predict(example)
    except Exception as error:  # noqa: BLE001 - MLflow warns and logs the model anyway
        _warn_unscored(error)
        return False
    return True


def _check_data_files(path: Path, template: _Template, example_pixels: np.ndarray) -> None:
    """A folder made from the template: its own two files, loaded by the served model's
    class as MLflow would load them, score the example."""
    from mnist_track.serving import DigitClassifier

    try:
        artifacts = _artifacts_of(template.mlmodel)
        classifier = DigitClassifier.from_data_files(
            {name: path / entry["path"] for name, entry in artifacts.items()}
        )
        classifier.predict(None, example_pixels)
    except Exception as error:  # noqa: BLE001 - as _check_with_mlflow
        _warn_unscored(error)


def _warn_unscored(error: Exception) -> None:
    logging.getLogger(__name__).warning(
        "the logged model cannot score its own input example: %s", error
    )


@contextlib.contextmanager
def imports_undone(folder: str | Path) -> Iterator[None]:
    """Take back what saving and loading a models-from-code model under `folder` leave in
    this process: MLflow puts the model's code/ folder first on sys.path and keeps the run
    model_code.py in sys.modules (as code_model_<uuid>, once on save, once on load). A
    worker logs a model per trial into a folder deleted after upload: left in place,
    sys.path would grow by one dead folder and sys.modules by two modules every trial."""
    root = str(folder).rstrip(os.sep)
    modules = set(sys.modules)
    try:
        yield
    finally:
        sys.path[:] = [
            entry
            for entry in sys.path
            if not (isinstance(entry, str) and (entry + os.sep).startswith(root + os.sep))
        ]
        for name in set(sys.modules) - modules:
            if name.startswith(CODE_MODEL_MODULE_PREFIX):
                sys.modules.pop(name, None)
