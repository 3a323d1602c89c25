"""Open an HTML page in headless Chromium and read back the DOM its scripts built.

``render(page, probe=None)`` writes the page to a file, optionally with a ``probe`` script appended
that runs after the page's own scripts and leaves a JSON result in ``<pre id="probe">``; it returns
the serialized DOM and the probe's result (parsed). Tests skip when Chromium is not installed.
"""

from __future__ import annotations

import html.parser
import json
import os
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


def render(page: str, probe: str | None = None):
    """(DOM after the scripts ran, the probe's JSON result or None)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    if probe is not None:
        script = ("<script>(function () { let r; try { r = (function () {" + probe + "})(); }"
                  " catch (e) { r = {error: String(e)}; }"
                  " const pre = document.createElement('pre'); pre.id = 'probe';"
                  " pre.textContent = JSON.stringify(r); document.body.appendChild(pre); })();</script>")
        page = page.replace("</body>", script + "</body>") if "</body>" in page else page + script
    with tempfile.TemporaryDirectory(prefix="npgpt2-chromium-") as d:
        path = os.path.join(d, "page.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={os.path.join(d, 'profile')}",
                              "--virtual-time-budget=5000", "--dump-dom", "file://" + path],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
    result = None
    if probe is not None:
        found = texts(out.stdout, "pre")
        assert found, "the probe script did not run"
        result = json.loads(found[-1])
        assert not (isinstance(result, dict) and "error" in result), result
    return out.stdout, result
