"""Headless Chromium for tests marked `browser`, through Selenium.

The module fixture `browser` starts Debian's Chromium (`chromium`) with its matching
driver (`chromedriver`, package `chromium-driver`), both from PATH, headless at a fixed
window size, and quits it at the end of the module. The driver's path is given to Selenium
explicitly, so Selenium Manager never runs (it would try to download a driver).

Missing Chromium, driver or Selenium (the `dev` extra) skip the tests, unless
MNIST_TRACK_REQUIRE_BROWSER=1 is set: then they fail, so CI cannot pass without them.

When a test that uses `browser` fails, a screenshot and the page source are saved as
`<test>.png` and `<test>.html` in $MNIST_TRACK_TEST_ARTIFACTS/browser (default
test-artifacts/browser in the repository, git-ignored); the report names the folder.

Use it from a test module with `pytest_plugins = ["browser"]`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT

REQUIRE_ENV = "MNIST_TRACK_REQUIRE_BROWSER"
ARTIFACTS_ENV = "MNIST_TRACK_TEST_ARTIFACTS"
WINDOW = (1600, 1000)  # wide enough for the runs table and a run's side panel
WAIT_S = 30.0  # for a page to render; generous for two busy cores
ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-dev-shm-usage",  # containers have a tiny /dev/shm
    "--disable-gpu",
    # Nothing beyond the page under test: no updates, sync or field trials fetched.
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)


def unavailable(reason: str):
    """Skip, or fail when the browser is required."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"a browser is required ({REQUIRE_ENV}=1) but {reason}", pytrace=False)
    pytest.skip(f"browser not available: {reason} (set {REQUIRE_ENV}=1 to fail instead)")


def artifacts_dir() -> Path:
    base = os.environ.get(ARTIFACTS_ENV)
    return (Path(base) if base else REPO_ROOT / "test-artifacts") / "browser"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """A headless Chromium WebDriver, quit at the end of the module."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[dev]')")
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None:
        unavailable("no `chromium` on PATH (apt-get install chromium)")
    if driver_path is None:
        unavailable("no `chromedriver` on PATH (apt-get install chromium-driver)")

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ARGUMENTS:
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as error:
        unavailable(f"Chromium did not start: {error.msg}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    driver = getattr(item, "funcargs", {}).get("browser")
    if report.failed and driver is not None:
        report.sections.append(("browser", f"saved {save_page(driver, item.name)}"))
    return report


def save_page(driver, name: str) -> str:
    """The page's screenshot and source, named after the test; returns where, or why not."""
    folder = artifacts_dir()
    stem = re.sub(r"[^\w-]+", "_", name)  # parametrized names hold brackets and slashes
    try:
        folder.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(folder / f"{stem}.png"))
        source = f"<!-- {driver.current_url} -->\n{driver.page_source}"
        (folder / f"{stem}.html").write_text(source, encoding="utf-8")
    except Exception as error:  # a dead browser must not hide the test's own failure
        return f"no screenshot: {type(error).__name__}: {error}"
    return f"{folder / stem}.png and .html"
