# Two commands set everything up on a fresh machine:
#   make demo   - virtual environment, install, and a one-minute Optuna study, tracked in MLflow
#   make test   - virtual environment, install, and the test suite
VENV ?= .venv
PYTHON ?= python3
# Offline machines keep MNIST in ../shared/mnist; elsewhere the files are fetched into ./data.
export MNIST_TRACK_DATA ?= $(if $(wildcard ../shared/mnist/*.gz),$(abspath ../shared/mnist),data)

.PHONY: demo train test bench bench-quick lint ui clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mnist-track tune experiments/quick.yaml

train: $(VENV)/.installed
	$(VENV)/bin/mnist-track train

test: $(VENV)/.installed
	$(VENV)/bin/pytest

bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks

bench-quick: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks --quick

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

ui: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) mlruns mlflow.db optuna.db mlflow.db.lock optuna.db.lock bench-results
