"""Models-from-code entry point: MLflow runs this file to build the served model, so the
model is code plus data files, never a pickle."""

from mlflow.models import set_model

from mnist_track.serving import DigitClassifier

set_model(DigitClassifier())
