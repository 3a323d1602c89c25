"""A local stand-in for the Hugging Face hub, to test the real download path without the internet.

It answers the requests huggingface_hub's ``hf_hub_download`` makes (as read in huggingface_hub 2.4,
``file_download.py`` and ``utils/_http.py``), the way huggingface.co answers them:

* ``HEAD /{repo}/resolve/{revision}/{file}`` asks for the metadata.

  - A small file (config.json, vocab.json, merges.txt) gets a *relative* 307 redirect to
    ``/api/resolve-cache/models/{repo}/{commit}/{file}``, which answers 200 with ``X-Repo-Commit``,
    ``ETag`` (the git blob sha1: the cache's blob name) and ``Content-Length``. huggingface_hub follows
    it (same host) and downloads from there.
  - A large (LFS) file gets an *absolute* 302 redirect to the CDN, carrying ``X-Repo-Commit``,
    ``X-Linked-Etag`` (the sha256: the cache's blob name) and ``X-Linked-Size``. huggingface_hub stops
    there (another origin) and downloads from ``Location``.

* ``GET`` of those locations. ``Range: bytes=N-`` (how huggingface_hub resumes a transfer that broke)
  is answered 206 with ``Content-Range``. ``Content-Disposition`` names the file, which is what the
  progress bar shows.
* Errors as the hub sends them: a status, ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
  EntryNotFound, GatedRepo) and ``X-Error-Message``; an EntryNotFound also carries ``X-Repo-Commit``.

Two servers on 127.0.0.1 on free ports: the hub and its CDN (another origin, as cdn-lfs.hf.co is).
Every request is logged. A transfer can be broken part-way (the body stops, the connection closes).
``stop`` closes the listening sockets and every open connection, so a stopped hub refuses at once;
idle connections also close by themselves after ``IDLE_TIMEOUT`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack")
IDLE_TIMEOUT = 10  # seconds an open connection may wait for its next request


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content: the hub's ETag of a file stored in git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    """The id of a file stored with git LFS: the hub's X-Linked-Etag, the cache's blob name."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None  # the Range header, if any


@dataclass(frozen=True)
class Transfer:
    server: str
    path: str
    status: int  # 200, or 206 for a range
    sent: int  # bytes of the body actually sent (fewer than asked for if the transfer was broken)


class LocalHub:
    """Repositories, their branches and commits, served over HTTP on 127.0.0.1.

    ``with LocalHub() as hub:`` starts it and stops it at the end.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._repos: dict[str, dict] = {}  # repo id -> {"refs": {branch: commit}, "commits": {commit: {file: bytes}}}
        self._denied: dict[str, tuple[int, str | None, str]] = {}  # repo id -> (status, X-Error-Code, message)
        self._failing: dict[tuple[str, str], int] = {}  # (repo id, file name) -> the status it is answered with
        self._blobs: dict[str, bytes] = {}  # sha256 -> content, for the CDN
        self._breaks: dict[str, list] = {}  # sha256 -> [byte offset, transfers left to break (None: all)]
        self._requests: list[Request] = []
        self._transfers: list[Transfer] = []
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []
        self._connections: set[socket.socket] = set()
        self.url = self.cdn_url = None
        self.stopped = False

    # ------------------------------------------------------------------------------- content
    def add_revision(self, repo_id: str, folder: str | os.PathLike, branch: str = "main") -> str:
        """Commit every file of ``folder`` to ``repo_id`` and point ``branch`` at it. Returns the commit id."""
        folder = os.fspath(folder)
        files = {}
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, folder).replace(os.sep, "/")] = f.read()
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + bytes.fromhex(sha256(files[name])))
        commit = digest.hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, {"refs": {}, "commits": {}})
            repo["commits"][commit] = files
            repo["refs"][branch] = commit
            for name, data in files.items():
                if name.endswith(LFS_SUFFIXES):
                    self._blobs[sha256(data)] = data
        return commit

    def deny(self, repo_id: str, status: int, error_code: str | None, message: str) -> None:
        """Answer every request about ``repo_id`` with this error, as the hub does for gated, private
        or disabled repositories."""
        with self._lock:
            self._denied[repo_id] = (status, error_code, message)

    def fail_file(self, repo_id: str, filename: str, status: int) -> None:
        """Answer every request for this one file with ``status`` (e.g. 500), as a hub in trouble does."""
        with self._lock:
            self._failing[(repo_id, filename)] = status

    def break_transfer(self, blob_sha256: str, at: int, times: int | None = 1) -> None:
        """The next ``times`` downloads of this LFS blob (None: all of them) stop sending at byte ``at``
        of the file and close the connection."""
        with self._lock:
            self._breaks[blob_sha256] = [at, times]

    def heal(self) -> None:
        """Downloads complete again."""
        with self._lock:
            self._breaks.clear()

    @property
    def requests(self) -> list[Request]:
        """Every request received, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def transfers(self) -> list[Transfer]:
        """Every file body sent (GET), in order."""
        with self._lock:
            return list(self._transfers)

    # ------------------------------------------------------------------------------- serving
    def start(self) -> "LocalHub":
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: a free one
            server.daemon_threads = True
            server.hub, server.role = self, role
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"local-{role}", daemon=True)
            thread.start()
            self._servers.append((server, thread))
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s, _ in self._servers)
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection: from now on connections are refused."""
        self.stopped = True
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._servers.clear()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        if not self.stopped:
            self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Content-Length, as huggingface_hub's client expects
    timeout = IDLE_TIMEOUT
    server_version = "npgpt2-local-hub"

    # ----------------------------------------------------------------------------- plumbing
    def setup(self):
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.hub._lock:
                self.server.hub._connections.discard(self.connection)

    def log_message(self, format, *args):  # the test output stays clean
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        hub = self.server.hub
        if hub.stopped:
            self.close_connection = True
            return
        with hub._lock:
            hub._requests.append(Request(self.server.role, self.command, self.path, self.headers.get("Range")))
        if self.server.role == "cdn":
            self._cdn(body)
        else:
            self._hub(body)

    def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool):
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, error_code: str | None, message: str, body: bool, commit: str | None = None):
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, json.dumps({"error": message}).encode(), body)

    def _content(self, data: bytes, headers: dict[str, str], body: bool, break_at: int | None = None):
        """200 with the whole file, or 206 with the range asked for; stops at ``break_at`` if set."""
        status, start, end = 200, 0, len(data)
        asked = self.headers.get("Range")
        if asked:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", asked.strip())
            if not m or int(m[1]) >= len(data):
                self._error(416, None, f"range {asked!r} not satisfiable for {len(data)} bytes", body)
                return
            start, end = int(m[1]), min(len(data), int(m[2]) + 1 if m[2] else len(data))
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start)}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        if break_at is not None and break_at < end:
            end = max(start, break_at)
            self.close_connection = True  # the connection drops with the body incomplete
        with self.server.hub._lock:
            self.server.hub._transfers.append(Transfer(self.server.role, self.path, status, end - start))
        self.wfile.write(data[start:end])

    @staticmethod
    def _disposition(filename: str) -> str:
        # as the hub and its CDN send it; huggingface_hub's progress bar shows this name
        return f"inline; filename*=UTF-8''{quote(filename)}; filename=\"{filename}\";"

    # ---------------------------------------------------------------------------------- hub
    def _hub(self, body: bool):
        hub = self.server.hub
        path = urlsplit(self.path).path
        cached = re.fullmatch(r"/api/resolve-cache/models/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not (cached or resolve):
            self._error(404, None, "Sorry, we can't find the page you are looking for.", body)
            return
        repo_id, revision, filename = (unquote(part) for part in (cached or resolve).groups())
        with hub._lock:
            denied = hub._denied.get(repo_id)
            repo = hub._repos.get(repo_id)
            failing = hub._failing.get((repo_id, filename))
        if denied:
            self._error(denied[0], denied[1], denied[2], body)
            return
        if failing:
            self._error(failing, None, "Internal Error - We're working hard to fix this as soon as possible!", body)
            return
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return
        commit = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return
        data = repo["commits"][commit].get(filename)
        if data is None:
            self._error(404, "EntryNotFound", "Entry not found", body, commit=commit)
            return
        headers = {"X-Repo-Commit": commit}
        name = filename.rsplit("/", 1)[-1]
        if cached:  # the file itself
            headers.update({"ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "text/plain; charset=utf-8",
                            "Content-Disposition": self._disposition(name)})
            self._content(data, headers, body)
        elif filename.endswith(LFS_SUFFIXES):  # stored with LFS: to the CDN
            oid = sha256(data)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n"
            headers.update({"ETag": f'"{git_blob_sha1(pointer.encode())}"', "X-Linked-Etag": f'"{oid}"',
                            "X-Linked-Size": str(len(data)),
                            "Location": f"{hub.cdn_url}/blobs/{oid}?filename={quote(name)}"})
            self._send(302, headers, b"", body)
        else:  # stored in git: to the resolve cache, a relative redirect
            headers.update({"ETag": f'"{git_blob_sha1(data)}"',
                            "Location": f"/api/resolve-cache/models/{repo_id}/{commit}/{quote(filename)}"})
            self._send(307, headers, b"", body)

    # ---------------------------------------------------------------------------------- cdn
    def _cdn(self, body: bool):
        hub = self.server.hub
        url = urlsplit(self.path)
        m = re.fullmatch(r"/blobs/([0-9a-f]{64})", url.path)
        data = hub._blobs.get(m[1]) if m else None
        if data is None:
            self._error(404, None, "NoSuchKey", body)
            return
        break_at = None
        with hub._lock:
            rule = hub._breaks.get(m[1])
            if body and rule is not None:
                break_at = rule[0]
                if rule[1] is not None:
                    rule[1] -= 1
                    if rule[1] <= 0:
                        del hub._breaks[m[1]]
        name = parse_qs(url.query).get("filename", [m[1]])[0]
        headers = {"ETag": f'"{m[1]}"', "Content-Type": "application/octet-stream",
                   "Content-Disposition": self._disposition(name)}
        self._content(data, headers, body, break_at=break_at)
