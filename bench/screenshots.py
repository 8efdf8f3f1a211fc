"""``python -m bench.screenshots``: PNGs of the search page with results, for the README.

Starts the app on loopback with the sample data in a throw-away SQLite database, opens a shared search
URL in Debian's headless Chromium (chromium + chromium-driver, driven by selenium) and saves the page at
desktop (1280x900) and phone (390x844) size into docs/screenshots/. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
# name -> (CSS width, CSS height, mobile): the viewport Chromium emulates for each picture.
VIEWPORTS = {"desktop": (1280, 900, False), "phone": (390, 844, True)}
# The closed network refuses Chromium's background connections: switch them off (as tests/test_web.py).
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--lang=he", "--hide-scrollbars")


def serve(folder: Path):
    """The app with the sample data on a free loopback port; returns (base URL, server)."""
    from werkzeug.serving import make_server

    from app import create_app
    from app.settings import Settings

    settings = Settings.from_env({"APP_ENV": "development", "DATABASE_URL": f"sqlite:///{folder / 'shots.sqlite3'}",
                                  "SEMANTIC_MODEL": str(folder / "no-model")},
                                 instance_path=str(folder / "instance"))
    app = create_app(settings)
    for command in (["init-db"], ["seed"]):
        result = app.test_cli_runner().invoke(args=command)
        if result.exit_code:
            raise SystemExit(f"{' '.join(command)} failed: {result.output}")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="screenshots-server", daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shoot(driver, url: str, name: str, width: int, height: int, mobile: bool) -> Path:
    """Open url at the given viewport, wait for the answer, save docs/screenshots/search-<name>.png."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "const s = document.getElementById('status').textContent;"
        "return !document.getElementById('results').hasAttribute('aria-busy') && s && s !== 'מחפש…'"))
    path = OUT / f"search-{name}.png"
    path.write_bytes(driver.get_screenshot_as_png())
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query", default="ספר", help="the search shown (default: %(default)s)")
    parser.add_argument("--mode", default="text", help="its mode (default: %(default)s)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request log on the console
    with tempfile.TemporaryDirectory(prefix="memfit-shots-") as tmp:
        base, server = serve(Path(tmp))
        driver = chromium()
        try:
            url = f"{base}/?{urllib.parse.urlencode({'q': args.query, 'mode': args.mode})}"
            for name, (width, height, mobile) in VIEWPORTS.items():
                print(shoot(driver, url, name, width, height, mobile).relative_to(ROOT))
        finally:
            driver.quit()
            server.shutdown()


if __name__ == "__main__":
    main()
