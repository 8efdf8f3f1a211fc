"""``python -m bench.screenshots``: PNGs of the search page (for the README) and of the status page (for
docs/operations.md).

The search page: the app on loopback with the sample data in a throw-away SQLite database, a shared
search URL. The status page: real gunicorn with two workers sampled every second for a while, under
text searches and a few semantic ones whose model load pushes a worker past MAX_WORKER_MEMORY_MB, so
the chart shows real samples, recycles and alerts (the tiny test model, built here; thresholds set low
to match it). Both are opened in Debian's headless Chromium (chromium + chromium-driver, driven by
selenium) and saved at desktop (1280x900) and phone (390x844) size into docs/screenshots/. Nothing
here is a test.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import urllib.parse
from pathlib import Path

from devtools.cgroups import Cgroup

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


# Waits until the page shows what it is for: the search page's answer; the status page is whole when loaded.
SEARCH_READY = ("const s = document.getElementById('status').textContent;"
                "return !document.getElementById('results').hasAttribute('aria-busy') && s && s !== 'מחפש…'")
STATUS_READY = "return document.readyState === 'complete'"


def shoot(driver, url: str, page: str, name: str, width: int, height: int, mobile: bool,
          ready: str = SEARCH_READY) -> Path:
    """Open url at the given viewport, wait for ready, save docs/screenshots/<page>-<name>.png."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(ready))
    path = OUT / f"{page}-{name}.png"
    path.write_bytes(driver.get_screenshot_as_png())
    return path


# The status run: two workers, the recycle threshold (private memory) just above a worker without the
# model and below one with it, the alert threshold within the instance's range,
# inside a 512 MB memory cgroup where the machine allows one (devtools.cgroups'), so that the instance's line
# is this gunicorn's own working set and the limit line its cgroup's.
STATUS_LIMIT_MB = 512
STATUS_ENV = {"WEB_CONCURRENCY": "2", "MEMORY_CHECK_INTERVAL": "1", "MEMORY_TIER": "custom",
              "MAX_MEMORY_MB": "160", "MAX_WORKER_MEMORY_MB": "70", "GUNICORN_MAX_REQUESTS": "0",
              "APP_ENV": "development", "MEMORY_ALERT_COOLDOWN": "0"}


def status_server(folder: Path, seconds: float, wrap):
    """gunicorn serving the sample data (its command line through wrap), after `seconds` of traffic
    with two semantic bursts; the caller stops it. Returns the started GunicornServer."""
    import os
    import subprocess
    import sys
    import time

    from app.semantic.prepare import prepare
    from devtools.synthetic import build
    from devtools.gunicorn import GunicornServer

    model = folder / "tiny-q8"
    prepare(str(build(folder / "tiny", arch="tiny")), model, precision="q8", force=True)
    env = {**os.environ, **STATUS_ENV, "DATABASE_URL": f"sqlite:///{folder / 'status.sqlite3'}",
           "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"), "SEMANTIC_MODEL": str(model)}
    subprocess.run([sys.executable, "-m", "flask", "--app", "app", "seed"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    server = GunicornServer(env, folder / "gunicorn.log", wrap=wrap)
    server.__enter__()
    started = time.monotonic()
    bursts = {seconds / 3, 2 * seconds / 3}
    queries = ["/search?" + urllib.parse.urlencode({"q": q, "mode": "text"}) for q in ("ספר", "בישול", "טיול")]
    n = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = {b for b in bursts if elapsed >= b}
        for burst in due:  # each worker that answers loads the model and, past the threshold, is recycled
            bursts.discard(burst)
            for _ in range(2):
                server.get("/search?" + urllib.parse.urlencode({"q": "ספרים לילדים", "mode": "semantic"}))
        server.get(queries[n % len(queries)])
        n += 1
        time.sleep(0.5)
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query", default="ספר", help="the search shown (default: %(default)s)")
    parser.add_argument("--mode", default="text", help="its mode (default: %(default)s)")
    parser.add_argument("--status-seconds", type=float, default=120.0,
                        help="seconds of traffic before the status page is shot (default: %(default)s)")
    parser.add_argument("--only", choices=("search", "status"), help="shoot one page only")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request log on the console
    with tempfile.TemporaryDirectory(prefix="memfit-shots-") as tmp:
        driver = chromium()
        try:
            if args.only in (None, "search"):
                base, server = serve(Path(tmp))
                try:
                    url = f"{base}/?{urllib.parse.urlencode({'q': args.query, 'mode': args.mode})}"
                    for name, (width, height, mobile) in VIEWPORTS.items():
                        print(shoot(driver, url, "search", name, width, height, mobile).relative_to(ROOT))
                finally:
                    server.shutdown()
            if args.only in (None, "status"):
                cgroup = Cgroup("status-shots", STATUS_LIMIT_MB)
                gunicorn = None
                try:
                    gunicorn = status_server(Path(tmp), args.status_seconds, cgroup.wrap)
                    for name, (width, height, mobile) in VIEWPORTS.items():
                        print(shoot(driver, gunicorn.url + "/status", "status", name, width, height, mobile,
                                    STATUS_READY).relative_to(ROOT))
                finally:
                    if gunicorn is not None:
                        gunicorn.stop()
                    cgroup.remove()
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
