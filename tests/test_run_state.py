"""Run state belongs to the call: concurrent and nested calls on one model are each correct."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from npgpt2 import InputError, KeyValueCache
from npgpt2.testing import assert_close

V = 50257


def _zero(act, hook):
    return act * 0


def _inputs(n, seed=0):
    """n token arrays of different lengths, so a mixed-up cache shows in its shape."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, (1 + i % 2, 3 + i % 7)) for i in range(n)]


def test_run_with_cache_from_many_threads_keeps_each_call_its_own_cache(model):
    inputs = _inputs(24)
    expected = [model(t) for t in inputs]

    def call(i):
        tokens = inputs[i % len(inputs)]
        logits, cache = model.run_with_cache(tokens)
        return i, logits, cache

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(call, range(200)))
    for i, logits, cache in results:
        tokens = inputs[i % len(inputs)]
        # every key there, with this call's shapes and values
        assert len(cache) == len([n for n in model.hook_names() if not n.endswith("hook_result")])
        np.testing.assert_array_equal(cache["hook_embed"], model.W_E[tokens])
        assert cache["blocks.1.attn.hook_pattern"].shape == (tokens.shape[0], 4, tokens.shape[1], tokens.shape[1])
        assert_close(logits, expected[i % len(inputs)], rel=1e-5)


def test_run_with_hooks_in_one_thread_does_not_touch_plain_forwards_in_another(model, tokens):
    baseline = model(tokens)
    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", _zero)])
    assert np.abs(ablated - baseline).max() > 1e-3  # the hook does change the output
    stop = threading.Event()

    def hooker():
        while not stop.is_set():
            np.testing.assert_array_equal(
                model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", _zero)]), ablated)

    threads = [threading.Thread(target=hooker) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        plain = [model(tokens) for _ in range(100)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    for out in plain:
        np.testing.assert_array_equal(out, baseline)
    assert model._hooks == {}  # nothing left registered
    np.testing.assert_array_equal(model(tokens), baseline)


def test_a_hooks_block_is_seen_by_its_own_thread_only(model, tokens):
    baseline = model(tokens)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with model.hooks([("blocks.1.hook_resid_post", _zero)]):
            seen["inside"] = model(tokens)
            inside.set()
            done.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    try:
        other = model(tokens)  # another thread, while the block is open
    finally:
        done.set()
        t.join()
    np.testing.assert_array_equal(other, baseline)
    assert not np.allclose(seen["inside"], baseline)


def test_add_hook_from_many_threads_loses_none(model, tokens):
    calls = []

    def count(act, hook):
        calls.append(1)

    def add(_):
        for _ in range(50):
            model.add_hook("hook_embed", count)

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(add, range(8)))
        model(tokens)
        assert len(calls) == 400
    finally:
        model.reset_hooks()
    assert model._hooks == {}


def test_a_forward_inside_a_hook_keeps_the_outer_cache_intact(model, tokens):
    inner_tokens = np.random.default_rng(7).integers(0, V, (3, 5))
    inner = {}

    def nested(act, hook):
        if inner:  # the hooks block applies to the inner calls too: nest once
            return
        inner["entered"] = True
        inner["logits"] = model(inner_tokens)
        inner["cached"], inner["cache"] = model.run_with_cache(inner_tokens)

    with model.hooks([("blocks.0.hook_resid_post", nested)]):
        logits, cache = model.run_with_cache(tokens)
    # the outer call's cache holds the outer call's activations, computed as without the nesting
    assert cache["hook_embed"].shape == tokens.shape + (64,)
    _, plain_cache = model.run_with_cache(tokens)
    for name in ("hook_embed", "blocks.1.attn.hook_pattern", "ln_final.hook_scale"):
        np.testing.assert_array_equal(cache[name], plain_cache[name])
    assert_close(model(tokens), logits, rel=1e-5)
    # and the inner calls are themselves correct
    assert inner["cache"]["hook_embed"].shape == (3, 5, 64)
    np.testing.assert_array_equal(inner["cache"]["hook_embed"], model.W_E[inner_tokens])


def test_a_stream_leaves_no_hook_behind(model, tokens):
    baseline = model(tokens)
    stream = model.generate_stream(tokens[0, :4], max_new_tokens=10,
                                   fwd_hooks=[("blocks.0.hook_mlp_out", _zero)])
    first_two = [next(stream), next(stream)]
    np.testing.assert_array_equal(model(tokens), baseline)  # the paused stream's hooks are not active
    rest = list(stream)
    # the stream's tokens are the greedy continuation of the ablated model, step by step
    sequence = tokens[:1, :4]
    for t in first_two + rest:
        logits = model.run_with_hooks(sequence, fwd_hooks=[("blocks.0.hook_mlp_out", _zero)])
        assert t == logits[0, -1].argmax()
        sequence = np.concatenate([sequence, [[t]]], axis=1)
    assert model._hooks == {}


def test_interleaved_streams_each_use_their_own_hooks(model, tokens):
    prompt = tokens[0, :4]
    hooks_a = [("blocks.0.hook_mlp_out", _zero)]
    hooks_b = [("blocks.1.hook_attn_out", _zero)]
    alone_a = model.generate(prompt, max_new_tokens=8, fwd_hooks=hooks_a, return_type="tokens")
    alone_b = model.generate(prompt, max_new_tokens=8, fwd_hooks=hooks_b, return_type="tokens")
    assert not np.array_equal(alone_a, alone_b)
    a = model.generate_stream(prompt, max_new_tokens=8, fwd_hooks=hooks_a)
    b = model.generate_stream(prompt, max_new_tokens=8, fwd_hooks=hooks_b)
    got_a, got_b = [], []
    for ta, tb in zip(a, b):
        got_a.append(ta)
        got_b.append(tb)
    np.testing.assert_array_equal(got_a, alone_a[4:])
    np.testing.assert_array_equal(got_b, alone_b[4:])
    assert model._hooks == {}


@pytest.mark.parametrize("layers", [dict(stop_at_layer=1), dict(start_at_layer=1),
                                    dict(start_at_layer=1, stop_at_layer=2)])
def test_key_value_cache_with_a_layer_range_is_refused(model, tokens, layers):
    kv = KeyValueCache(model.cfg, 2, model.dtype)
    model(tokens[:, :3], past_kv=kv)
    assert kv.length == 3
    inp = np.zeros((2, 2, 64), np.float32) if "start_at_layer" in layers else tokens[:, 3:5]
    with pytest.raises(InputError, match="past_kv"):
        model(inp, past_kv=kv, **layers)
    assert kv.length == 3  # untouched
    # and the cache still gives the right next step
    step = model(tokens[:, 3:4], past_kv=kv)
    np.testing.assert_allclose(step[:, 0], model(tokens[:, :4])[:, -1], atol=1e-4)
