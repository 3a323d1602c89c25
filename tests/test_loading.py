import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

import npgpt2
from npgpt2 import ConfigError, ModelNotFoundError, OfflineError, WeightsError
from npgpt2.testing import add_to_hub_cache, random_state_dict, write_checkpoint
from conftest import TINY


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_hub_layout_keys_are_what_the_hub_stores(tiny_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(tiny_dir, "model.safetensors"), "numpy") as f:
        keys = set(f.keys())
    assert "wte.weight" in keys and "h.0.attn.c_attn.weight" in keys and "h.1.attn.bias" in keys
    assert not any(k.startswith("transformer.") for k in keys) and "lm_head.weight" not in keys


def _memory_owner(array):
    """Follow .base to the object that owns an array's memory."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


def test_float32_weights_are_memory_mapped_not_copied(model, tiny_dir):
    import mmap

    # Every float32 weight is a plain, read-only ndarray whose memory is the mapped file itself
    # (a copy would own its memory; np.memmap would be a subclass).
    for name, array in model.weights.arrays():
        assert type(array) is np.ndarray, name
        assert not array.flags.writeable, name
        assert isinstance(_memory_owner(array), mmap.mmap), name
    # the tied unembedding is a view of W_E, not a second copy
    assert np.shares_memory(model.W_U, model.W_E)
    # and the mapping holds the file's bytes: the first row of W_E is where the header says
    from safetensors import safe_open

    with safe_open(os.path.join(tiny_dir, "model.safetensors"), "numpy") as f:
        np.testing.assert_array_equal(model.weights.W_E[0], f.get_tensor("wte.weight")[0])


def test_float64_weights_are_plain_copies(model64):
    for name, array in model64.weights.arrays():
        assert type(array) is np.ndarray and array.dtype == np.float64, name


def test_alias_loads_through_offline_hub_cache(tiny_dir, hf_home):
    # 'gpt2' means openai-community/gpt2; here the hub cache holds the tiny model under that name
    hub = os.path.join(hf_home, "hub")
    add_to_hub_cache(hub, "openai-community/gpt2", tiny_dir)
    try:
        m = npgpt2.from_pretrained("gpt2")
        assert m.source == "openai-community/gpt2@main" and m.cfg == TINY
        ref = npgpt2.from_pretrained(tiny_dir)
        toks = np.array([[464, 3290, 318]])
        np.testing.assert_array_equal(m(toks), ref(toks))
    finally:
        shutil.rmtree(os.path.join(hub, "models--openai-community--gpt2"))


def test_transformers_layout_with_prefix_and_lm_head(tmp_path, model):
    state = random_state_dict(TINY, seed=0, layout="transformers")
    state["lm_head.weight"] = state["transformer.wte.weight"].copy()
    folder = write_checkpoint(tmp_path / "new-layout", TINY, state)
    m = npgpt2.from_pretrained(folder)
    toks = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(m(toks), model(toks))  # same weights, other key style


def test_sharded_checkpoint(tmp_path, model):
    folder = write_checkpoint(tmp_path / "sharded", TINY, random_state_dict(TINY, seed=0), shards=3)
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    m = npgpt2.from_pretrained(folder)
    toks = np.array([[5, 6, 7]])
    np.testing.assert_array_equal(m(toks), model(toks))


def test_sharded_checkpoint_through_hub_cache(tmp_path, hf_home, model):
    folder = write_checkpoint(tmp_path / "sharded-hub", TINY, random_state_dict(TINY, seed=0), shards=2)
    add_to_hub_cache(os.path.join(hf_home, "hub"), "npgpt2-test/sharded", folder)
    m = npgpt2.from_pretrained("npgpt2-test/sharded")
    np.testing.assert_array_equal(m(np.array([[9, 8]])), model(np.array([[9, 8]])))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_is_upcast(tmp_path, half):
    state = random_state_dict(TINY, seed=0)
    if half == "float16":
        stored = {k: v.astype(np.float16) for k, v in state.items()}
        expected = {k: v.astype(np.float32) for k, v in stored.items()}
    else:  # bfloat16 = the top 16 bits of a float32 (truncation here)
        bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in state.items()}
        expected = {k: (b.astype(np.uint32) << 16).view(np.float32) for k, b in bits.items()}
        stored = None
    # the float32 model with the rounded weights (its own folder: the file stays mapped)
    ref = npgpt2.from_pretrained(write_checkpoint(tmp_path / "ref", TINY, expected))
    folder = write_checkpoint(tmp_path / half, TINY, expected)
    if stored is not None:
        save_file(stored, os.path.join(folder, "model.safetensors"))
    else:
        # safetensors' NumPy API has no bfloat16: write the header by hand, as torch would
        header, offset, blobs = {}, 0, []
        for k in sorted(bits):
            raw = bits[k].tobytes()
            header[k] = {"dtype": "BF16", "shape": list(bits[k].shape), "data_offsets": [offset, offset + len(raw)]}
            offset += len(raw)
            blobs.append(raw)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))
    m = npgpt2.from_pretrained(folder)
    assert m.weights.W_E.dtype == np.float32
    toks = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(m(toks), ref(toks))
    m64 = npgpt2.from_pretrained(folder, dtype="float64")
    np.testing.assert_allclose(m64(toks), ref(toks), atol=1e-4)


def test_float64(model, model64, tokens):
    assert model64.weights.blocks[0].W_in.dtype == np.float64
    out = model64(tokens)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, model(tokens), atol=1e-4)


# ---------------------------------------------------------------------------------- bad input
def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError, match="gpt2-medium"):
        npgpt2.from_pretrained("gpt3")


def test_offline_without_cached_copy_says_how_to_download():
    with pytest.raises(OfflineError, match="npgpt2 download gpt2-xl"):
        npgpt2.from_pretrained("gpt2-xl")


def test_bad_dtype():
    with pytest.raises(ValueError, match="float16.*expected one of float32, float64"):
        npgpt2.from_pretrained("gpt2", dtype="float16")


def test_folder_with_only_pickle_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="pytorch_model.bin.*never unpickles"):
        npgpt2.from_pretrained(str(tmp_path))


def test_truncated_file(tiny_dir, tmp_path):
    folder = copy_dir(tiny_dir, tmp_path / "trunc")
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(WeightsError, match="not a complete safetensors file"):
        npgpt2.from_pretrained(folder)


def test_missing_weights_file(tiny_dir, tmp_path):
    folder = copy_dir(tiny_dir, tmp_path / "nofile")
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(ModelNotFoundError, match="no model.safetensors"):
        npgpt2.from_pretrained(folder)


def edited(tmp_path, change):
    state = random_state_dict(TINY, seed=0)
    change(state)
    return write_checkpoint(tmp_path / "edited", TINY, state)


def test_missing_key_named_with_shape(tmp_path):
    folder = edited(tmp_path, lambda s: s.pop("h.1.mlp.c_fc.bias"))
    with pytest.raises(WeightsError, match=r"missing h.1.mlp.c_fc.bias.*expected shape \[256\]"):
        npgpt2.from_pretrained(folder)


def test_wrong_shape_named(tmp_path):
    def change(s):
        s["h.0.attn.c_attn.weight"] = s["h.0.attn.c_attn.weight"][:, :-1].copy()
    with pytest.raises(WeightsError, match=r"h.0.attn.c_attn.weight has shape \[64, 191\]; expected \[64, 192\]"):
        npgpt2.from_pretrained(edited(tmp_path, change))


def test_unknown_key_refused(tmp_path):
    def change(s):
        s["h.0.attn.rotary"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match="h.0.attn.rotary"):
        npgpt2.from_pretrained(edited(tmp_path, change))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights(tmp_path, bad):
    def change(s):
        s["h.1.ln_2.bias"][5] = bad
    with pytest.raises(WeightsError, match=r"h.1.ln_2.bias holds 1 non-finite.*index \(5,\)"):
        npgpt2.from_pretrained(edited(tmp_path, change))


@pytest.mark.parametrize("key,value,match", [
    ("activation_function", "relu", "only 'gelu_new'"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("model_type", "llama", "expected 'gpt2'"),
    ("n_head", 5, "not divisible"),
])
def test_config_refuses_what_it_cannot_run(tiny_dir, tmp_path, key, value, match):
    folder = copy_dir(tiny_dir, tmp_path / "cfg")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match=match):
        npgpt2.from_pretrained(folder)


def test_n_params_counts_tied_unembedding_once(model):
    c = TINY
    per_block = 2 * 2 * c.d_model + c.d_model * 3 * c.d_model + 3 * c.d_model + c.d_model ** 2 + c.d_model \
        + 2 * c.d_model * c.d_mlp + c.d_mlp + c.d_model
    expected = c.d_vocab * c.d_model + c.n_ctx * c.d_model + c.n_layer * per_block + 2 * c.d_model
    assert model.n_params() == expected
