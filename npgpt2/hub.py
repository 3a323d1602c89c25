"""Model name -> local files, through huggingface_hub (its cache, progress bars and offline mode).

Only what the NumPy model needs is fetched: ``config.json``, the safetensors weights (one file, or
the shards named by ``model.safetensors.index.json``), ``vocab.json`` and ``merges.txt``. Pickled
``pytorch_model.bin`` files are never downloaded.
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


@dataclass
class CheckpointFiles:
    config: str  # path of config.json
    weights: list[str]  # one or more .safetensors paths
    vocab: str | None  # vocab.json, if the checkpoint has one
    merges: str | None  # merges.txt, if the checkpoint has one
    source: str  # a local folder, or "repo_id@revision"


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
    return CheckpointFiles(config, weights, path("vocab.json"), path("merges.txt"), folder)


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
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = local_files_only or constants.HF_HUB_OFFLINE

    def fetch(filename: str) -> str:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only)

    def fetch_optional(filename: str) -> str | None:
        try:
            return fetch(filename)
        except (EntryNotFoundError, LocalEntryNotFoundError):
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
    except LocalEntryNotFoundError:
        hub_cache = cache_dir or constants.HF_HUB_CACHE
        if offline:
            raise OfflineError(
                f"{name} ({where}) is not in the local Hugging Face cache ({hub_cache}) and downloads "
                "are off (HF_HUB_OFFLINE=1 or local_files_only=True). Download it once while online: "
                f"`npgpt2 download {name}`") from None
        raise OfflineError(
            f"could not download {name} ({where}) and it is not in the local cache ({hub_cache}); "
            f"check the network, then `npgpt2 download {name}`") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"unknown model {name!r}: no hub repository {repo_id}; known aliases are "
            f"{', '.join(sorted(ALIASES))}") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise ModelNotFoundError(f"{where} has no config.json: is it a GPT-2 model?") from None
    except HfHubHTTPError as e:
        raise ModelNotFoundError(f"could not fetch {where}: {e}") from None
    return CheckpointFiles(config, weights, vocab, merges, where)
