"""Open an HTML page in headless Chromium and read back the DOM its scripts built.

``render(page, probe=None)`` writes the page to a file, optionally with a ``probe`` script appended
that runs after the page's own scripts and leaves a JSON result in ``<pre id="probe">``; it returns
the serialized DOM and the probe's result (parsed). Every page is opened with a first script that
records uncaught errors and ``console.error`` calls; ``render`` fails when there were any.
``screenshot(page, name)`` keeps a PNG of the page under ``artifacts/screenshots/`` (CI keeps that
folder). Tests skip when Chromium is not installed.
"""

from __future__ import annotations

import html
import html.parser
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _Texts(html.parser.HTMLParser):
    """The text of every element matching a tag (and optionally a class), unescaped."""

    def __init__(self, tag: str, cls: str | None = None):
        super().__init__(convert_charrefs=True)
        self.tag, self.cls, self.found, self._open = tag, cls, [], None

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag == self.tag and (self.cls is None or self.cls in classes):
            self._open = []

    def handle_data(self, data):
        if self._open is not None:
            self._open.append(data)

    def handle_endtag(self, tag):
        if tag == self.tag and self._open is not None:
            self.found.append("".join(self._open))
            self._open = None


def texts(dom: str, tag: str, cls: str | None = None) -> list[str]:
    """The texts of the ``tag`` elements (with class ``cls``) in a serialized DOM, as the page shows them."""
    p = _Texts(tag, cls)
    p.feed(dom)
    return p.found


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOTS = os.path.join(ROOT, "artifacts", "screenshots")

# The first script of every page: keep uncaught errors and console.error calls; the last: write them out.
_CATCH = ("<script>window.__errors = []; window.addEventListener('error', e => window.__errors.push(String(e.message)));"
          " (function () { const ce = console.error; console.error = function () {"
          " window.__errors.push(Array.from(arguments).map(String).join(' ')); ce.apply(console, arguments); }; })();"
          "</script>")
_REPORT = ("<script>window.addEventListener('load', () => { const pre = document.createElement('pre');"
           " pre.id = 'errors'; pre.style.display = 'none'; pre.textContent = JSON.stringify(window.__errors);"
           " document.body.appendChild(pre); });</script>")


def _instrument(page: str) -> str:
    head = re.search(r"<head[^>]*>|<body[^>]*>", page)
    page = page[:head.end()] + _CATCH + page[head.end():] if head else _CATCH + page
    return page.replace("</body>", _REPORT + "</body>") if "</body>" in page else page + _REPORT


def _chromium(page: str, *args, timeout=120):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="npgpt2-chromium-") as d:
        path = os.path.join(d, "page.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={os.path.join(d, 'profile')}",
                               "--virtual-time-budget=5000", *args, "file://" + path],
                              capture_output=True, text=True, timeout=timeout)


def _pre(dom: str, pre_id: str):
    """The text of the ``<pre id=pre_id>`` element of a serialized DOM, unescaped (None if absent)."""
    m = re.search(r'<pre id="' + pre_id + r'"[^>]*>(.*?)</pre>', dom, re.S)
    return None if m is None else html.unescape(m.group(1))


def screenshot(page: str, name: str, size=(1280, 900)) -> str:
    """Open the page in headless Chromium and keep a PNG of its window (``size``: width, height in
    pixels) as ``artifacts/screenshots/<name>.png``; returns the path."""
    os.makedirs(SCREENSHOTS, exist_ok=True)
    out_path = os.path.join(SCREENSHOTS, f"{name}.png")
    out = _chromium(page, f"--screenshot={out_path}", f"--window-size={size[0]},{size[1]}", "--hide-scrollbars")
    assert out.returncode == 0 and os.path.exists(out_path), out.stderr[-2000:]
    with open(out_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", out_path
    return out_path


def render(page: str, probe: str | None = None):
    """(DOM after the scripts ran, the probe's JSON result or None). Fails when the page logged an
    error to the console or threw one."""
    page = _instrument(page)
    if probe is not None:
        script = ("<script>(function () { let r; try { r = (function () {" + probe + "})(); }"
                  " catch (e) { r = {error: String(e)}; }"
                  " const pre = document.createElement('pre'); pre.id = 'probe';"
                  " pre.textContent = JSON.stringify(r); document.body.appendChild(pre); })();</script>")
        page = page.replace("</body>", script + "</body>") if "</body>" in page else page + script
    out = _chromium(page, "--dump-dom")
    assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
    errors = _pre(out.stdout, "errors")
    assert errors is not None, "the error report did not run"
    assert json.loads(errors) == [], f"the page logged errors: {errors}"
    result = None
    if probe is not None:
        found = _pre(out.stdout, "probe")
        assert found is not None, "the probe script did not run"
        result = json.loads(found)
        assert not (isinstance(result, dict) and "error" in result), result
    return out.stdout, result
