"""The MLflow UI in a real browser, over a 3-trial study.

A module fixture trains a tiny 3-trial study through the installed CLI into a SQLite store
in a temporary folder, serves that store with `mlflow ui` on 127.0.0.1, and headless
Chromium (browser.py) reads the pages. Every assertion is on what the page renders: the
runs table nests the trials under the study's parent run, a trial's page shows its dataset
inputs and its `plots/` artifacts (one of them previewed), and the registered model's page
shows the `champion` alias on the best trial's version. The stores are read only for what
to expect and where to go (which version is the champion, run and experiment ids).

The MLflow UI is a React single-page app: nothing is there when a page has loaded, so each
step waits (up to browser.WAIT_S) for the text or element it needs. A failing step leaves
a screenshot and the page source (see browser.py).

About 35 s on two cores: 26 s to set up (the study, then the server), then a second or two
a page.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import WAIT_S
from conftest import BIN_DIR, run_cli
from stores import RUN_ID_ATTR, Stores, tiny_study
from tracking_server import HOST, ServerDied, start_server, stop, tail

pytest_plugins = ["browser"]
pytestmark = [pytest.mark.e2e, pytest.mark.browser]

EXPERIMENT = "browser-e2e"
MODEL = "browser-e2e-model"
STUDY = "ui-study"
TRIALS = ["trial-0", "trial-1", "trial-2"]
# The splits every training run logs as dataset inputs, with their contexts.
DATASETS = {"mnist-train": "training", "mnist-validation": "validation", "mnist-test": "test"}
PLOTS = {"training_curves.png", "confusion_matrix.png"}  # at least these, under plots/


@dataclass(frozen=True)
class Study:
    """A finished study: its store, and what the UI should show, read from the stores."""

    tracking_uri: str
    experiment_id: str
    trial_runs: dict[str, str]  # run name -> run id
    champion_version: str
    versions: list[str]


@dataclass(frozen=True)
class Ui:
    url: str
    study: Study
    driver: object

    def open(self, route: str) -> None:
        """A route of the single-page app, e.g. `/experiments/1` (its hash URL)."""
        self.driver.get(f"{self.url}/#{route}")


# --- the study, the server and the browser (module-scoped: set up once) ------------------


def ui_command(backend_url: str, artifacts: Path, port: int) -> list[str]:
    return [
        str(BIN_DIR / "mlflow"), "ui",
        "--backend-store-uri", backend_url,
        "--artifacts-destination", str(artifacts),
        "--host", HOST,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
    """A 3-trial study, run to its end through the CLI into its own SQLite stores."""
    folder = tmp_path_factory.mktemp("browser-study")
    stores = Stores(f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder / 'optuna.db'}")
    config = tiny_study(folder, STUDY, experiment=EXPERIMENT, registered_model=MODEL)
    # cwd: the experiment's artifacts go to ./mlruns when it is created.
    run_cli(
        "tune", str(config), "--no-download",
        cwd=folder,
        MLFLOW_TRACKING_URI=stores.tracking_uri,
        MNIST_TRACK_STORAGE=stores.storage_url,
    )  # fmt: skip
    trials = stores.trials(STUDY)
    best = max(trials, key=lambda trial: trial.value)
    return Study(
        tracking_uri=stores.tracking_uri,
        experiment_id=stores.client.get_experiment_by_name(EXPERIMENT).experiment_id,
        trial_runs={f"trial-{t.number}": t.user_attrs[RUN_ID_ATTR] for t in trials},
        champion_version=best.user_attrs["model_version"],
        versions=[t.user_attrs["model_version"] for t in trials],
    )


@pytest.fixture(scope="module")
def ui_server(study, tmp_path_factory) -> Iterator[str]:
    """`mlflow ui` over the study's store on a free port of 127.0.0.1; its URL."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    for folder in ("artifacts", "cwd"):
        (root / folder).mkdir()
    try:
        process, url = start_server(study.tracking_uri, root, command=ui_command)
    except (ServerDied, TimeoutError) as error:
        pytest.fail(f"{error}; end of its log:\n{tail(root / 'server.log')}", pytrace=False)
    try:
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def ui(browser, study, ui_server) -> Ui:
    """The browser on the served UI, switched to model training.

    MLflow 3.17's UI chooses an experiment's pages (GenAI overview or runs table) by the
    sidebar's GenAI / Model training switch, kept in the browser's local storage, and a
    fresh browser starts on GenAI whatever the experiment's `mlflow.experimentKind` tag
    says. So the test makes the choice a user makes once."""
    ui = Ui(ui_server, study, browser)
    ui.open("/experiments")
    switch = clickable(browser, "//*[@role='button'][normalize-space()='Model training']")
    switch.click()
    return ui


# --- waiting for the single-page app ----------------------------------------------------


def waiter(driver, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout)


def visible(driver, xpath: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return waiter(driver).until(
        ec.visibility_of_element_located((By.XPATH, xpath)), f"nothing visible at {xpath}"
    )


def clickable(driver, xpath: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return waiter(driver).until(
        ec.element_to_be_clickable((By.XPATH, xpath)), f"nothing clickable at {xpath}"
    )


def text_is(value: str) -> str:
    """XPath: an element whose own text is `value` (spaces normalized)."""
    return f"//*[normalize-space(text())='{value}']"


def words(element) -> str:
    # Chips render "@ champion" with a no-break space.
    return " ".join(element.text.replace("\xa0", " ").split())


# --- the pages --------------------------------------------------------------------------


def run_rows(driver) -> dict[str, int]:
    """Run name -> the row's position (aria-rowindex) in the runs table, for the rows it
    renders now."""
    from selenium.webdriver.common.by import By

    rows = {}
    for row in driver.find_elements(By.XPATH, "//*[@role='row'][.//a[contains(@href, '/runs/')]]"):
        for link in row.find_elements(By.XPATH, ".//a[contains(@href, '/runs/')]"):
            if link.text:
                rows[link.text] = int(row.get_attribute("aria-rowindex"))
    return rows


def test_the_runs_table_shows_the_study_with_its_trials(ui):
    driver = ui.driver
    ui.open("/experiments")
    clickable(driver, f"//a[normalize-space()='{EXPERIMENT}']").click()
    parent = visible(driver, f"//*[@role='row'][.//a[normalize-space()='{STUDY}']]")
    assert re.search(rf"/experiments/{ui.study.experiment_id}(/runs)?\b", driver.current_url)
    visible(driver, "//*[normalize-space()='4 matching runs']")
    # Nested: only the parent is a row of its own until it is expanded.
    assert list(run_rows(driver)) == [STUDY]

    # The expand button in the run-name cell (the parent's only such button).
    expand = "//button[contains(@data-component-id, 'runnamecellrenderer')]"
    parent.find_element("xpath", f".{expand}").click()
    visible(driver, f"//a[normalize-space()='{TRIALS[-1]}']")
    rows = run_rows(driver)
    assert sorted(rows) == sorted([STUDY, *TRIALS])
    # The trials are the rows right under their parent.
    below = sorted(rows[name] - rows[STUDY] for name in TRIALS)
    assert below == [1, 2, 3]


def trial_page(ui: Ui, name: str, tab: str = "") -> None:
    run_id = ui.study.trial_runs[name]
    ui.open(f"/experiments/{ui.study.experiment_id}/runs/{run_id}{tab}")
    visible(ui.driver, text_is(name))


def shown_datasets(driver) -> dict[str, str]:
    """Dataset name -> context, from the Datasets entry of a run's overview, including
    those an overflow "+N" button hides."""
    from selenium.webdriver.common.by import By

    section = visible(driver, "//h4[normalize-space()='Datasets']/..")
    dataset = ".//*[@role='button' and not(self::button)]"
    # The entry is drawn before the run's inputs arrive ("None"): wait for one.
    items = waiter(driver).until(
        lambda _: section.find_elements(By.XPATH, dataset), "no dataset in the Datasets entry"
    )
    for more in section.find_elements(By.XPATH, ".//button[@aria-haspopup='dialog']"):
        more.click()
        popover = visible(driver, "//*[@role='dialog']")
        items += popover.find_elements(By.XPATH, ".//*[@role='button']")
    shown = {}
    for item in items:
        # "<name> (<digest>)" on the first line, the context chip on the last.
        lines = item.text.splitlines()
        shown[lines[0].split(" (")[0]] = lines[-1].lower()  # chips are capitalized by CSS
    return shown


def test_a_trial_run_shows_its_parent_and_dataset_inputs(ui):
    trial_page(ui, "trial-0")
    parent = visible(ui.driver, "//*[@data-testid='key-value-Parent run']")
    assert STUDY in parent.text
    assert shown_datasets(ui.driver) == DATASETS


def test_a_trial_run_shows_its_plots(ui):
    driver = ui.driver
    trial_page(ui, "trial-0", "/artifacts")
    clickable(driver, text_is("plots")).click()
    for name in sorted(PLOTS):
        visible(driver, text_is(name))

    # A preview proves the file is served and decodes as an image, not only listed.
    clickable(driver, text_is("training_curves.png")).click()
    preview = visible(driver, "//img[starts-with(@src, 'blob:')]")
    decoded = "return arguments[0].complete && arguments[0].naturalWidth"
    waiter(driver).until(lambda d: d.execute_script(decoded, preview), "preview never decoded")


def test_the_model_page_shows_the_champion_alias(ui):
    driver = ui.driver
    ui.open(f"/models/{MODEL}")
    # The versions and the model's aliases come from two requests: wait for both.
    visible(driver, f"//a[normalize-space()='Version {ui.study.versions[-1]}']")
    visible(driver, "//*[@role='row'][contains(., 'champion')]")
    aliases = {}
    for version in ui.study.versions:
        row = visible(driver, f"//*[@role='row'][.//a[normalize-space()='Version {version}']]")
        aliases[version] = "@ champion" in words(row)
    assert aliases == {v: v == ui.study.champion_version for v in ui.study.versions}
