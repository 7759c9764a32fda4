"""The operator UI as an operator sees it: the Django admin in headless Chromium (Debian's chromium and its
chromedriver, installed by the preflight of `make test`), against a real race, a real hibernation (worker,
marketplace, SSH, restic, S3) and the real savings page with its chart drawn.

`DUMONT_SCREENSHOTS=docs/screenshots pytest tests/e2e/test_operator_ui.py` refreshes the README's screenshots.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from instances.models import Instance
from tests.e2e.test_race import STACK_SETTINGS as RACE_SETTINGS
from tests.e2e.test_race import launch, wait_for_status, wait_settled
from tests.factories import make_user
from tests.harness import REPO_ROOT, wait_until
from tests.snapshots.helpers import make_workspace

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
STACK_SERVICES = {"s3"}  # hibernation takes a real snapshot
STACK_SETTINGS = RACE_SETTINGS
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,800", "--hide-scrollbars")
# how many canvas pixels a drawn bar chart has at least (axes, ticks and labels alone are thousands)
DRAWN_PIXELS = 1000


@pytest.fixture
def browser(tmp_path) -> Iterator[webdriver.Chrome]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("chromium and chromedriver are missing: `make test` (its preflight) installs them, or "
                    "`sudo apt-get install -y chromium chromium-driver`")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")  # an empty profile: nothing of anyone's browser
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, name: str, tmp_path: Path, *, from_element: str = "") -> Path:
    """The page (or, with `from_element`, the part from that element down) as a PNG, at most 1100 pixels
    high; copied to $DUMONT_SCREENSHOTS when set."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 400), 1100))
    if from_element:
        driver.execute_script("document.getElementById(arguments[0]).scrollIntoView()", from_element)
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    driver.set_window_size(1280, 800)
    if os.environ.get("DUMONT_SCREENSHOTS"):
        target = REPO_ROOT / os.environ["DUMONT_SCREENSHOTS"]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def canvas_pixels(driver: webdriver.Chrome, canvas_id: str) -> int:
    return driver.execute_script("""
        const canvas = document.getElementById(arguments[0]);
        if (!canvas || !canvas.width || !canvas.height) return 0;
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let drawn = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) drawn++;
        return drawn;""", canvas_id)


def test_an_operator_follows_a_race_hibernates_from_the_browser_and_sees_the_savings(stack, api, live_server,
                                                                                        browser, tmp_path):
    instance: Instance = wait_for_status(launch(api, "RACE-FAST", name="train-ui"), "running", "failed")
    assert instance.status == "running", instance.status_reason
    wait_settled(instance)
    workspace = Path(stack.market.control.instance(instance.provider_instance_id)["workspace"])
    make_workspace(workspace, weights_mb=1, source_files=5)  # something to snapshot (restic refuses nothing)
    operator = make_user("operator", password="operator-passphrase")
    operator.is_staff = operator.is_superuser = True
    operator.save()
    admin = f"{live_server.url}/admin"

    # sign in through the real login form
    browser.get(f"{admin}/login/?next=/admin/instances/instance/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys("operator-passphrase")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_until(lambda: browser.find_elements(By.ID, "changelist-filter"), timeout=30, what="the instance list")
    browser.execute_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")  # room for tables
    browser.refresh()

    # the instance list and its filters: "running" narrows it to our instance
    filters = browser.find_element(By.ID, "changelist-filter").text
    assert "By status" in filters and "By provider" in filters and "By gpu name" in filters
    browser.find_element(By.CSS_SELECTOR, "#changelist-filter a[href*='status__exact=running']").click()
    wait_until(lambda: "status__exact=running" in browser.current_url, timeout=30, what="the status filter")
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 1 and "train-ui" in rows[0].text and "Running" in rows[0].text
    screenshot(browser, "admin-instances", tmp_path)

    # one instance: its race round by round (the attempts) and its events
    browser.get(f"{admin}/instances/instance/{instance.pk}/change/")
    def column(field: str) -> list[str]:
        return [td.text for td in browser.find_elements(By.CSS_SELECTOR, f"#machine_attempts-group td.field-{field}")]

    assert sorted(column("outcome")) == ["Lost"] * 4 + ["Won"] and column("round") == ["1"] * 5
    events = browser.find_element(By.ID, "events-group").text
    assert "round 1: renting 5 machines" in events and "race won by 501" in events
    screenshot(browser, "admin-instance-race", tmp_path, from_element="machine_attempts-group")

    # an admin action from the browser: hibernate, then a real snapshot and the machine destroyed
    browser.get(f"{admin}/instances/instance/?status__exact=running")
    browser.find_element(By.CSS_SELECTOR, f"input[name=_selected_action][value='{instance.pk}']").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("hibernate_selected")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".messagelist .success"), timeout=30,
               what="the action's message")
    assert "hibernation requested for 1: train-ui" in browser.find_element(By.CSS_SELECTOR, ".messagelist").text.lower()
    screenshot(browser, "admin-hibernate-action", tmp_path)
    wait_for_status(instance, "hibernated", "running", timeout=180)
    assert instance.status == "hibernated", "; ".join(e.message for e in instance.events.order_by("id"))
    assert stack.machines(f"{instance.label}-") == []
    browser.get(f"{admin}/instances/instance/?status__exact=hibernated")
    assert "train-ui" in browser.find_element(By.ID, "result_list").text

    # the savings page draws its chart (Chart.js, served from our static files)
    browser.get(f"{admin}/instances/instance/savings/?days=7")
    assert "Net savings" in browser.find_element(By.ID, "content").text
    wait_until(lambda: canvas_pixels(browser, "daily-savings") > DRAWN_PIXELS, timeout=30, what="the chart drawn")
    screenshot(browser, "admin-savings", tmp_path)

    assert api.delete(f"/api/v1/instances/{instance.pk}").status_code == 202
    wait_for_status(instance, "destroyed", timeout=120)
