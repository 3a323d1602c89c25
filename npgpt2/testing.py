"""Synthetic GPT-2 checkpoints in the Hugging Face hub's exact layout, for tests and benchmarks.

Real GPT-2 weights are not needed to exercise the real loading path: ``write_checkpoint`` writes a
folder as the hub repository ``openai-community/gpt2`` holds it (``config.json``, a ``model.safetensors``
with keys ``wte.weight``, ``h.0.attn.c_attn.weight``, ... and the ``h.{i}.attn.bias`` mask buffers,
``vocab.json``, ``merges.txt``), and ``add_to_hub_cache`` files it into a huggingface_hub cache
(``models--org--name/{blobs,snapshots,refs}``) so that ``from_pretrained`` finds it offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from .config import GPT2Config
from .tokenizer import bundled_files


def random_state_dict(config: GPT2Config, seed: int = 0, layout: str = "hub",
                      logit_scale: float = 4.0) -> dict[str, np.ndarray]:
    """Random float32 GPT-2 weights, keyed as Hugging Face stores them.

    Scaled so the model is far from uniform (logits spread over tens of units), unlike a 0.02 init:
    parity tests then compare numbers that matter. ``logit_scale`` is about the standard deviation
    of the logits.

    layout: "hub" (no prefix, with the ``h.{i}.attn.bias`` causal-mask buffers, as in
    openai-community/gpt2) or "transformers" (``transformer.`` prefix, no buffers, as newer
    transformers saves).
    """
    rng = np.random.default_rng(seed)
    d, d_mlp, n_ctx = config.d_model, config.d_mlp, config.n_ctx

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def gain(n):
        return (1.0 + normal((n,), 0.2)).astype(np.float32)

    state = {
        "wte.weight": normal((config.d_vocab, d), logit_scale / np.sqrt(d)),
        "wpe.weight": normal((n_ctx, d), 0.5),
    }
    for l in range(config.n_layer):
        p = f"h.{l}."
        state.update({
            p + "ln_1.weight": gain(d), p + "ln_1.bias": normal((d,), 0.1),
            # q and k a little larger than 1/sqrt(d) so attention patterns are not flat
            p + "attn.c_attn.weight": normal((d, 3 * d), 1.5 / np.sqrt(d)),
            p + "attn.c_attn.bias": normal((3 * d,), 0.1),
            p + "attn.c_proj.weight": normal((d, d), 0.6 / np.sqrt(d)),
            p + "attn.c_proj.bias": normal((d,), 0.05),
            p + "ln_2.weight": gain(d), p + "ln_2.bias": normal((d,), 0.1),
            p + "mlp.c_fc.weight": normal((d, d_mlp), 1.0 / np.sqrt(d)),
            p + "mlp.c_fc.bias": normal((d_mlp,), 0.1),
            p + "mlp.c_proj.weight": normal((d_mlp, d), 0.6 / np.sqrt(d_mlp)),
            p + "mlp.c_proj.bias": normal((d,), 0.05),
        })
        if layout == "hub":
            state[p + "attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]
    state["ln_f.weight"] = gain(d)
    state["ln_f.bias"] = normal((d,), 0.1)
    if layout == "transformers":
        state = {"transformer." + k: v for k, v in state.items()}
    elif layout != "hub":
        raise ValueError(f"layout={layout!r}: expected 'hub' or 'transformers'")
    return state


def write_checkpoint(folder: str | os.PathLike, config: GPT2Config, state: dict[str, np.ndarray],
                     shards: int = 1, tokenizer_files: bool = True) -> str:
    """Write config.json, the weights (``model.safetensors``, or ``shards`` files plus
    ``model.safetensors.index.json``) and the BPE files into ``folder``. Returns the folder."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    keys = sorted(state)
    if shards == 1:
        save_file({k: np.ascontiguousarray(state[k]) for k in keys},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(np.array_split(np.array(keys, dtype=object), shards)):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: np.ascontiguousarray(state[k]) for k in part}, os.path.join(folder, fname),
                      metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    if tokenizer_files:
        vocab, merges = bundled_files()
        shutil.copyfile(vocab, os.path.join(folder, "vocab.json"))
        shutil.copyfile(merges, os.path.join(folder, "merges.txt"))
    return folder


def add_to_hub_cache(hub_cache: str | os.PathLike, repo_id: str, folder: str | os.PathLike,
                     revision: str = "main") -> str:
    """File every file of ``folder`` (sub-folders included) into a huggingface_hub cache as repo ``repo_id``.

    Lays out ``models--{org}--{name}/blobs/<sha256>``, ``snapshots/<commit>/<file>`` (symlinks to
    the blobs, as huggingface_hub makes them) and ``refs/<revision>``. Returns the snapshot folder.
    """
    folder = os.fspath(folder)
    repo_dir = os.path.join(os.fspath(hub_cache), "models--" + repo_id.replace("/", "--"))
    files = sorted(os.path.relpath(os.path.join(root, name), folder)
                   for root, _, names in os.walk(folder) for name in names)  # sub-folders too
    digest = hashlib.sha1()
    for name in files:
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    commit = digest.hexdigest()  # a 40-hex-digit id, as a git commit hash is
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            blob = os.path.join(repo_dir, "blobs", hashlib.sha256(f.read()).hexdigest())
        if not os.path.exists(blob):
            shutil.copyfile(os.path.join(folder, name), blob)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    with open(os.path.join(repo_dir, "refs", revision), "w") as f:
        f.write(commit)
    return snapshot


def synthetic_model(n_layer: int = 4, n_head: int = 4, n_embd: int = 64, n_ctx: int = 128, seed: int = 0,
                    **kwargs):
    """A small random GPT-2 (GPT-2's real vocabulary, so text works), written to a temporary folder
    in the hub's layout and loaded from there. ``kwargs`` go to ``from_pretrained``."""
    import tempfile

    from .loading import from_pretrained

    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ctx=n_ctx)
    folder = write_checkpoint(tempfile.mkdtemp(prefix="npgpt2-synthetic-"), cfg, random_state_dict(cfg, seed))
    return from_pretrained(folder, **kwargs)


def pretrained_or_synthetic(name: str = "gpt2", **shape):
    """``from_pretrained(name)`` if its files are already cached (or ``name`` is a folder), else
    ``synthetic_model(**shape)``, with a note saying so. For examples that should run anywhere and
    show real results where they can."""
    from .hub import OfflineError
    from .loading import from_pretrained

    try:
        return from_pretrained(name, local_files_only=True)
    except OfflineError:
        print(f"({name} is not cached: using a small random model, whose tables have the real shape "
              f"and meaning but noise in them; `npgpt2 download {name}` fetches the real one)\n")
    return synthetic_model(**shape)
