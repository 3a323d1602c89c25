"""``model.save_pretrained(folder)``: the model as the hub stores GPT-2, loadable by npgpt2 and by
transformers' ``GPT2LMHeadModel.from_pretrained(folder)``.

The folder gets ``config.json``, ``model.safetensors`` (float32, keys without a prefix: ``wte.weight``,
``h.0.attn.c_attn.weight`` ...; the tied unembedding is not stored, it is ``wte.weight``),
and the model's tokenizer files (GPT-2's ``vocab.json`` and ``merges.txt``, or the ``tokenizer.json``
of a word vocabulary).

Writing is atomic: every file is first written whole to a temporary name in the folder and flushed
to disk, and only then renamed over its final name (the weights last). An interrupted save leaves
the files that were there before, never a half-written one.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .weights import _BLOCK_KEYS, GPT2Weights


def hub_state_dict(weights: GPT2Weights, n_layer: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """GPT2Weights -> {hub key: contiguous array in ``dtype``}; the tied W_U is left out."""
    from .training.adamw import is_tied

    def arr(a):
        return np.ascontiguousarray(a, dtype=dtype)

    state = {"wte.weight": arr(weights.W_E), "wpe.weight": arr(weights.W_pos),
             "ln_f.weight": arr(weights.ln_final_w), "ln_f.bias": arr(weights.ln_final_b)}
    for l in range(n_layer):
        block = weights.blocks[l]
        for suffix, (field, _) in _BLOCK_KEYS.items():
            state[f"h.{l}.{suffix}"] = arr(getattr(block, field))
    if not is_tied(weights):
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

    from .training.adamw import is_tied

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    config = model.cfg.to_hf_dict()
    config["tie_word_embeddings"] = is_tied(model.weights)
    config["torch_dtype"] = "float32"
    state = hub_state_dict(model.weights, model.cfg.n_layer)

    staged = []  # (temporary path, final path), renamed only once every file is complete
    try:
        def stage(name, write):
            tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
            staged.append((tmp, os.path.join(folder, name)))
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())

        def write_json(path):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)

        for name, write in model.tokenizer.file_writers().items():  # vocab.json + merges.txt, or tokenizer.json
            stage(name, write)
        stage("config.json", write_json)
        stage("model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, final in staged:  # the weights last
        os.replace(tmp, final)
    return folder
