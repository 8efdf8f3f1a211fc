"""app/web.py: the search page, driven in a real headless Chromium (Debian's chromium + chromedriver)."""

import shutil
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from support import embed_all, require

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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations land in this log
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def live(make_app):
    """Serve an app, seeded with the sample data and any extra items, on a free loopback port."""
    def start(items=(), **env):
        app = make_app(**env)
        app.test_cli_runner().invoke(args=["seed"])
        with app.app_context():
            from app.db import Item, db

            db.session.add_all(Item(title=title, body=body) for title, body in items)
            db.session.commit()
        if Path(env.get("SEMANTIC_MODEL", "")).joinpath("memfit_model.json").exists():
            # What gunicorn's background embedder does; this test server has none. A model that cannot
            # load is left alone: its tests show how the page learns of it on the first semantic search.
            embed_all(app)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    servers = []
    yield start
    for server in servers:
        server.shutdown()


# The page's own tests need one back end: the API under it is tested on both in test_api.py.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def wait(browser, seconds=15):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A result list redrawn between finding an element and reading it is a reason to look again.
    return WebDriverWait(browser, seconds, ignored_exceptions=(StaleElementReferenceException,))


def settled(browser):
    """Wait until no search is in flight and the status shows its outcome."""
    from selenium.webdriver.common.by import By

    wait(browser).until(lambda d: d.find_element(By.ID, "results").get_attribute("aria-busy") is None
                        and d.find_element(By.ID, "status").text not in ("", "מחפש…"),
                        "the search did not finish")


def submit(browser, query, mode):
    """Type a query into the page already open, pick the mode, search, and wait for the answer."""
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, "q")
    field.clear()
    field.send_keys(query)
    browser.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    settled(browser)
    return browser


def search(browser, base, query, mode):
    browser.get(base + "/")
    return submit(browser, query, mode)


def titles(browser):
    # Read in one script call, so a list redrawn meanwhile cannot leave a stale element behind.
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#results li .title'), (e) => e.textContent)")


def test_page_is_right_to_left_hebrew(browser, live):
    base = live()
    browser.get(base + "/")
    html = browser.find_element("tag name", "html")
    assert html.get_attribute("dir") == "rtl" and html.get_attribute("lang") == "he"
    assert browser.execute_script("return getComputedStyle(document.body).direction") == "rtl"


@pytest.mark.parametrize("mode, query, expected_title", [
    ("text", "והספרים", "ספרים חדשים לקיץ"),
    ("tags", "קינוחים", "עוגת שוקולד בלי קמח"),
    ("hybrid", "והספרים", "ספרים חדשים לקיץ"),  # without a model: text alone
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
    note = browser.find_element(By.ID, "note-semantic")
    assert note.is_displayed() and "ENABLE_SEMANTIC_SEARCH=false" in note.text
    radio = browser.find_element(By.CSS_SELECTOR, "input[value=semantic]")
    assert not radio.is_enabled() and radio.get_attribute("aria-describedby") == "note-semantic"


def test_an_error_is_shown_not_a_blank_page(browser, live):
    from selenium.webdriver.common.by import By

    search(browser, live(SEMANTIC_MODEL="/nonexistent/model"), "ספר", "semantic")
    status = browser.find_element(By.ID, "status")
    assert "error" in status.get_attribute("class") and "failed to load" in status.text


@sqlite_only
def test_a_failed_model_greys_semantic_out_with_the_reason(browser, live):
    """The page follows /readyz: offered while not loaded, greyed out once the load has failed."""
    from selenium.webdriver.common.by import By

    browser.get(live(SEMANTIC_MODEL="/nonexistent/model") + "/")
    radio = browser.find_element(By.CSS_SELECTOR, "input[value=semantic]")
    assert radio.is_enabled()  # not_loaded: the first semantic search loads the model
    submit(browser, "ספר", "semantic")
    wait(browser).until(lambda d: not radio.is_enabled(), "semantic stayed enabled after the model failed")
    note = browser.find_element(By.ID, "note-semantic")
    assert note.is_displayed() and "המודל לא נטען" in note.text and "nonexistent" in note.text
    assert browser.find_element(By.CSS_SELECTOR, "input[value=text]").is_selected()


@sqlite_only
def test_a_shared_url_fills_the_form_and_runs_the_search(browser, live):
    from urllib.parse import quote

    from selenium.webdriver.common.by import By

    browser.get(live() + f"/?q={quote('קינוחים')}&mode=tags")
    settled(browser)
    assert browser.find_element(By.ID, "q").get_attribute("value") == "קינוחים"
    assert browser.find_element(By.CSS_SELECTOR, "input[value=tags]").is_selected()
    assert "עוגת שוקולד בלי קמח" in titles(browser)
    # The page keeps to its strict CSP (no inline script or style): Chromium logs every violation.
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


@sqlite_only
def test_back_and_forward_restore_the_form_and_the_results(browser, live):
    from selenium.webdriver.common.by import By

    search(browser, live(), "ספרים", "text")
    first = titles(browser)
    submit(browser, "קינוחים", "tags")
    second = titles(browser)
    assert first and second and first != second
    assert "mode=tags" in browser.current_url

    def shows(query, mode, expected):
        def check(d):
            return (d.find_element(By.ID, "q").get_attribute("value") == query
                    and d.find_element(By.CSS_SELECTOR, f"input[value={mode}]").is_selected()
                    and titles(d) == expected)
        return check

    browser.back()
    wait(browser).until(shows("ספרים", "text", first), "back did not restore the first search")
    browser.forward()
    wait(browser).until(shows("קינוחים", "tags", second), "forward did not restore the second search")


@sqlite_only
def test_matches_are_marked_through_niqqud_and_prefixes(browser, live):
    from selenium.webdriver.common.by import By

    # והספרים and ובספרים share only the stem ספרים: neither holds the other, so only the prefix rule marks it.
    title = "וּבַסְּפָרִים הַיְּשָׁנִים, לא במחברות"
    search(browser, live(items=[(title, "")]), "והספרים", "text")
    item = next(li for li in browser.find_elements(By.CSS_SELECTOR, "#results li")
                if li.find_element(By.CSS_SELECTOR, ".title").text == title)
    assert [m.text for m in item.find_elements(By.CSS_SELECTOR, ".title mark")] == ["וּבַסְּפָרִים"]


@sqlite_only
def test_highlighting_cannot_inject_markup(browser, live):
    from selenium.webdriver.common.by import By

    title = '<img src=x onerror="document.title=\'pwned\'"> <mark>מחברון</mark>'
    body = "<script>document.title='pwned'</script><b>מחברון</b> ו&lt;מחברון&gt;"
    search(browser, live(items=[(title, body)]), "מחברון", "text")
    item = browser.find_element(By.CSS_SELECTOR, "#results li")
    assert item.find_element(By.CSS_SELECTOR, ".title").text == title
    assert item.find_element(By.CSS_SELECTOR, ".body").text == body
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img, #results script, #results b")
    marks = item.find_elements(By.CSS_SELECTOR, "mark")
    assert [m.text for m in marks] == ["מחברון"] * 3  # the word in the title and twice in the body
    assert all(not m.find_elements(By.XPATH, "./*") for m in marks)  # a mark holds text only
    assert browser.title != "pwned"


@sqlite_only
def test_the_page_reads_words_as_the_server_does(browser, live):
    """hebrew.js mirrors app/hebrew.py: the same words and prefix stems on tricky input, and the match
    kinds it highlights by."""
    from app import hebrew

    browser.get(live() + "/")
    texts = ["וּבַסְּפָרִים", "צה\"ל וצה״ל", "בית־ספר", "CAFÉ\u200fמילה", "שׁ֑לוֹם", "a_b 100%"]
    got = browser.execute_script("return arguments[0].map((t) => window.memfitHebrew.words(t))", texts)
    assert got == [hebrew.raw_terms(t) for t in texts]
    words = ["והספרים", "וכשהלכנו", "ולב", "בו", "מלך", "בךמה", "ובcafé"]  # no stem starts with ך
    got = browser.execute_script("return arguments[0].map((w) => window.memfitHebrew.stems(w))", words)
    assert got == [[w, *hebrew.prefix_stems(w)] for w in words]
    pairs = [("ספרים", "והספרים"), ("והספרים", "בספרים"), ("ספר", "הספרייה"), ("ספרים", "מחברת"),
             ("ושל", "של"), ("הם", "מהם"), ("ב", "בב")]
    scores = browser.execute_script(
        "return arguments[0].map(([q, d]) => window.memfitHebrew.wordScore(q, d))", pairs)
    assert scores == [0.8, 0.8, 0.4, 0, 0.8, 0.8, 0]


@sqlite_only
def test_more_results_appends_the_next_ones(browser, live):
    from selenium.webdriver.common.by import By

    items = [(f"מחברת מספר {n}", "") for n in range(1, 26)]
    search(browser, live(items=items), "מחברת", "text")
    assert len(titles(browser)) == 10
    browser.execute_script("document.querySelector('#results li').dataset.kept = 'yes'")
    more = browser.find_element(By.ID, "more")
    more.click()
    wait(browser).until(lambda d: len(titles(d)) == 20, "the second page was not appended")
    settled(browser)
    # Appended, not redrawn: the first item is the same node, and the focus is on the first new one.
    assert browser.execute_script("return document.querySelector('#results li').dataset.kept") == "yes"
    assert browser.execute_script(
        "return document.activeElement === document.querySelectorAll('#results li')[10]")
    assert "limit=20" in browser.current_url and more.is_displayed()
    more.click()
    wait(browser).until(lambda d: len(titles(d)) == 25, "the last five were not appended")
    settled(browser)
    assert len(set(titles(browser))) == 25 and not more.is_displayed()
    assert "25" in browser.find_element(By.ID, "status").text


@sqlite_only
def test_phone_width_has_no_horizontal_scroll(browser, live):
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True})
    long_word = "מחברת" * 30
    # The index matches whole words: the title holds the query word beside the unbreakable long one.
    search(browser, live(items=[(f"מחברת {long_word}", "https://example.org/" + "a" * 200)]), "מחברת", "text")
    assert titles(browser)
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[1] == 375 and width[0] <= width[1], width


@sqlite_only
def test_keyboard_alone_searches_and_reaches_more_results(browser, live):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(live() + "/")
    browser.find_element(By.ID, "q").send_keys("ספר", Keys.ENTER)
    settled(browser)
    assert len(titles(browser)) == 10
    # Field, button, the mode group (one stop), then "more": results are not tab stops of their own.
    stops = []
    for _ in range(4):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        stops.append(browser.switch_to.active_element.get_attribute("id"))
        if stops[-1] == "more":
            break
    assert stops[-1] == "more", stops
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser).until(lambda d: len(titles(d)) > 10, "Enter on 'more' appended nothing")
    assert browser.execute_script("return document.activeElement === document.querySelectorAll('#results li')[10]")


@sqlite_only
def test_more_results_stops_at_the_api_cap(browser, live):
    from urllib.parse import quote

    from selenium.webdriver.common.by import By

    base = live(items=[(f"מחברת {n}", "") for n in range(105)])
    browser.get(base + f"/?q={quote('מחברת')}&mode=text&limit=100")  # a shared link after many "more"
    settled(browser)
    assert len(titles(browser)) == 100  # as many as asked, yet the API gives no more than 100
    assert not browser.find_element(By.ID, "more").is_displayed()


@sqlite_only
def test_a_bad_shared_url_says_what_is_wrong(browser, live):
    from selenium.webdriver.common.by import By

    browser.get(live() + "/?q=x&mode=bogus")
    settled(browser)
    status = browser.find_element(By.ID, "status")
    assert "error" in status.get_attribute("class") and "bogus" in status.text and "text" in status.text
    assert not titles(browser)
