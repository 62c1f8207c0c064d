"""Names and numbers that several modules share. It imports nothing, so the command line
can use them at load time without importing torch, MLflow or Optuna."""

DEFAULT_EXPERIMENT = "mnist-track"
DEFAULT_REGISTERED_MODEL = "mnist-classifier"
CHAMPION_ALIAS = "champion"  # the alias that follows the best version (`models:/NAME@champion`)

DATA_DIR_ENV = "MNIST_TRACK_DATA"  # folder of the four IDX files
STORAGE_ENV = "MNIST_TRACK_STORAGE"  # the Optuna storage URL, kept off command lines

TRAIN_SIZE = 60000  # images in MNIST's training file (split into train and validation)
TEST_SIZE = 10000

PROGRESS_EVERY = 20  # batches between progress reports within an epoch (~0.5 s of CNN)
# MLflow samples system metrics every 10 s by default and logs nothing for a shorter run:
# a trial of a few seconds would get none at all.
SYSTEM_METRICS_INTERVAL_SECONDS = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # image files `predict` picks from a folder
