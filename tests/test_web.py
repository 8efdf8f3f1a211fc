"""app/web.py: the search page, driven in a real headless Chromium (Debian's chromium + chromedriver)."""

import shutil
import threading

import pytest
from werkzeug.serving import make_server

from support import require

pytestmark = pytest.mark.browser
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser():
    require(shutil.which("chromium") is not None and shutil.which("chromedriver") is not None,
            "Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The closed network refuses Chromium's background connections: switch them off.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--lang=he"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def live(make_app):
    """Serve an app on a free loopback port for the browser; returns (base_url, app)."""
    def start(**env):
        app = make_app(**env)
        app.test_cli_runner().invoke(args=["seed"])
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    servers = []
    yield start
    for server in servers:
        server.shutdown()


def search(browser, base, query, mode):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(base + "/")
    browser.find_element(By.ID, "q").send_keys(query)
    browser.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "status").text not in ("", "מחפש…"))
    return browser


def test_page_is_right_to_left_hebrew(browser, live):
    base = live()
    browser.get(base + "/")
    html = browser.find_element("tag name", "html")
    assert html.get_attribute("dir") == "rtl" and html.get_attribute("lang") == "he"
    assert browser.execute_script("return getComputedStyle(document.body).direction") == "rtl"


@pytest.mark.parametrize("mode, query, expected_title", [
    ("text", "והספרים", "ספרים חדשים לקיץ"),
    ("tags", "קינוחים", "עוגת שוקולד בלי קמח"),
])
def test_search_shows_results_with_tags_and_scores(browser, live, mode, query, expected_title):
    from selenium.webdriver.common.by import By

    search(browser, live(), query, mode)
    items = browser.find_elements(By.CSS_SELECTOR, "#results li")
    assert items, browser.find_element(By.ID, "status").text
    titles = [li.find_element(By.CSS_SELECTOR, ".title").text for li in items]
    assert expected_title in titles
    first = items[0]
    assert first.find_elements(By.CSS_SELECTOR, ".tag") and float(first.find_element(By.CSS_SELECTOR, ".score").text) > 0


def test_semantic_mode_in_the_browser(browser, live, tiny_onnx):
    from selenium.webdriver.common.by import By

    search(browser, live(SEMANTIC_MODEL=str(tiny_onnx)), "ספרים לילדים", "semantic")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results li")) == 10
    assert browser.find_elements(By.CSS_SELECTOR, "#results .tag.matched")


def test_semantic_off_is_explained_and_the_mode_disabled(browser, live):
    from selenium.webdriver.common.by import By

    browser.get(live(ENABLE_SEMANTIC_SEARCH="false") + "/")
    assert "כבוי" in browser.find_element(By.ID, "semantic-off").text
    assert not browser.find_element(By.CSS_SELECTOR, "input[value=semantic]").is_enabled()


def test_an_error_is_shown_not_a_blank_page(browser, live):
    from selenium.webdriver.common.by import By

    search(browser, live(SEMANTIC_MODEL="/nonexistent/model"), "ספר", "semantic")
    status = browser.find_element(By.ID, "status")
    assert "error" in status.get_attribute("class") and "failed to load" in status.text
