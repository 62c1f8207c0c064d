"""Reading what workers left in a tracking store and a study storage, from the test
process, with the real clients (`MlflowClient`, `optuna.load_study`)."""

from __future__ import annotations

from dataclasses import dataclass


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
