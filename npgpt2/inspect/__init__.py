"""``npgpt2 inspect``: a local, offline inspector in the browser.

    api.py      what the page asks, as functions of the model (JSON-ready dicts in and out)
    server.py   the web server: a token in the URL, Host checks, one model shared by all requests
    static/     the page: plain HTML, JavaScript modules and CSS, no build step, no network
"""

from .api import InspectError, Inspector

__all__ = ["InspectError", "Inspector"]
