"""The real download path: huggingface_hub talking HTTP to a local stand-in for the hub (tests/hub_server.py).

Every other test reads the hub's cache offline. Here ``npgpt2.from_pretrained`` and ``npgpt2 download``
fetch synthetic repositories over HTTP from 127.0.0.1, and the results are checked against the same
checkpoints loaded from their folders.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, and conftest.py imported it
offline. In this process the ``online`` fixture points its constants at the local hub (and checks that
the URLs it builds really go there); the command-line tests run ``python -m npgpt2`` in subprocesses
with HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE in their own environment, as a user would.
"""

import hashlib
import os
import select
import struct
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from tqdm import tqdm

import npgpt2
from npgpt2 import ModelNotFoundError
from npgpt2.hub import AccessDeniedError, DownloadError
from npgpt2.testing import random_state_dict, write_checkpoint
from conftest import TINY
from hub_server import LocalHub

TOKENS = np.array([[464, 3290, 318, 257, 922, 6]])
# the folder holding the npgpt2 package imported here: the subprocesses import the same one
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(npgpt2.__file__)))


@pytest.fixture(scope="module")
def retrained_dir(tmp_path_factory):
    """Another tiny checkpoint, same shape as tiny_dir, other weights."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-gpt2-retrained"), TINY, random_state_dict(TINY, seed=1))


@pytest.fixture
def hub():
    with LocalHub() as hub:
        yield hub


@pytest.fixture
def online(hub, monkeypatch):
    """huggingface_hub in this process, online and pointed at the local hub; returns the hub."""
    from huggingface_hub import close_session, constants, hf_hub_url

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 5)  # seconds; the local hub answers at once
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # requests go without a token, as a new user's do
    url = hf_hub_url("org/name", "config.json")
    assert url == f"{hub.url}/org/name/resolve/main/config.json", (
        f"huggingface_hub builds {url}: patching its constants no longer points it at the local hub")
    yield hub
    close_session()  # its pooled connections go to a hub that is about to stop


def logits_of(folder):
    return npgpt2.from_pretrained(str(folder))(TOKENS)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def file_downloads(requests):
    """(server, file name) of each GET of a repository file, sorted."""
    got = []
    for r in requests:
        url = urlsplit(r.path)
        if r.method != "GET":
            continue
        if r.server == "cdn":
            got.append(("cdn", parse_qs(url.query)["filename"][0]))
        elif url.path.startswith("/api/resolve-cache/") or "/resolve/" in url.path:
            got.append(("hub", url.path.rsplit("/", 1)[-1]))
    return sorted(got)


# ------------------------------------------------------------------------------ from_pretrained
def test_first_download_shows_progress_then_loads_without_the_network(online, tiny_dir, tmp_path, capsys,
                                                                       monkeypatch):
    from huggingface_hub import constants

    hub, repo = online, "npgpt2-test/remote"
    commit = hub.add_revision(repo, tiny_dir)
    cache = str(tmp_path / "hub")
    expected = logits_of(tiny_dir)
    # tqdm hides its bars when stderr is not a terminal, as here where it is captured: TQDM_POSITION=-1
    # is huggingface_hub's switch to show them anyway (the command-line test below uses a real terminal)
    monkeypatch.setenv("TQDM_POSITION", "-1")
    capsys.readouterr()

    model = npgpt2.from_pretrained(repo, cache_dir=cache)
    err = capsys.readouterr().err
    size = tqdm.format_sizeof(os.path.getsize(os.path.join(tiny_dir, "model.safetensors")))
    assert "model.safetensors: 100%" in err and f"{size}/{size}" in err, err
    np.testing.assert_array_equal(model(TOKENS), expected)
    assert model.source == f"{repo}@main"
    snapshot = os.path.join(os.path.realpath(cache), "models--npgpt2-test--remote", "snapshots", commit)
    assert model.files.weights == [os.path.join(snapshot, "model.safetensors")]
    # each file crossed the network once: the weights from the CDN, the small files from the hub
    assert file_downloads(hub.requests) == [("cdn", "model.safetensors"), ("hub", "config.json"),
                                            ("hub", "merges.txt"), ("hub", "vocab.json")]

    # online again: huggingface_hub asks the hub which commit main is (HEAD), and downloads nothing
    seen = len(hub.requests)
    again = npgpt2.from_pretrained(repo, cache_dir=cache)
    new = hub.requests[seen:]
    assert new and {r.method for r in new} == {"HEAD"}, new
    assert capsys.readouterr().err == ""  # no progress bar: nothing was downloaded
    np.testing.assert_array_equal(again(TOKENS), expected)

    # HF_HUB_OFFLINE=1: not a single request reaches the hub, and the cached copy loads
    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = npgpt2.from_pretrained(repo, cache_dir=cache)
    assert hub.requests[seen:] == []
    np.testing.assert_array_equal(offline(TOKENS), expected)

    # online, but the hub is gone (connections refused): the cached copy loads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.stop()
    without_hub = npgpt2.from_pretrained(repo, cache_dir=cache)
    np.testing.assert_array_equal(without_hub(TOKENS), expected)
    assert without_hub.files.weights == model.files.weights


def test_each_revision_loads_its_own_weights(online, tiny_dir, retrained_dir, tmp_path):
    hub, repo = online, "npgpt2-test/two-revisions"
    main = hub.add_revision(repo, tiny_dir)
    retrained = hub.add_revision(repo, retrained_dir, branch="retrained")
    cache = str(tmp_path / "hub")
    expected = {main: logits_of(tiny_dir), retrained: logits_of(retrained_dir)}
    assert np.abs(expected[main] - expected[retrained]).max() > 1.0  # the two checkpoints really differ

    for revision, commit in [(None, main), ("retrained", retrained), (main, main), (retrained, retrained)]:
        model = npgpt2.from_pretrained(repo, revision=revision, cache_dir=cache)
        np.testing.assert_array_equal(model(TOKENS), expected[commit], err_msg=f"revision={revision}")
        assert model.source == f"{repo}@{revision or 'main'}"
        assert f"{os.sep}snapshots{os.sep}{commit}{os.sep}" in model.files.weights[0]
    refs = os.path.join(cache, "models--npgpt2-test--two-revisions", "refs")
    for branch, commit in [("main", main), ("retrained", retrained)]:
        with open(os.path.join(refs, branch)) as f:
            assert f.read() == commit
    # the revisions share config.json, vocab.json and merges.txt: fetched once; each has its own weights
    assert file_downloads(hub.requests) == [("cdn", "model.safetensors")] * 2 + [
        ("hub", "config.json"), ("hub", "merges.txt"), ("hub", "vocab.json")]

    with pytest.raises(ModelNotFoundError, match=r"^npgpt2-test/two-revisions has no revision 'nope'$"):
        npgpt2.from_pretrained(repo, revision="nope", cache_dir=cache)


def test_sharded_repository_downloads_the_index_and_shards(online, tmp_path, model, monkeypatch):
    from huggingface_hub import constants

    hub, repo = online, "npgpt2-test/sharded-remote"
    folder = write_checkpoint(tmp_path / "sharded", TINY, random_state_dict(TINY, seed=0), shards=2)
    hub.add_revision(repo, folder)
    cache = str(tmp_path / "hub")
    # the hub answers EntryNotFound for model.safetensors, then serves the index and both shards
    loaded = npgpt2.from_pretrained(repo, cache_dir=cache)
    np.testing.assert_array_equal(loaded(TOKENS), model(TOKENS))  # tiny_dir's weights, split in two
    assert [os.path.basename(p) for p in loaded.files.weights] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    np.testing.assert_array_equal(npgpt2.from_pretrained(repo, cache_dir=cache)(TOKENS), model(TOKENS))
    assert hub.requests[seen:] == []


# ------------------------------------------------------------------------------------- errors
GATED_401 = ("Access to model {repo} is restricted. You must have access to it and be authenticated to "
             "access it. Please log in.")
GATED_403 = ("Access to model {repo} is restricted and you are not in the authorized list. Visit "
             "https://huggingface.co/{repo} to ask for access.")

# repo -> what the hub answers (status, X-Error-Code, X-Error-Message; None: it has no such repo),
#         the error npgpt2 raises, and what its message must say ({url}: the hub's address)
HUB_ERRORS = {
    "npgpt2-test/missing": (None, ModelNotFoundError,
                            ["unknown model 'npgpt2-test/missing'", "{url} has no repository npgpt2-test/missing"]),
    # without a token the hub answers 401 for a missing and for a private repository alike
    "npgpt2-test/private": ((401, "RepoNotFound", "Invalid username or password."), ModelNotFoundError,
                            ["no public repository npgpt2-test/private", "hf auth login", "HF_TOKEN"]),
    "npgpt2-test/gated": ((401, "GatedRepo", GATED_401), AccessDeniedError,
                          ["npgpt2-test/gated is a gated repository", "{url}/npgpt2-test/gated",
                           "hf auth login", "HF_TOKEN"]),
    "npgpt2-test/gated-no-access": ((403, "GatedRepo", GATED_403), AccessDeniedError,
                                    ["not been granted access", "request it at {url}/npgpt2-test/gated-no-access",
                                     "HF_TOKEN"]),
    "npgpt2-test/bad-token": ((401, None, "Invalid credentials in Authorization header"), AccessDeniedError,
                              ["npgpt2-test/bad-token@main", "401 Unauthorized: Invalid credentials in "
                               "Authorization header", "hf auth login", "HF_TOKEN"]),
    "npgpt2-test/disabled": ((403, None, "Access to this resource is disabled."), ModelNotFoundError,
                             ["could not fetch npgpt2-test/disabled@main: {url} answered 403 Forbidden: "
                              "Access to this resource is disabled."]),
}


@pytest.mark.parametrize("repo", HUB_ERRORS)
def test_hub_errors_are_one_clear_line(online, repo, tmp_path):
    answer, error, fragments = HUB_ERRORS[repo]
    if answer is not None:
        online.deny(repo, answer[0], answer[1], answer[2].format(repo=repo))
    with pytest.raises(ModelNotFoundError) as caught:
        npgpt2.from_pretrained(repo, cache_dir=str(tmp_path / "hub"))
    message = str(caught.value)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {message}"
    assert "\n" not in message
    for fragment in fragments:
        assert fragment.format(url=online.url) in message, message


# --------------------------------------------------------------------------- broken transfers
def test_dropped_connection_fails_cleanly_and_the_next_call_completes(online, tiny_dir, tmp_path):
    hub, repo = online, "npgpt2-test/flaky"
    commit = hub.add_revision(repo, tiny_dir)
    cache = str(tmp_path / "hub")
    weights = os.path.join(tiny_dir, "model.safetensors")
    size, blob = os.path.getsize(weights), sha256_of(weights)
    # every transfer of the weights stops 1000 bytes short and the connection closes; huggingface_hub
    # resumes with Range requests (5 retries, 1 s apart), each cut again, then gives up
    hub.break_transfer(blob, at=size - 1000, times=None)
    with pytest.raises(DownloadError) as caught:
        npgpt2.from_pretrained(repo, cache_dir=cache)
    message = str(caught.value)
    assert "\n" not in message
    assert f"downloading model.safetensors of {repo}@main from {hub.url} failed" in message, message
    assert "try again" in message
    resumed = [r.range for r in hub.requests if r.server == "cdn" and r.range]
    assert resumed and all(r.startswith("bytes=") for r in resumed), hub.requests
    # nothing truncated where the complete file belongs: neither the snapshot entry nor the blob
    repo_dir = os.path.join(cache, "models--npgpt2-test--flaky")
    assert not os.path.lexists(os.path.join(repo_dir, "snapshots", commit, "model.safetensors"))
    assert not os.path.lexists(os.path.join(repo_dir, "blobs", blob))
    for name in os.listdir(os.path.join(repo_dir, "blobs")):  # what is there is complete (config.json)
        assert not name.startswith(blob) or os.path.getsize(os.path.join(repo_dir, "blobs", name)) < size

    hub.heal()
    model = npgpt2.from_pretrained(repo, cache_dir=cache)
    np.testing.assert_array_equal(model(TOKENS), logits_of(tiny_dir))
    assert sha256_of(model.files.weights[0]) == blob


def test_one_dropped_connection_is_resumed_with_a_range_request(online, tiny_dir, tmp_path):
    hub, repo = online, "npgpt2-test/one-drop"
    hub.add_revision(repo, tiny_dir)
    weights = os.path.join(tiny_dir, "model.safetensors")
    size, blob = os.path.getsize(weights), sha256_of(weights)
    cut = size - 1000
    hub.break_transfer(blob, at=cut, times=1)
    model = npgpt2.from_pretrained(repo, cache_dir=str(tmp_path / "hub"))
    asked = [r for r in hub.requests if r.server == "cdn"]
    assert len(asked) == 2 and asked[0].range is None, asked
    start = int(asked[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut  # it asked only for what it had not written yet
    sent = [(t.status, t.sent) for t in hub.transfers if t.server == "cdn"]
    assert sent == [(200, cut), (206, size - start)]  # the second transfer carried only the rest
    assert sha256_of(model.files.weights[0]) == blob  # the two parts put together: the exact file
    np.testing.assert_array_equal(model(TOKENS), logits_of(tiny_dir))


# ------------------------------------------------------------------------------- command line
def cli_env(hf_home, hub, offline=False):
    drop = {"HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "TQDM_POSITION", "HF_HUB_DISABLE_PROGRESS_BARS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=hub.url, HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="5", HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def npgpt2_command(args, env):
    proc = subprocess.run([sys.executable, "-m", "npgpt2", *args], capture_output=True, text=True, env=env,
                          cwd=PACKAGE_PARENT, timeout=60)
    return proc


def npgpt2_in_terminal(args, env, timeout=60):
    """``python -m npgpt2 ...`` with stderr on a pseudo-terminal 120 columns wide, as in a shell (tqdm
    draws its bars only on a terminal). Returns (exit code, stdout, what the terminal showed)."""
    termios = pytest.importorskip("termios", reason="pseudo-terminals are POSIX only")
    import fcntl
    import pty

    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    shown = bytearray()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "npgpt2", *args], stdout=subprocess.PIPE,
                                stderr=terminal, env=env, cwd=PACKAGE_PARENT)
        os.close(terminal)
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"npgpt2 {' '.join(args)} still running after {timeout} s")
            if not select.select([master], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal has closed it (the process ended)
                break
            if not chunk:
                break
            shown += chunk
        stdout = proc.stdout.read().decode()
        proc.stdout.close()
        code = proc.wait(timeout=timeout)
    finally:
        os.close(master)
    return code, stdout, shown.decode(errors="replace")


def test_cli_download_then_offline_info(hub, tiny_dir, tmp_path):
    repo = "npgpt2-test/remote-cli"
    commit = hub.add_revision(repo, tiny_dir)
    hf_home = tmp_path / "hf-home"
    code, out, terminal = npgpt2_in_terminal(["download", repo], cli_env(hf_home, hub))
    assert code == 0, terminal
    size = tqdm.format_sizeof(os.path.getsize(os.path.join(tiny_dir, "model.safetensors")))
    assert "model.safetensors: 100%" in terminal and f"{size}/{size}" in terminal, terminal
    snapshot = os.path.join(hf_home, "hub", "models--npgpt2-test--remote-cli", "snapshots", commit)
    assert out.splitlines()[0] == f"{repo}: {repo}@main", out
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        path = os.path.join(snapshot, name)
        assert f"  {path}  ({os.path.getsize(path):,} bytes)" in out, out
        with open(path, "rb") as got, open(os.path.join(tiny_dir, name), "rb") as sent:
            assert got.read() == sent.read(), name  # the very bytes the hub served
    assert file_downloads(hub.requests) == [("cdn", "model.safetensors"), ("hub", "config.json"),
                                            ("hub", "merges.txt"), ("hub", "vocab.json")]

    # later, offline, with the hub still up: the model loads and not one request reaches the hub
    seen = len(hub.requests)
    proc = npgpt2_command(["info", "-m", repo], cli_env(hf_home, hub, offline=True))
    assert proc.returncode == 0, proc.stderr
    assert f"source     {repo}@main" in proc.stdout and "n_layer=2 n_head=4 d_model=64" in proc.stdout
    assert f"weights    {os.path.join(snapshot, 'model.safetensors')}" in proc.stdout, proc.stdout
    assert hub.requests[seen:] == []


@pytest.mark.parametrize("repo, answer, fragments", [
    ("npgpt2-test/missing", None, ["npgpt2-test/missing", "has no repository"]),
    ("npgpt2-test/gated", (401, "GatedRepo", GATED_401), ["npgpt2-test/gated is a gated repository", "HF_TOKEN"]),
])
def test_cli_download_errors_are_one_line_and_exit_2(hub, repo, answer, fragments, tmp_path):
    if answer is not None:
        hub.deny(repo, answer[0], answer[1], answer[2].format(repo=repo))
    proc = npgpt2_command(["download", repo], cli_env(tmp_path / "hf-home", hub))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npgpt2 download: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], proc.stderr


def test_a_server_error_on_the_weights_is_reported_as_such(online, tiny_dir, tmp_path):
    """An HTTP 500 for model.safetensors is the hub's trouble, not a repository without safetensors."""
    repo = "npgpt2-test/troubled"
    online.add_revision(repo, tiny_dir)
    online.fail_file(repo, "model.safetensors", 500)
    with pytest.raises(ModelNotFoundError) as caught:
        npgpt2.from_pretrained(repo, cache_dir=str(tmp_path / "hub"))
    message = str(caught.value)
    assert "500" in message and "has no model.safetensors" not in message, message
    assert "\n" not in message


def test_a_short_weights_file_is_caught_after_download_with_how_to_fetch_again(online, tiny_dir, tmp_path):
    """The hub serves a weights file cut short, announcing that (short) size: the download completes,
    and the header check says so at once, naming the cached files to delete."""
    import shutil

    short = shutil.copytree(tiny_dir, tmp_path / "short")
    weights = short / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    repo = "npgpt2-test/short"
    online.add_revision(repo, short)
    with pytest.raises(DownloadError) as caught:
        npgpt2.from_pretrained(repo, cache_dir=str(tmp_path / "hub"))
    message = str(caught.value)
    assert f"model.safetensors of {repo}@main is not a complete safetensors file" in message, message
    assert "to download it again, delete" in message and str(tmp_path / "hub") in message
    assert "\n" not in message
