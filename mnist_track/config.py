"""Training and study settings: frozen, validated, loaded from YAML.

Pydantic does the validation (unknown keys, wrong types, ranges) so every error names the
key that is wrong; `load_study_config` adds the file name. Nothing here imports torch,
MLflow or Optuna, so configs can be checked before anything heavy starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mnist_track.defaults import DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL, TRAIN_SIZE
from mnist_track.errors import MnistTrackError

PositiveInt = Annotated[int, Field(gt=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
TorchSeed = Annotated[int, Field(ge=-(2**63), lt=2**64)]  # what torch.manual_seed takes


class ConfigError(MnistTrackError, ValueError):
    """A config file or option that cannot be used; the message names file and key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainConfig(_Frozen):
    """Everything that decides what one training run computes."""

    model: Literal["mlp", "cnn"] = "mlp"  # classic MLP 784-128-64-10, or the small CNN
    hidden_sizes: tuple[PositiveInt, ...] = (128, 64)  # MLP hidden layers; CNN head layers
    channels: tuple[PositiveInt, ...] = (16, 32)  # CNN conv blocks; wider ones cost 3x more time
    dropout: float = Field(0.2, ge=0.0, lt=1.0)  # classic MLP recipe
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, allow_inf_nan=False)  # Adam's default works well on MNIST
    # Cosine decay to zero over the run: +0.2-0.3 points of test accuracy at no cost.
    lr_schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    batch_size: PositiveInt = 128  # good accuracy per second on a 2-core CPU
    # bf16: training's forward and backward under torch.autocast in bfloat16 (weights,
    # optimizer and evaluation stay float32). ~1.9x faster CNN steps on a CPU with native
    # bf16 (AVX512-BF16/AMX) or a recent GPU; ~10x slower where bf16 is emulated (AVX2).
    # auto: bf16 where the device has it natively, else fp32.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    epochs: PositiveInt = 10
    seed: TorchSeed = 0  # initialization, dropout, shuffling: same seed and device, same weights
    val_size: PositiveInt = 5000  # carved from the 60k training set
    split_seed: TorchSeed = 0  # kept apart from `seed` so every trial of a study shares one split
    train_limit: PositiveInt | None = None  # use only this many training images (smoke runs)
    test_limit: PositiveInt | None = None  # evaluate on only this many test images
    device: str = "auto"  # auto: CUDA, then MPS, then CPU

    @model_validator(mode="after")
    def _cnn_needs_channels(self) -> TrainConfig:
        if self.model == "cnn" and not self.channels:
            raise ValueError("a CNN needs at least one entry in 'channels'")
        if self.val_size >= TRAIN_SIZE:
            raise ValueError(
                f"val_size must leave training images (the training set has {TRAIN_SIZE})"
            )
        return self

    def to_params(self) -> dict[str, str]:
        """The whole config as one flat dict, as MLflow params are logged."""
        return {
            key: ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            for key, value in self.model_dump().items()
        }


class IntParam(_Frozen):
    type: Literal["int"]
    low: int
    high: int
    step: PositiveInt = 1
    log: bool = False

    @model_validator(mode="after")
    def _non_empty(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("a log range takes no step (Optuna samples it continuously)")
        return self


class FloatParam(_Frozen):
    type: Literal["float"]
    low: FiniteFloat
    high: FiniteFloat
    log: bool = False

    @model_validator(mode="after")
    def _non_empty(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        return self


class CategoricalParam(_Frozen):
    type: Literal["categorical"]
    choices: tuple[int | float | str, ...] = Field(min_length=1)


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"empty range: low ({low}) is greater than high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, got {low}")


ParamSpec = Annotated[IntParam | FloatParam | CategoricalParam, Field(discriminator="type")]

# Searchable keys: plain TrainConfig fields, plus two pairs that build a layer-size tuple
# (a layer count and a per-layer size sampled once per layer).
SCALAR_SEARCH_KEYS = ("dropout", "lr", "batch_size", "optimizer", "epochs")
LAYER_SEARCH_KEYS = {
    "hidden_layers": "hidden_sizes",
    "hidden_units": "hidden_sizes",
    "conv_layers": "channels",
    "conv_channels": "channels",
}
COUNT_KEYS = ("hidden_layers", "conv_layers")


TPE_OPTIONS = ("multivariate", "group", "constant_liar")


class SamplerConfig(_Frozen):
    type: Literal["tpe", "random"] = "tpe"
    # Seeded by default so studies are repeatable; Optuna's samplers take 0..2**32-1.
    seed: Annotated[int, Field(ge=0, lt=2**32)] | None = 0
    n_startup_trials: PositiveInt = 5  # random trials before TPE starts modelling
    # TPE's options are always passed to Optuna, never left to its defaults: those changed
    # in 5.0 (multivariate and constant liar off in 4.x, on in 5.x), and a study must
    # sample alike on either.
    multivariate: bool = True  # model parameters jointly: lr and width interact
    # Jointly within each set of parameters that occur together (a layer-1 size exists
    # only at depth 2); None: as multivariate.
    group: bool | None = None
    constant_liar: bool = True  # parallel workers treat running trials as bad: they spread out

    @model_validator(mode="after")
    def _tpe_options_need_tpe(self) -> SamplerConfig:
        given = [key for key in TPE_OPTIONS if key in self.model_fields_set]
        if self.type != "tpe" and given:
            raise ValueError(f"{', '.join(given)}: only the tpe sampler takes this option")
        if self.group and not self.multivariate:
            raise ValueError("group needs multivariate: true (it groups the joint model)")
        return self

    @property
    def grouped(self) -> bool:
        return self.multivariate if self.group is None else self.group


class PrunerConfig(_Frozen):
    type: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(3, ge=0)  # trials that always run to the end
    n_warmup_steps: int = Field(1, ge=0)  # epochs before a trial may be pruned


class StopConfig(_Frozen):
    """When the study as a whole has done enough before n_trials: decided from the trials
    in the shared storage, so every worker stops asking for new ones."""

    target: float | None = Field(None, gt=0.0, le=1.0)  # a validation accuracy that is enough
    patience: PositiveInt | None = None  # counted trials in a row that did not beat the best

    @model_validator(mode="after")
    def _a_rule(self) -> StopConfig:
        if self.target is None and self.patience is None:
            raise ValueError("give target, patience or both")
        return self


class StudyConfig(_Frozen):
    """An Optuna study: what to search, how long, and where its models go."""

    study_name: str = Field(min_length=1)
    registered_model: str = Field(DEFAULT_REGISTERED_MODEL, min_length=1)
    experiment: str = Field(DEFAULT_EXPERIMENT, min_length=1)
    objective: Literal["validation_accuracy"] = "validation_accuracy"  # maximized
    n_trials: PositiveInt | None = 20
    timeout: float | None = Field(None, gt=0)  # seconds for this invocation
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    train: TrainConfig = TrainConfig()  # fixed settings; the search space overrides them
    search_space: dict[str, ParamSpec] = Field(min_length=1)
    # Trials to run first, each a mapping of trial parameters (as Optuna names them:
    # lr, hidden_layers, hidden_units_l0, ...); parameters left out are sampled. Queued
    # once, when the study is created.
    warm_start: tuple[dict[str, Any], ...] = ()
    stop: StopConfig | None = None  # stop early; None: run all n_trials
    # A trial whose process died is failed (and re-run) once its heartbeat is this old.
    heartbeat_interval: PositiveInt = 5
    grace_period: PositiveInt = 20

    @model_validator(mode="after")
    def _known_search_keys(self) -> StudyConfig:
        allowed = set(SCALAR_SEARCH_KEYS) | set(LAYER_SEARCH_KEYS)
        for key, spec in self.search_space.items():
            if key not in allowed:
                searchable = ", ".join(sorted(allowed))
                raise ValueError(f"search_space.{key}: unknown parameter; searchable: {searchable}")
            if key in COUNT_KEYS and isinstance(spec, IntParam) and spec.low < 1:
                raise ValueError(f"search_space.{key}: a layer count needs low >= 1")
            _check_domain(key, spec, self.train)
        for index, params in enumerate(self.warm_start):
            _check_warm_start(f"warm_start[{index}]", params, self.search_space, self.train)
        if self.n_trials is not None and len(self.warm_start) > self.n_trials:
            raise ValueError(
                f"warm_start: {len(self.warm_start)} trials do not fit in n_trials "
                f"({self.n_trials})"
            )
        if self.n_trials is None and self.timeout is None:
            raise ValueError("set n_trials, timeout or both, or the study never ends")
        if self.grace_period <= self.heartbeat_interval:
            # A live worker that beats every `heartbeat_interval` must never look dead.
            raise ValueError(
                f"grace_period ({self.grace_period}) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval})"
            )
        return self


def _check_domain(key: str, spec: IntParam | FloatParam | CategoricalParam, base: TrainConfig):
    """Every value the sampler can draw for `key` must make a valid TrainConfig, or every
    trial fails on its own: the bounds, and a value just above the low one (an integer
    setting cannot take a float range), or each choice."""
    if isinstance(spec, CategoricalParam):
        samples = [("choices", choice) for choice in spec.choices]
    else:
        samples = [("low", spec.low), ("high", spec.high)]
        if isinstance(spec, FloatParam) and spec.low < spec.high:
            samples.append(("", math.nextafter(spec.low, spec.high)))
    for where, value in samples:
        problem = _train_problem(key, value, base)
        if problem is None:
            continue
        if where:
            raise ValueError(f"search_space.{key}.{where}: {value!r} {problem}")
        raise ValueError(
            f"search_space.{key}: a float range draws values such as {value!r}, which "
            f"{problem}; use type int or categorical"
        )


def _check_warm_start(where: str, params: dict[str, Any], space: dict[str, ParamSpec], base):
    """Every parameter of a warm-start trial must be one the search space draws for that
    trial, with a value it could draw: else Optuna would run the trial with a value out
    of range, or fail it."""
    specs = _trial_params(params, space, base)
    for name, value in params.items():
        spec = specs.get(name)
        if spec is None:
            takes = ", ".join(specs)
            raise ValueError(f"{where}.{name}: not a parameter of this trial; it takes: {takes}")
        problem = _outside(spec, value)
        if problem is not None:
            raise ValueError(f"{where}.{name}: {value!r} {problem}")


def _trial_params(params: dict[str, Any], space: dict[str, ParamSpec], base: TrainConfig):
    """The parameters a trial with these (partly) fixed values draws, by Optuna name, with
    the spec each is drawn from: the layer sizes `hidden_units_l<i>` for each layer of its
    depth (the fixed depth, the given one, or else the deepest the space allows)."""
    specs = {key: spec for key, spec in space.items() if key in SCALAR_SEARCH_KEYS}
    for count_key, size_key, size_field in (
        ("hidden_layers", "hidden_units", "hidden_sizes"),
        ("conv_layers", "conv_channels", "channels"),
    ):
        count_spec = space.get(count_key)
        if count_spec is not None:
            specs[count_key] = count_spec
        if size_key not in space:
            continue
        depth = len(getattr(base, size_field))
        if count_spec is not None:
            given = params.get(count_key)
            depth = int(given) if _outside(count_spec, given) is None else _most(count_spec)
        specs |= {f"{size_key}_l{layer}": space[size_key] for layer in range(depth)}
    return specs


def _most(spec: IntParam | FloatParam | CategoricalParam) -> int:
    if isinstance(spec, CategoricalParam):
        return max(spec.choices)
    return int(spec.high)


def _outside(spec: IntParam | FloatParam | CategoricalParam, value: Any) -> str | None:
    """Why the sampler could never draw `value` from `spec`; None if it could."""
    if isinstance(spec, CategoricalParam):
        if isinstance(value, bool) or value not in spec.choices:
            return f"is not one of the choices {list(spec.choices)}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not a number"
    if isinstance(spec, IntParam) and not isinstance(value, int):
        return "is not a whole number (the range is int)"
    if not spec.low <= value <= spec.high:
        return f"is outside the range {spec.low}..{spec.high}"
    if isinstance(spec, IntParam) and (value - spec.low) % spec.step:
        return f"is not on the range's steps ({spec.low}, {spec.low + spec.step}, ...)"
    return None


def _train_problem(key: str, value: Any, base: TrainConfig) -> str | None:
    """Why a TrainConfig cannot take `value` for search key `key`; None if it can."""
    if key in COUNT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return "is not a layer count (a whole number >= 1)"
        return None
    field = LAYER_SEARCH_KEYS.get(key, key)
    setting = (value,) if key in LAYER_SEARCH_KEYS else value
    try:
        TrainConfig.model_validate(base.model_dump() | {field: setting})
    except ValidationError as error:
        reason = "; ".join(problem["msg"] for problem in error.errors())
        return f"is not a valid {field}: {reason}"
    return None


def load_train_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from an optional YAML file (top level or its `train:` section) plus
    CLI overrides (None values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
        # A study file holds the training settings under `train:` (default: none).
        data = dict(raw.get("train") or {}) if "search_space" in raw else dict(raw)
    data.update({key: value for key, value in overrides.items() if value is not None})
    return _validate(TrainConfig, data, path)


def load_study_config(path: str | Path, overrides: dict[str, Any]) -> StudyConfig:
    """A StudyConfig from YAML; CLI overrides (None values are ignored) win over the file
    and are validated with it. A dotted key reaches into a section: `train.device`."""
    data = _read_yaml(path)
    for key, value in overrides.items():
        if value is not None:
            _override(data, key.split("."), value)
    data.setdefault("study_name", Path(path).stem)
    return _validate(StudyConfig, data, path)


def _override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    *sections, leaf = keys
    for section in sections:
        data = data.setdefault(section, {})
        if not isinstance(data, dict):
            return  # the file's section is no mapping: validation names it
    data[leaf] = value


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}): save it as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _validate(model: type[BaseModel], data: dict[str, Any], path: str | Path | None):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + _describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        # Drop the discriminator tag pydantic puts in the location of union members.
        loc = [part for part in problem["loc"] if part not in ("int", "float", "categorical")]
        # An entry of a list reads as it is written in the messages: warm_start[1].lr
        parts = (f"[{part}]" if isinstance(part, int) else str(part) for part in loc)
        key = ".".join(parts).replace(".[", "[")
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)
