"""The inspector's web server (tornado): the page, its JSON API, and the harvest's dashboard pages.

Security, as Jupyter's server does it:

* it listens on 127.0.0.1 unless told otherwise (``ip``);
* every request carries a random token (``secrets.token_urlsafe``): in the URL printed at the
  start (``?token=...``), in an ``Authorization: token ...`` header, or in the cookie the first
  page sets (HttpOnly, SameSite=Strict); without it the answer is 401 (a wrong one: 403);
* the Host header must name this server by a loopback name (127.0.0.1, localhost, [::1]) and its
  port, unless an ``ip`` was given on purpose: a page of another site that rebinds its DNS name
  to 127.0.0.1 is refused (DNS rebinding);
* the API takes only ``application/json`` bodies (a cross-site form cannot send one without the
  browser asking first, and this server does not answer such questions), and a request's
  ``Origin``, when sent, must be this server's;
* the static files are read from the package once at start; no endpoint reads a file named by
  the client or evaluates code.

The numpy work runs in a thread pool, off the event loop, so the page stays responsive while a
long job (EAP-IG) runs; the job reports progress and can be cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import secrets
import tempfile
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import tornado.httpserver
import tornado.netutil
import tornado.web

from .. import style
from .api import Cancelled, InspectError, Inspector

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")
ACTIONS = ("analyse", "layer", "attention", "components", "intervene")
JOBS = ("circuit",)
MAX_JOBS = 16  # finished jobs kept for their clients to read
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, content type)}: the page's files, read once; colours.js made from
    ``npgpt2.style`` (the one colour language of every picture)."""
    files = {}
    for name in sorted(os.listdir(STATIC)):
        ext = os.path.splitext(name)[1]
        if ext in _TYPES:
            with open(os.path.join(STATIC, name), "rb") as f:
                files[name] = (f.read(), _TYPES[ext])
    colours = style.JS_COLOURS + "export { seq, div };\n"
    files["colours.js"] = (colours.encode(), _TYPES[".js"])
    return files


class Job:
    """A long piece of work: its progress (done of total), its result or error, and a cancel flag."""

    def __init__(self, kind: str):
        self.kind, self.state, self.done, self.total = kind, "running", 0, 0
        self.result, self.error, self.cancel = None, None, threading.Event()

    def progress(self, done: int, total: int) -> None:
        """Record progress (``done`` of ``total`` steps); raise Cancelled once the job was cancelled."""
        self.done, self.total = done, total
        if self.cancel.is_set():
            raise Cancelled()

    def as_dict(self, job_id: str) -> dict:
        """The job as the API reports it: id, kind, state, done, total, result, error."""
        return {"id": job_id, "kind": self.kind, "state": self.state, "done": self.done, "total": self.total,
                "result": self.result, "error": self.error}


class App:
    """What the handlers share: the inspector, the token, the allowed hosts, the thread pool,
    the jobs and the harvest's pages."""

    def __init__(self, inspector: Inspector, token: str, port: int, check_host: bool, harvest=None,
                 workers: int = 4):
        self.inspector, self.token, self.port, self.check_host = inspector, token, port, check_host
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npgpt2-inspect")
        self.files = _static_files()
        self.jobs: dict[str, Job] = {}
        self.ids = itertools.count(1)
        self.harvest, self._harvest_pages, self._harvest_dir = harvest, {}, None
        self._lock = threading.Lock()

    def hosts(self) -> set[str]:
        """The Host header values a request may carry: the loopback names with this server's port."""
        return {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}

    # ------------------------------------------------------------------------ harvest pages
    def harvest_page(self, name: str) -> bytes:
        """index.html or feature-N.html of the harvest's dashboard, made on first request with the
        dashboard's own code (``npgpt2.harvest.dashboard``) and the inspector's model. The index
        links every feature that fired; a feature's page is made when it is first asked for."""
        from ..harvest.dashboard import _index_page, build_dashboard

        h = self.harvest
        with self._lock:
            if name in self._harvest_pages:
                return self._harvest_pages[name]
            if self._harvest_dir is None:
                self._harvest_dir = tempfile.mkdtemp(prefix="npgpt2-inspect-harvest-")
        if name == "index.html":
            fired = h.features[h.features["fire_count"] > 0]["feature"]
            page = _index_page(h, {int(f) for f in fired}).encode()
        else:
            fid = int(name[len("feature-"):-len(".html")])
            if fid not in set(h.features["feature"].tolist()):
                raise InspectError(f"feature {fid} is not in the harvest", status=404)
            build_dashboard(h, self._harvest_dir, features=[fid], model=self.inspector.model, sae=self.inspector.sae,
                            progress=False)
            with open(os.path.join(self._harvest_dir, name), "rb") as f:
                page = f.read()
        with self._lock:
            self._harvest_pages[name] = page
        return page


class Base(tornado.web.RequestHandler):
    """Every request: the Host rule and the token; errors as JSON ``{"error": "..."}``."""

    app: App

    def initialize(self, app: App):
        """tornado's per-request set-up: the handler reads the shared ``App``."""
        self.app = app

    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    def prepare(self):
        if self.app.check_host and self.request.host not in self.app.hosts():
            raise InspectError(f"Host {self.request.host!r} is not this server's: open it as "
                               f"http://127.0.0.1:{self.app.port}/ (a page reaching it under another name is refused)", 403)
        origin = self.request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.request.host:
            raise InspectError(f"Origin {origin!r} is not this server's", 403)
        given = (self.get_query_argument("token", None) or self._header_token()
                 or self.get_cookie(self.cookie_name()))
        if not given:
            raise InspectError("no token: open the URL npgpt2 inspect printed (it ends in ?token=...)", 401)
        if not hmac.compare_digest(given.encode(), self.app.token.encode()):
            raise InspectError("wrong token: open the URL npgpt2 inspect printed (it ends in ?token=...)", 403)

    def _header_token(self):
        auth = self.request.headers.get("Authorization", "")
        return auth[len("token "):].strip() if auth.startswith("token ") else None

    def cookie_name(self) -> str:
        """The cookie holding the token, one per port (two inspectors on one machine keep theirs apart)."""
        return f"npgpt2-inspect-{self.app.port}"

    def write_error(self, status_code, **kwargs):
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, InspectError):
            message = str(error)
        elif isinstance(error, tornado.web.HTTPError) and error.log_message:
            message = error.log_message % error.args if error.args else error.log_message
        else:
            message = self._reason
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message}))

    def _handle_request_exception(self, e):
        if isinstance(e, InspectError):
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    def reply(self, data) -> None:
        """Finish the request with ``data`` as JSON (NaN refused: every number must be finite)."""
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(data, allow_nan=False, default=_jsonable))

    def body(self) -> dict:
        """The request's JSON object; a 4xx InspectError for another Content-Type or malformed JSON."""
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype != "application/json":
            raise InspectError(f"Content-Type {ctype or 'none'!r}: the API takes application/json", 415)
        try:
            body = json.loads(self.request.body or b"")
        except (ValueError, UnicodeDecodeError) as e:
            raise InspectError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InspectError(f"the request body is a JSON {type(body).__name__}: expected an object "
                               "such as {\"prompt\": \"...\"}")
        return body

    async def work(self, fn, *args):
        """fn(*args) in the thread pool; an unexpected error is a 500 with its message (the
        server goes on)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.app.pool, fn, *args)
        except InspectError:
            raise
        except (ValueError, KeyError, TypeError) as e:  # what the analyses say of inputs they refuse
            raise InspectError(f"{type(e).__name__}: {e}") from None


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


class PageHandler(Base):
    """The page itself; a valid token in the URL also sets the cookie the page's files are fetched with."""

    def get(self):
        """The page; a token in the URL also sets the token cookie, so the page's own requests carry it."""
        if self.get_query_argument("token", None):
            self.set_cookie(self.cookie_name(), self.app.token, httponly=True, samesite="Strict")
        content, ctype = self.app.files["index.html"]
        self.set_header("Content-Type", ctype)
        self.finish(content)


class StaticHandler(Base):
    def get(self, name):
        """One of the page's files, from those read at start (never a path the client names)."""
        if name not in self.app.files:
            raise InspectError(f"no static file {name!r}", 404)
        content, ctype = self.app.files[name]
        self.set_header("Content-Type", ctype)
        self.finish(content)


class InfoHandler(Base):
    def get(self):
        """The model's shape and name, and the harvest's hook when one is served."""
        info = self.app.inspector.info()
        info["harvest"] = None if self.app.harvest is None else {
            "hook": self.app.harvest.manifest["hook"], "n_features": len(self.app.harvest.features)}
        self.reply(info)


class ActionHandler(Base):
    async def post(self, action):
        """Run one API action (``ACTIONS``) on the request's JSON, off the event loop."""
        if action not in ACTIONS:
            raise InspectError(f"no API action {action!r}; expected one of {', '.join(ACTIONS)}", 404)
        body = self.body()
        self.reply(await self.work(getattr(self.app.inspector, action), body))


class JobsHandler(Base):
    """POST /api/jobs {"kind": "circuit", ...the request}: start; GET /api/jobs/ID: its state,
    progress and (when done) result; DELETE /api/jobs/ID: cancel."""

    async def post(self, job_id=None):
        """Start a long job (``JOBS``, e.g. the EAP-IG circuit); returns its id at once."""
        body = self.body()
        kind = body.get("kind")
        if kind not in JOBS:
            raise InspectError(f"kind={kind!r}: expected one of {', '.join(JOBS)}")
        getattr(self.app.inspector, "check_" + kind)(body)  # a bad request fails now, not in the job
        job_id, job = str(next(self.app.ids)), Job(kind)
        with self.app._lock:
            finished = [k for k, j in self.app.jobs.items() if j.state != "running"]
            for k in finished[:max(0, len(self.app.jobs) - MAX_JOBS + 1)]:
                del self.app.jobs[k]
            self.app.jobs[job_id] = job
        asyncio.get_running_loop().run_in_executor(self.app.pool, _run_job, self.app.inspector, job, body)
        self.reply(job.as_dict(job_id))

    def _job(self, job_id) -> Job:
        job = self.app.jobs.get(job_id)
        if job is None:
            raise InspectError(f"no job {job_id!r}", 404)
        return job

    def get(self, job_id=None):
        """Every job, or one: its state, progress and, when done, its result."""
        if job_id is None:
            self.reply([j.as_dict(k) for k, j in self.app.jobs.items()])
            return
        self.reply(self._job(job_id).as_dict(job_id))

    def delete(self, job_id=None):
        """Cancel a job: it stops at its next progress report."""
        job = self._job(job_id)
        job.cancel.set()
        self.reply(job.as_dict(job_id))


def _run_job(inspector: Inspector, job: Job, body: dict) -> None:
    try:
        job.result = getattr(inspector, job.kind)(body, progress=job.progress)
        job.state = "done"
    except Cancelled:
        job.state = "cancelled"
    except (InspectError, ValueError, KeyError, TypeError) as e:
        job.state, job.error = "failed", str(e)
    except Exception as e:  # noqa: BLE001  (reported to the page; the server goes on)
        job.state, job.error = "failed", f"{type(e).__name__}: {e}"
        traceback.print_exc()


class HarvestHandler(Base):
    async def get(self, name):
        """A page of the harvest's dashboards (its index, or one feature's), made when asked for."""
        if self.app.harvest is None:
            raise InspectError("no harvest: start npgpt2 inspect with --harvest FOLDER", 404)
        page = await self.work(self.app.harvest_page, name)
        self.set_header("Content-Type", _TYPES[".html"])
        self.finish(page)


class NotFound(Base):
    def prepare(self):
        super().prepare()
        raise InspectError(f"no such page: {self.request.path}", 404)


def make_app(app: App) -> tornado.web.Application:
    """The tornado application: the page, its static files, the API, the jobs and the harvest pages."""
    args = {"app": app}
    return tornado.web.Application([
        (r"/", PageHandler, args),
        (r"/static/([A-Za-z0-9_.-]+)", StaticHandler, args),
        (r"/api/info", InfoHandler, args),
        (r"/api/jobs", JobsHandler, args),
        (r"/api/jobs/([0-9]+)", JobsHandler, args),
        (r"/api/([a-z]+)", ActionHandler, args),
        (r"/harvest/(index\.html|feature-[0-9]+\.html)", HarvestHandler, args),
    ], default_handler_class=NotFound, default_handler_args=args, xsrf_cookies=False, compress_response=True)


class Server:
    """The inspector serving one model. ``Server(model).serve()`` runs until Ctrl-C;
    ``start_in_thread()`` runs it in a thread of its own (tests, notebooks) and ``stop()`` ends it.

    ip: None listens on 127.0.0.1 and accepts only loopback Host headers; an address given on
    purpose (e.g. 0.0.0.0) is listened on and any Host is accepted (the token still guards it).
    port: 0 picks a free one. token: random unless given."""

    def __init__(self, model, port: int = 8765, ip: str | None = None, token: str | None = None, sae=None,
                 harvest=None):
        self.inspector = model if isinstance(model, Inspector) else Inspector(model, sae=sae)
        self.address = ip or "127.0.0.1"
        self.token = token or secrets.token_urlsafe(32)
        self.sockets = tornado.netutil.bind_sockets(port, self.address)
        self.port = self.sockets[0].getsockname()[1]
        self.app = App(self.inspector, self.token, self.port, check_host=ip is None, harvest=harvest)
        self._loop = self._thread = self._server = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.address in ("127.0.0.1", "0.0.0.0", "::", "") else self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/?token={self.token}"

    def _start(self) -> None:
        self._server = tornado.httpserver.HTTPServer(make_app(self.app))
        self._server.add_sockets(self.sockets)

    def serve(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        async def main():
            self._start()
            await asyncio.Event().wait()

        try:
            asyncio.run(main())
        finally:
            self.app.pool.shutdown(wait=False, cancel_futures=True)

    def start_in_thread(self) -> "Server":
        """Serve from a daemon thread; returns once it accepts connections."""
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._start()
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="npgpt2-inspect-server", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self) -> None:
        """Stop serving and end the server's event loop (from any thread)."""
        if self._loop is not None:
            def shut():
                self._server.stop()
                self._loop.stop()
            self._loop.call_soon_threadsafe(shut)
            self._thread.join(timeout=10)
        self.app.pool.shutdown(wait=False, cancel_futures=True)
