"""``from_pretrained``: files (hub.py) -> arrays (weights.py) -> a model (model.py)."""

from __future__ import annotations

import numpy as np

from . import hub
from .config import ConfigError, GPT2Config
from .model import GPT2
from .tokenizer import Tokenizer, WordTokenizer
from .weights import read_checkpoint, weights_from_state_dict

_DTYPES = ("float32", "float64")


def from_pretrained(name: str = "gpt2", revision: str | None = None, cache_dir: str | None = None,
                    local_files_only: bool = False, dtype: str = "float32", fold_ln: bool = False,
                    center_writing_weights: bool = False, center_unembed: bool = False,
                    fold_value_biases: bool = False, refactor_factored_attn_matrices: bool = False,
                    attn_implementation: str = "blockwise",
                    default_prepend_bos: bool = False) -> GPT2:
    """Load a GPT-2 for the NumPy forward pass.

    name: an alias ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"), a hub repo id
        ("openai-community/gpt2"), or a local folder with config.json and safetensors weights.
    revision, cache_dir, local_files_only: passed to huggingface_hub (HF_HUB_OFFLINE=1 is honoured).
    dtype: "float32" (as published; the weights stay memory-mapped) or "float64" (the whole
        forward pass in double precision, for exact analysis).
    fold_ln, center_writing_weights, center_unembed, fold_value_biases: TransformerLens's weight
        processing (see ``npgpt2.processing``); all off by default, so the logits equal Hugging
        Face's. TransformerLens turns the first three on by default.
    refactor_factored_attn_matrices: TransformerLens's even, orthogonal refactoring of each head's
        W_Q/W_K and W_V/W_O pairs (same products, same logits; see ``npgpt2.processing``).
    attn_implementation: "blockwise" (the default: fast) or "eager" (the textbook computation,
        every intermediate named; used anyway when a hook or the cache asks for the pattern).
    default_prepend_bos: put <|endoftext|> in front of text wherever a call does not say
        (``model.cfg.default_prepend_bos``). False, as GPT-2 and Hugging Face; True gives
        TransformerLens's tokens and positions.
    """
    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
    files = hub.resolve(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config = GPT2Config.from_json_file(files.config)
    config.default_prepend_bos = default_prepend_bos
    weights = weights_from_state_dict(read_checkpoint(files.weights), config, dtype=np.dtype(dtype))
    # The BPE tables are built in a thread of their own (about 0.2 s), started once the weights are
    # mapped: loading stays as fast as the mapping, and a forward call never builds them itself.
    tokenizer = _tokenizer(files, config)
    tokenizer.start_loading()
    model = GPT2(config, weights, tokenizer, name=name, attn_implementation=attn_implementation)
    model.source = files.source
    model.files = files  # the local paths of config, weights and BPE files
    return model.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                 center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                 refactor_factored_attn_matrices=refactor_factored_attn_matrices)


def _tokenizer(files: hub.CheckpointFiles, config: GPT2Config):
    """The checkpoint's own BPE files, its word vocabulary (tokenizer.json), or GPT-2's shipped BPE."""
    if files.vocab and files.merges:
        return Tokenizer(files.vocab, files.merges)
    if files.tokenizer:
        tokenizer = WordTokenizer.from_file(files.tokenizer)
        if tokenizer.n_vocab != config.vocab_size:
            raise ConfigError(f"{files.tokenizer} has {tokenizer.n_vocab} words but config.json says "
                              f"vocab_size={config.vocab_size}")
        return tokenizer
    return Tokenizer()
