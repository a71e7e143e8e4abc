"""The report in a real browser: headless Chromium driven over the DevTools protocol.

Chromium is started with ``--remote-debugging-pipe`` (JSON messages on fds 3/4, standard library
only). For each page we check: it loads from disk, no console message / uncaught exception /
error log entry, no request other than the file itself (self-contained), the DOM holds the
charts and no <script> element, nothing overflows horizontally, and a screenshot is not blank.

The default run's report is rendered from the session's own default run (or LAYERWISE_REPORT, if set).
Skipped when no chromium binary is installed (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

DATA = Path(__file__).parent / "data"
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH "
                                    "(Debian: apt-get install -y chromium); browser check skipped")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe"]
WIDTH, HEIGHT = 1280, 2400


class Browser:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, profile: Path, timeout: float = 60.0) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # runs in the child: Chromium reads fd 3, writes fd 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds, close_fds=False,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.timeout = timeout
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - best effort, then make sure it is gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe (exit status {self.proc.poll()})")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass


def inspect_page(path: Path, profile: Path, screenshot: Path) -> dict:
    """Load ``path`` in headless Chromium; return problems, DOM facts and the screenshot path."""
    b = Browser(profile)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=session)
        b.send("Emulation.setDeviceMetricsOverride",
               {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)
        url = path.resolve().as_uri()
        b.send("Page.navigate", {"url": url}, session=session)
        b.wait_event("Page.loadEventFired")
        b.drain(0.5)  # late console messages / requests

        def js(expr: str):
            r = b.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
            return r["result"].get("value")

        dom = {
            "svg": js("document.querySelectorAll('svg.chart').length"),
            "script": js("document.querySelectorAll('script').length"),
            "details": js("document.querySelectorAll('details').length"),
            "overflow": js("document.documentElement.scrollWidth - document.documentElement.clientWidth"),
            "height": js("document.documentElement.scrollHeight"),
            "title": js("document.title"),
            "text": js("document.body.innerText"),
        }
        shot = b.send("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        # Everything a reader can expand, as text (after the screenshot, which shows the page as opened).
        dom["text_open"] = js("document.querySelectorAll('details').forEach(d => d.open = true);"
                              "document.body.innerText")
    finally:
        b.close()

    problems = []
    for e in b.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            det = p.get("exceptionDetails", {})
            problems.append(f"uncaught: {det.get('exception', {}).get('description') or det.get('text')}")
        elif m == "Runtime.consoleAPICalled":
            problems.append(f"console.{p.get('type')}: {[a.get('value') for a in p.get('args', [])]}")
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            problems.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Network.requestWillBeSent":
            req = p.get("request", {}).get("url", "")
            if req != url and not req.startswith(("data:", "about:")):
                problems.append(f"request: {req}")
        elif m == "Network.loadingFailed":
            problems.append(f"load failed: {p.get('errorText')}")
    return {"problems": problems, "dom": dom, "screenshot": screenshot}


def assert_not_blank(png: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] >= 100 and img.shape[1] >= 100, img.shape
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = len(np.unique(rgb[:: max(1, len(rgb) // 200_000)], axis=0))
    assert colours > 20, f"screenshot has only {colours} distinct colours"
    assert float(img[..., :3].std()) > 0.02, "screenshot is (almost) uniform"
    assert (img[..., :3] < 0.5).mean() > 0.002, "screenshot has (almost) no dark pixels: no text drawn"


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> Path:
    from layerwise.report import write_report
    from layerwise.results import load_results

    out = tmp_path_factory.mktemp("browser") / "report.html"
    write_report(load_results(DATA / "results_tiny.json"), out, baseline=load_results(DATA / "results_tiny_b.json"))
    return out


@needs_chromium
def test_detector_catches_a_broken_page(tmp_path):
    """The checks are not vacuous: a page with a script error and an external image is flagged."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><img src="http://192.0.2.1/x.png">'
                    '<script>console.error("boom"); undefinedFn();</script></body></html>')
    res = inspect_page(page, tmp_path / "profile", tmp_path / "bad.png")
    text = "\n".join(res["problems"])
    assert "boom" in text
    assert "undefinedFn" in text
    assert "192.0.2.1" in text
    assert res["dom"]["script"] == 1


@needs_chromium
def test_tiny_report_in_chromium(tiny_report, tmp_path):
    res = inspect_page(tiny_report, tmp_path / "profile", tmp_path / "report.png")
    assert res["problems"] == []
    dom = res["dom"]
    assert dom["script"] == 0  # the generation's <script> stayed text
    assert dom["svg"] == 8  # 4 depth/metric charts, 2 examples, the grid, norm vs raw
    assert dom["details"] >= 3 + 3  # the rows (+ their prompts) and the depth numbers
    assert dom["overflow"] <= 0, "the page scrolls horizontally at 1280 px"
    assert "Row 1: What are the three primary colors?" in dom["text"]
    assert "<script>alert(1)</script>" in dom["text_open"]  # shown as text once the row is opened
    assert "Use <em>simple</em> words" in dom["text_open"]
    assert dom["title"].startswith("layerwise report")
    assert_not_blank(res["screenshot"])


@needs_chromium
def test_compare_page_in_chromium(tmp_path):
    from layerwise.compare import write_compare
    from layerwise.results import load_results

    out = write_compare(load_results(DATA / "results_tiny.json"), load_results(DATA / "results_tiny_b.json"),
                        tmp_path / "compare.html", labels=("main", "pr"))
    res = inspect_page(out, tmp_path / "profile", tmp_path / "compare.png")
    assert res["problems"] == []
    assert res["dom"]["script"] == 0
    assert res["dom"]["svg"] == 3  # quality overlay, depth overlay, drift
    assert res["dom"]["overflow"] <= 0
    assert_not_blank(res["screenshot"])


@needs_chromium
def test_default_run_report_in_chromium(tmp_path, request):
    """The default run's report: LAYERWISE_REPORT if set, else rendered from this session's own
    default run (the plugin's ``layerwise_results`` fixture, shared with layer_tests/)."""
    if os.environ.get("LAYERWISE_REPORT"):
        path = Path(os.environ["LAYERWISE_REPORT"])
        if not path.is_file():
            pytest.fail(f"LAYERWISE_REPORT={path} does not exist")
    else:
        from layerwise.report import write_report

        results = request.getfixturevalue("layerwise_results")
        path = write_report(results, tmp_path / "default-report.html")
    assert path.stat().st_size < 5_000_000, "the report should stay under 5 MB"
    res = inspect_page(path, tmp_path / "profile", tmp_path / "default.png")
    assert res["problems"] == []
    assert res["dom"]["script"] == 0
    assert res["dom"]["svg"] >= 8
    assert res["dom"]["overflow"] <= 0
    assert_not_blank(res["screenshot"])
