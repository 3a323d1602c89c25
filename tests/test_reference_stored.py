"""npgpt2 against stored Hugging Face transformers outputs (tests/reference/make_reference.py).

The checkpoint in tests/reference/tiny-gpt2 is in the hub's layout; the outputs were produced by
transformers' GPT2LMHeadModel (eager attention) on it, in float32 and float64. Tolerances:
float32 logits within 1e-4 absolute (activations 1e-4), float64 within 1e-9.
"""

import json
import os

import numpy as np
import pytest

import npgpt2
from npgpt2.testing import add_to_hub_cache
from conftest import REFERENCE_DIR

REF = np.load(os.path.join(REFERENCE_DIR, "tiny_gpt2_reference.npz"), allow_pickle=False)
FOLDER = os.path.join(REFERENCE_DIR, "tiny-gpt2")
TOL = {"float32": 1e-4, "float64": 1e-9}


def compare(model, dtype):
    tol = TOL[dtype]
    tokens = REF["tokens"]
    logits, cache = model.run_with_cache(tokens)
    ref_logits = REF[f"{dtype}_logits"]
    # the weights make a confident model, so an absolute tolerance on logits means something
    assert (ref_logits.max(-1) - ref_logits.min(-1)).min() > 10
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=tol)
    hidden, attentions = REF[f"{dtype}_hidden"], REF[f"{dtype}_attentions"]
    n = model.cfg.n_layer
    for l in range(n):
        np.testing.assert_allclose(cache[f"blocks.{l}.hook_resid_pre"], hidden[l], rtol=0, atol=tol)
        np.testing.assert_allclose(cache[f"blocks.{l}.attn.hook_pattern"], attentions[l], rtol=0, atol=tol)
    ln_out = cache["ln_final.hook_normalized"] * model.weights.ln_final_w + model.weights.ln_final_b
    np.testing.assert_allclose(ln_out, hidden[n], rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_local_folder_matches_transformers(dtype):
    model = npgpt2.from_pretrained(FOLDER, dtype=dtype)
    assert model.dtype == np.dtype(dtype)
    compare(model, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_offline_hub_cache_matches_transformers(dtype, hf_home):
    # the same files, filed in huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE=1) as a hub
    # repository would be, and found through huggingface_hub
    add_to_hub_cache(os.path.join(hf_home, "hub"), "npgpt2-test/reference-gpt2", FOLDER)
    files = npgpt2.hub.resolve("npgpt2-test/reference-gpt2")
    assert files.weights[0].startswith(os.path.join(hf_home, "hub", "models--npgpt2-test--reference-gpt2"))
    model = npgpt2.from_pretrained("npgpt2-test/reference-gpt2", dtype=dtype)
    assert model.source == "npgpt2-test/reference-gpt2@main"
    compare(model, dtype)


def test_reference_provenance_is_recorded():
    with open(os.path.join(REFERENCE_DIR, "tiny_gpt2_reference.json")) as f:
        meta = json.load(f)
    assert meta["attn_implementation"] == "eager" and meta["transformers"]
