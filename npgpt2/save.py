"""``model.save_pretrained(folder)``: the model as the hub stores GPT-2, loadable by npgpt2 and by
transformers' ``GPT2LMHeadModel.from_pretrained(folder)``.

The folder gets ``config.json``, ``model.safetensors`` (float32, keys without a prefix: ``wte.weight``,
``h.0.attn.c_attn.weight`` ...; the tied unembedding is not stored, it is ``wte.weight``),
and the model's tokenizer files (GPT-2's ``vocab.json`` and ``merges.txt``, or the ``tokenizer.json``
of a word vocabulary).

Writing is one atomic step: the files are written whole into a staging folder beside the
target (``.NAME.tmp-<pid>``), flushed to disk, and the staging folder is renamed to NAME. A save
over an existing folder renames that aside first (``.NAME.old-<pid>``), puts the new one in its
place, moves back whatever else the old folder held (a fine-tuning run's ``checkpoint/``) and
deletes it. An interrupted save leaves either the old files or the new ones, never a mix; the next
save clears what a killed one left behind (``recover``).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

from .weights import _BLOCK_KEYS, GPT2Weights


def hub_state_dict(weights: GPT2Weights, n_layer: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """GPT2Weights -> {hub key: contiguous array in ``dtype``}; the tied W_U is left out."""
    def arr(a):
        return np.ascontiguousarray(a, dtype=dtype)

    state = {"wte.weight": arr(weights.W_E), "wpe.weight": arr(weights.W_pos),
             "ln_f.weight": arr(weights.ln_final_w), "ln_f.bias": arr(weights.ln_final_b)}
    for l in range(n_layer):
        block = weights.blocks[l]
        for suffix, (field, _) in _BLOCK_KEYS.items():
            state[f"h.{l}.{suffix}"] = arr(getattr(block, field))
    if not weights.tied():
        state["lm_head.weight"] = arr(weights.W_U.T)
    return state


def save_pretrained(model, folder) -> str:
    """Write ``model`` into ``folder`` (made if missing) in the hub's layout. Returns the folder.

    A model whose weights were processed (fold_ln, centring, folded value biases) is refused: those
    weights are not GPT-2's and transformers would compute different logits from them.
    """
    done = [k for k, v in model.processing.items() if v]
    if done:
        raise ValueError(
            f"save_pretrained writes GPT-2's own weights, but this model's were processed ({', '.join(done)}): "
            f"load it unprocessed, npgpt2.from_pretrained({model.name!r}) without fold_ln/center_writing_weights/"
            "center_unembed/fold_value_biases, and save that")
    if model.weights.b_U is not None:
        raise ValueError("the model has an unembedding bias b_U, which GPT-2's layout has no place for")
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"save_pretrained: {folder!r} is a file; expected a folder (new, or one to write into)")
    config = model.cfg.to_hf_dict()
    if model.tokenizer.eot_token < model.cfg.vocab_size:  # <|endoftext|>: GPT-2's 50256, or a word vocabulary's own
        config["bos_token_id"] = config["eos_token_id"] = int(model.tokenizer.eot_token)
    config["tie_word_embeddings"] = model.weights.tied()
    config["torch_dtype"] = "float32"
    state = hub_state_dict(model.weights, model.cfg.n_layer)

    recover(folder)
    staging = _sibling(folder, "tmp")
    os.makedirs(staging)
    try:
        for name, write in model.tokenizer.file_writers().items():  # vocab.json + merges.txt, or tokenizer.json
            _write(staging, name, write)
        _write(staging, "config.json", lambda p: _write_json(config, p))
        _write(staging, "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _put_in_place(staging, folder)
    return folder


def _sibling(folder: str, kind: str, pid: int | None = None) -> str:
    """``.NAME.tmp-<pid>`` / ``.NAME.old-<pid>`` beside ``folder``."""
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.{kind}-{os.getpid() if pid is None else pid}")


def _write(folder: str, name: str, write) -> None:
    """Write one file with ``write(path)`` and flush it to disk."""
    path = os.path.join(folder, name)
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_json(data: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def _put_in_place(staging: str, folder: str) -> None:
    """Rename the complete ``staging`` folder to ``folder``; an existing ``folder`` is set aside first
    and what it holds besides a save's files is moved into the new one."""
    if not os.path.exists(folder):
        os.rename(staging, folder)  # the one step
        return
    old = _sibling(folder, "old")
    os.rename(folder, old)
    os.rename(staging, folder)
    _move_extras(old, folder)


# what a save writes (one tokenizer's files or the other's): never carried over from an older save
SAVED_FILES = frozenset({"config.json", "model.safetensors", "model.safetensors.index.json", "vocab.json",
                         "merges.txt", "tokenizer.json"})


def _move_extras(old: str, folder: str) -> None:
    """Move the entries of ``old`` that ``folder`` lacks, other than a save's own files, into it;
    then delete ``old``."""
    for entry in os.listdir(old):
        if entry not in SAVED_FILES and not os.path.exists(os.path.join(folder, entry)):
            os.replace(os.path.join(old, entry), os.path.join(folder, entry))
    shutil.rmtree(old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not in the middle of another save of this folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(folder) -> None:
    """Clear what killed saves of ``folder`` left: staging folders (and the staging files older
    versions wrote inside the folder) are deleted; a set-aside old folder goes back in place when
    the new one never arrived, else its other entries are moved into the new one."""
    folder = os.path.abspath(os.fspath(folder))
    parent, name = os.path.split(folder)
    pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)$")
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = pattern.match(entry)
        if not match or _alive(int(match.group(2))):
            continue
        path = os.path.join(parent, entry)
        if match.group(1) == "tmp":
            shutil.rmtree(path, ignore_errors=True)
        elif not os.path.exists(folder):
            os.rename(path, folder)
        else:
            _move_extras(path, folder)
    staged_file = re.compile(r"\..+\.tmp-(\d+)$")
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        match = staged_file.match(entry)
        if match and not _alive(int(match.group(1))) and os.path.isfile(os.path.join(folder, entry)):
            os.remove(os.path.join(folder, entry))
