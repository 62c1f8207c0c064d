"""What the MLflow UI says about runs and models (mnist_track.descriptions)."""

from __future__ import annotations

from mnist_track import descriptions


def test_params_read_as_a_person_writes_them():
    line = descriptions.params_line({"hidden_layers": 2, "lr": 0.00123456, "optimizer": "adam"})
    assert line == "hidden_layers=2, lr=0.00123, optimizer=adam"


def test_a_version_names_its_origin_and_links_its_run():
    text = descriptions.version(
        architecture="MLP 784-128-64-10",
        validation_accuracy=0.97654,
        test_accuracy=0.9712,
        run_id="abc",
        experiment_id="7",
        study="quick",
        trial=3,
    )
    assert text.startswith("**MLP 784-128-64-10**, from trial 3 of study `quick`.")
    assert "validation accuracy: 0.9765" in text and "test accuracy: 0.9712" in text
    assert "[abc](#/experiments/7/runs/abc)" in text
    trained = descriptions.version(
        architecture="CNN", validation_accuracy=0.99, test_accuracy=0.99, run_id="r",
        experiment_id="1",
    )  # fmt: skip
    assert "from `mnist-track train`" in trained


def test_a_study_note_gains_its_best_trial():
    plain = descriptions.study_note(
        "quick", n_trials=6, searched=["lr", "dropout"], registered_model="m"
    )
    assert plain.startswith("Optuna study `quick`: 6 trials searching lr, dropout;")
    assert "Best trial" not in plain
    best = descriptions.study_note(
        "quick", n_trials=None, searched=["lr"], registered_model="m", best=(4, 0.98, {"lr": 0.01})
    )
    assert "trials until its timeout" in best
    assert best.endswith("**Best trial**: 4, validation accuracy 0.9800 (lr=0.01).")
    stopped = descriptions.study_note(
        "quick", n_trials=6, searched=["lr"], registered_model="m", stopped="target 0.9 reached"
    )
    assert stopped.endswith("**Stopped early**: target 0.9 reached.")


def test_the_registered_model_says_how_to_serve_it():
    text = descriptions.registered_model("digits")
    assert 'mlflow models serve -m "models:/digits@champion"' in text
    assert "784" in text and "probabilities" in text
