"""Tiny studies for end-to-end tests: writing their configs, and reading what workers
left in a tracking store and a study storage, from the test process, with the real
clients (`MlflowClient`, `optuna.load_study`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RUN_ID_ATTR = "mlflow_run_id"  # the trial user attr naming its MLflow run
ROLE_TAG = "mnist_track.role"  # "study" on a study's parent run

# Tiny trials: about 1 s of training, then plots and the model (a few seconds).
TRAIN = {
    "model": "mlp",
    "epochs": 2,
    "batch_size": 128,
    "train_limit": 1500,
    "val_size": 500,
    "test_limit": 500,
    "hidden_sizes": [32],
}


def tiny_study(folder: Path, name: str, **settings: Any) -> Path:
    """A study YAML `folder/<name>.yaml` of n_trials 3, random sampling of lr, no pruning;
    `settings` replace its top-level entries, and its `train` entries are laid over TRAIN."""
    config: dict[str, Any] = {
        "study_name": name,
        "n_trials": 3,
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    }
    config.update(settings)
    config["train"] = TRAIN | settings.get("train", {})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(frozen=True)
class Stores:
    """An MLflow tracking store (and its registry) and an Optuna storage."""

    tracking_uri: str
    storage_url: str

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def study(self, name: str):
        import optuna

        return optuna.load_study(study_name=name, storage=self.storage_url)

    def trials(self, name: str) -> list:
        return sorted(self.study(name).get_trials(deepcopy=False), key=lambda t: t.number)

    def experiment_runs(self, experiment: str, filter_string: str = "") -> list:
        """Every run of `experiment` (any status, deleted ones too), oldest first."""
        from mlflow.entities import ViewType

        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return self.client.search_runs(
            [found.experiment_id],
            filter_string,
            run_view_type=ViewType.ALL,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
        )

    def model_versions(self, model: str) -> list:
        """Every version of `model`, oldest first."""
        versions = self.client.search_model_versions(f"name = '{model}'")
        return sorted(versions, key=lambda v: int(v.version))
