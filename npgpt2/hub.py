"""Model name -> local files, through huggingface_hub (its cache, progress bars and offline mode).

Only what the NumPy model needs is fetched: ``config.json``, the safetensors weights (one file, or
the shards named by ``model.safetensors.index.json``), ``vocab.json`` and ``merges.txt``. Pickled
``pytorch_model.bin`` files are never downloaded.

Failures come out as one line, as a ``ModelNotFoundError`` or one of its subclasses: ``OfflineError``
(not cached and downloads are off, or the hub unreachable), ``AccessDeniedError`` (a gated or private
repository: log in or set HF_TOKEN) and ``DownloadError`` (a transfer broke part-way).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .config import ALIASES


class ModelNotFoundError(ValueError):
    """The name is neither a known alias, a hub repository, nor a local folder with a model."""


class OfflineError(ModelNotFoundError):
    """Downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True) and the files are not cached."""


class AccessDeniedError(ModelNotFoundError):
    """The hub repository is gated or private, and the request's credentials (none, or a token
    without access) do not open it. The message says what to do: log in, set HF_TOKEN, or ask
    for access on the repository's page."""


class DownloadError(ModelNotFoundError):
    """A transfer from the hub failed part-way (connection dropped, timeout, wrong size). No
    truncated file is left where the complete one belongs; calling again downloads what is missing."""


# what to do when the hub wants credentials (`hf auth login` stores a token; HF_TOKEN overrides it)
_LOGIN = "log in with `hf auth login` or set the HF_TOKEN environment variable to an access token"


@dataclass
class CheckpointFiles:
    config: str  # path of config.json
    weights: list[str]  # one or more .safetensors paths
    vocab: str | None  # vocab.json, if the checkpoint has one
    merges: str | None  # merges.txt, if the checkpoint has one
    source: str  # a local folder, or "repo_id@revision"
    tokenizer: str | None = None  # tokenizer.json, read only when there is no vocab.json (a word vocabulary)


def repo_id_for(name: str) -> str:
    """'gpt2' -> 'openai-community/gpt2'; a hub id passes through."""
    return ALIASES.get(name, name)


def _local_checkpoint(folder: str) -> CheckpointFiles:
    def path(name):
        p = os.path.join(folder, name)
        return p if os.path.isfile(p) else None

    config = path("config.json")
    if config is None:
        raise ModelNotFoundError(f"folder {folder} has no config.json")
    if path("model.safetensors"):
        weights = [path("model.safetensors")]
    elif path("model.safetensors.index.json"):
        weights = [os.path.join(folder, s) for s in _shards(path("model.safetensors.index.json"))]
    else:
        pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        also = f" (it has {', '.join(pickled)}, which npgpt2 never unpickles)" if pickled else ""
        raise ModelNotFoundError(
            f"folder {folder} has no model.safetensors or model.safetensors.index.json{also}")
    vocab = path("vocab.json")
    return CheckpointFiles(config, weights, vocab, path("merges.txt"), folder,
                           None if vocab else path("tokenizer.json"))


def _shards(index_path: str) -> list[str]:
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not weight_map:
        raise ModelNotFoundError(f"{index_path} has no weight_map")
    return sorted(set(weight_map.values()))


def resolve(name: str, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False) -> CheckpointFiles:
    """Find (downloading if needed and allowed) the files of a model.

    ``name``: an alias (see ``npgpt2.ALIASES``), a hub repo id, or a local folder.
    """
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError(f"model name {name!r}: expected an alias, a hub repo id or a folder")
    if os.path.isdir(name):
        return _local_checkpoint(name)
    repo_id = repo_id_for(name)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")) or repo_id.endswith("/"):
        raise ModelNotFoundError(
            f"unknown model {name!r}: expected one of {', '.join(sorted(ALIASES))}, a hub repo id "
            "such as 'openai-community/gpt2', or an existing local folder")

    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = local_files_only or constants.HF_HUB_OFFLINE
    endpoint = constants.ENDPOINT
    fetching = [""]  # the file being fetched, for the error messages

    def fetch(filename: str) -> str:
        fetching[0] = filename
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only)

    def fetch_optional(filename: str) -> str | None:
        """The file, or None if the repository has none. Online, only the hub's "no such entry"
        means absent: a failed request (an HTTP 500, a timeout) is reported as what it is."""
        try:
            return fetch(filename)
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
            if offline:
                return None
            raise
        except EntryNotFoundError:
            return None

    where = f"{repo_id}@{revision or 'main'}"
    try:
        config = fetch("config.json")
        weights_file = fetch_optional("model.safetensors")
        if weights_file is not None:
            weights = [weights_file]
        else:
            index = fetch_optional("model.safetensors.index.json")
            if index is None:
                if offline:
                    raise LocalEntryNotFoundError("no safetensors weights in the cache")
                raise ModelNotFoundError(
                    f"{where} has no model.safetensors or model.safetensors.index.json; npgpt2 "
                    "reads safetensors only and never unpickles pytorch_model.bin")
            weights = [fetch(shard) for shard in _shards(index)]
        vocab, merges = fetch_optional("vocab.json"), fetch_optional("merges.txt")
        tokenizer = None if vocab else fetch_optional("tokenizer.json")
    except LocalEntryNotFoundError as e:
        hub_cache = cache_dir or constants.HF_HUB_CACHE
        if offline:
            raise OfflineError(
                f"{name} ({where}) is not in the local Hugging Face cache ({hub_cache}) and downloads "
                "are off (HF_HUB_OFFLINE=1 or local_files_only=True). Download it once while online: "
                f"`npgpt2 download {name}`") from None
        # huggingface_hub turns the hub's HTTP errors other than 401 into this one (it looks in the
        # cache before giving up): report what the hub said, not a network problem
        if isinstance(e.__cause__, HfHubHTTPError):
            raise _http_error(e.__cause__, where, endpoint) from None
        raise OfflineError(
            f"could not download {name} ({where}) from {endpoint} and it is not in the local cache "
            f"({hub_cache}); check the network, then `npgpt2 download {name}`") from None
    except GatedRepoError as e:  # before RepositoryNotFoundError, its base class
        if _status(e) == 403:  # logged in, but not (yet) granted access
            raise AccessDeniedError(
                f"{repo_id} is a gated repository and your account has not been granted access: "
                f"request it at {endpoint}/{repo_id} (the token used is HF_TOKEN's, or that of "
                "`hf auth login`)") from None
        raise AccessDeniedError(
            f"{repo_id} is a gated repository: accept its conditions at {endpoint}/{repo_id}, then "
            f"{_LOGIN} of that account") from None
    except RepositoryNotFoundError as e:
        known = f"known aliases are {', '.join(sorted(ALIASES))}"
        if _status(e) == 401:  # the hub's answer to a request without a token, for a private repo too
            raise ModelNotFoundError(
                f"unknown model {name!r}: {endpoint} has no public repository {repo_id}; if it is "
                f"private, {_LOGIN}; {known}") from None
        raise ModelNotFoundError(
            f"unknown model {name!r}: {endpoint} has no repository {repo_id}; {known}") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        what = ": is it a GPT-2 model?" if fetching[0] == "config.json" else ""
        raise ModelNotFoundError(f"{where} has no {fetching[0]}{what}") from None
    except HfHubHTTPError as e:
        raise _http_error(e, where, endpoint) from None
    except _transport_errors() as e:
        raise DownloadError(
            f"downloading {fetching[0]} of {where} from {endpoint} failed: "
            f"{_first_line(e) or 'connection error'} ({type(e).__name__}); try again: the files "
            "already complete stay in the cache") from None
    except OSError as e:  # e.g. huggingface_hub's size check, or the cache folder not writable
        raise DownloadError(
            f"downloading {fetching[0]} of {where} from {endpoint} failed: "
            f"{_first_line(e) or type(e).__name__}") from None
    for path in weights:
        _check_download(path, where)
    return CheckpointFiles(config, weights, vocab, merges, where, tokenizer)


def _check_download(path: str, where: str) -> None:
    """Open a downloaded weights file's header: a file cut short (yet of the size the hub announced)
    is caught here, with how to fetch it again, rather than at every later load."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as e:
        blob = os.path.realpath(path)
        raise DownloadError(
            f"{os.path.basename(path)} of {where} is not a complete safetensors file ({_first_line(e)}); "
            f"to download it again, delete {path} and {blob} and load it again (if the file is damaged "
            "on the hub itself, it stays so)") from None


def _status(error) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _first_line(text) -> str:
    """The first line of a message (huggingface_hub's run over several), or ''."""
    lines = str(text or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def _http_error(error, where: str, endpoint: str) -> ModelNotFoundError:
    """One line for an HTTP error from the hub: its status and what its server said."""
    status = _status(error)
    response = getattr(error, "response", None)
    reason = getattr(response, "reason_phrase", None) or getattr(response, "reason", None) or ""
    said = _first_line(getattr(error, "server_message", None))
    answer = f"{status} {reason}".strip() + (f": {said}" if said else "")
    if status == 401:
        return AccessDeniedError(
            f"{endpoint} refused {where} ({answer}): the repository is private or gated, or the "
            f"token is not valid; {_LOGIN}")
    return ModelNotFoundError(f"could not fetch {where}: {endpoint} answered {answer}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses: httpx2 (huggingface_hub 2.x),
    httpx (1.x); requests (before 1.0) raises OSErrors, caught separately."""
    import importlib

    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)
