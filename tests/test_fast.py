"""fast.py computes model.py's blocks: the same numbers, whatever the number of threads."""

import threading

import numpy as np
import pytest

import npgpt2
from npgpt2 import fast, metrics, threads
from npgpt2.testing import assert_close, synthetic_model

V = 50257


@pytest.fixture(autouse=True)
def every_size_takes_the_fast_path(monkeypatch):
    # the arithmetic is tested on small shapes too; the model only takes it from fast.MIN_ROWS rows
    monkeypatch.setattr(fast, "MIN_ROWS", 1)


@pytest.fixture(scope="module")
def models():
    # n_ctx 160: two query blocks (128) per head; batch x pos rows up to 600: up to four tiles (256)
    return {dtype: synthetic_model(n_layer=3, n_head=4, n_embd=64, n_ctx=160, seed=3, dtype=dtype)
            for dtype in ("float32", "float64")}


def _plain(model, *args, **kwargs):
    model.fast_path = False
    try:
        return model(*args, **kwargs)
    finally:
        model.fast_path = True


def _calls(model, monkeypatch):
    calls = []
    real = fast.blocks
    monkeypatch.setattr(fast, "blocks", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("shape", [(1, 160), (3, 70), (2, 1), (1, 65), (4, 150)])
def test_fast_path_equals_the_textbook_blocks(models, shape, monkeypatch):
    tokens = np.random.default_rng(shape[1]).integers(0, V, shape)
    for dtype in ("float32", "float64"):
        m = models[dtype]
        calls = _calls(m, monkeypatch)
        fast_logits = m(tokens)
        assert calls == [1]  # it did take the fast path
        plain = _plain(m, tokens)
        assert calls == [1]  # and this did not
        assert np.abs(plain).max() > 1  # logits that matter
        np.testing.assert_array_equal(fast_logits, plain, err_msg=f"{dtype} logits {shape}")  # the same arithmetic


@pytest.mark.parametrize("steps", [(70, 80), (1, 130, 20), (150, 1, 9)])
def test_fast_path_with_a_key_value_cache_equals_the_textbook_blocks(models, steps, monkeypatch):
    # a prompt into an empty cache, then more positions after it: queries in blocks of 128 that
    # start after the cached keys (70 + 80: a block of 58 after 70 keys, then one of 22 after 198)
    tokens = np.random.default_rng(sum(steps)).integers(0, V, (2, sum(steps)))
    for dtype in ("float32", "float64"):
        m = models[dtype]
        calls = _calls(m, monkeypatch)
        caches = {way: npgpt2.KeyValueCache(m.cfg, 2, m.dtype) for way in ("fast", "plain")}
        at = 0
        for n in steps:
            part = tokens[:, at: at + n]
            fast_logits = m(part, past_kv=caches["fast"])
            plain = _plain(m, part, past_kv=caches["plain"])
            np.testing.assert_array_equal(fast_logits, plain, err_msg=f"{dtype}, positions {at}..{at + n - 1}")
            at += n
        assert len(calls) == len(steps)  # every step went the fast way (MIN_ROWS is 1 here)
        for l in range(m.cfg.n_layer):
            for a, b in zip(caches["fast"].layer(l), caches["plain"].layer(l)):
                np.testing.assert_array_equal(a, b)
        whole = _plain(m, tokens)  # and it is the model: the cached steps give the whole prompt's logits
        assert_close(fast_logits, whole[:, -steps[-1]:], rel=1e-12 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize("elements, pieces", [
    (1, [(1, 1), (1, 1)]),  # one head at a time
    (1 << 14, [(1, 3), (1, 1)]),  # 3 then 1 of a batch row's 4 heads at 70 tokens
    (1 << 16, [(3, 4)]),  # all three batch rows' heads at once (13 heads' scores fit)
])
def test_heads_taken_together_or_apart_give_the_same_numbers(models, elements, pieces, monkeypatch):
    # attention takes heads together while a block's scores stay within HEAD_BATCH_ELEMENTS:
    # part of a batch row's heads, or several whole batch rows
    tokens = np.random.default_rng(11).integers(0, V, (3, 70))
    m = models["float64"]
    monkeypatch.setattr(fast, "HEAD_BATCH_ELEMENTS", elements)
    assert [(len(b), len(h)) for b, h in fast._head_batches(range(0, 12), 4, 70)][:len(pieces)] == pieces
    logits = m(tokens)
    np.testing.assert_array_equal(logits, _plain(m, tokens), err_msg=f"heads batched within {elements} elements")
    value, grads = _grads(m, tokens)  # and backwards, in the same pieces
    plain_value, plain = _grads(m, tokens, fast_path=False)
    assert value == pytest.approx(plain_value, rel=1e-12)
    _assert_same_grads(grads, plain, 1e-12, f"gradients, heads batched within {elements} elements")


def test_fast_path_with_layer_ranges_and_loss(models):
    m = models["float64"]
    tokens = np.random.default_rng(0).integers(0, V, (2, 90))
    resid = m(tokens, stop_at_layer=2)
    assert_close(resid, _plain(m, tokens, stop_at_layer=2), rel=1e-12)
    assert_close(m(resid, start_at_layer=2), _plain(m, resid, start_at_layer=2), rel=1e-12)
    assert m.loss(tokens) == pytest.approx(_plain(m, tokens, return_type="loss"), rel=1e-12)


def test_fast_path_on_processed_weights(tmp_path):
    # folded layer norms leave no gain or bias: the fast path must skip them as model.py does
    m = synthetic_model(n_layer=2, n_head=4, n_embd=64, n_ctx=128, seed=1, dtype="float64")
    m.process_weights(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    assert m.weights.blocks[0].ln1_w is None
    tokens = np.random.default_rng(2).integers(0, V, (2, 100))
    assert_close(m(tokens), _plain(m, tokens), rel=1e-12)


def test_every_thread_count_gives_the_same_numbers_bit_for_bit(models):
    tokens = np.random.default_rng(7).integers(0, V, (2, 150))
    before = npgpt2.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            npgpt2.set_num_threads(n)
            assert npgpt2.get_num_threads() == n
            results.append({d: m(tokens) for d, m in models.items()})
    finally:
        npgpt2.set_num_threads(before)
    for r in results[1:]:
        for d in r:
            np.testing.assert_array_equal(r[d], results[0][d])


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_num_threads_refuses_what_is_not_a_thread_count(bad):
    with pytest.raises(ValueError, match="expected a whole number of threads >= 1"):
        npgpt2.set_num_threads(bad)


def test_results_do_not_share_the_reused_buffers(models):
    m = models["float32"]
    a_tokens, b_tokens = (np.random.default_rng(s).integers(0, V, (1, 80)) for s in (1, 2))
    a = m(a_tokens, stop_at_layer=3)
    a_copy = a.copy()
    m(b_tokens, stop_at_layer=3)  # the same shape: the same workspace, overwritten
    np.testing.assert_array_equal(a, a_copy)


def test_concurrent_fast_forwards_are_each_correct(models):
    m = models["float32"]
    inputs = [np.random.default_rng(s).integers(0, V, (1 + s % 2, 40 + 13 * s)) for s in range(6)]
    expected = [m(t) for t in inputs]
    assert _in_threads(len(inputs), 5, lambda i: np.array_equal(m(inputs[i]), expected[i])) == []


def _in_threads(n: int, rounds: int, check) -> list[int]:
    """check(i) on n threads at once, ``rounds`` times each: the i whose check failed."""
    failures = []

    def worker(i):
        for _ in range(rounds):
            if not check(i):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def test_anyone_looking_inside_takes_the_textbook_path(models, monkeypatch):
    m = models["float32"]
    tokens = np.random.default_rng(4).integers(0, V, (1, 30))
    calls = _calls(m, monkeypatch)
    m.run_with_cache(tokens, names_filter="blocks.1.hook_resid_mid")
    m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", lambda a, h: None)])
    m.run_with_cache(tokens, names_filter="blocks.1.hook_resid_mid", incl_bwd=True, return_type="loss")
    m.run_with_hooks(tokens, return_type="loss", bwd_hooks=[("blocks.0.hook_resid_mid", lambda g, h: None)])
    m.attn_implementation = "eager"
    try:
        m(tokens)
    finally:
        m.attn_implementation = "blockwise"
    assert calls == []
    m(tokens)
    assert calls == [1]


def test_kept_attention_equals_the_eager_textbook_path(models):
    # run_with_cache keeps scores and pattern without a hook changing them: filled a block of
    # queries at a time (ops.causal_attention_kept), the eager path's numbers
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        m = models[dtype]
        tokens = np.random.default_rng(8).integers(0, V, (2, 150))
        mask = np.ones_like(tokens)
        mask[1, :37] = 0  # left padding in the second row
        names = ["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern", "blocks.2.attn.hook_z"]
        kept_logits, kept = m.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        m.attn_implementation = "eager"
        try:
            eager_logits, eager = m.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        finally:
            m.attn_implementation = "blockwise"
        scores, eager_scores = kept["blocks.1.attn.hook_attn_scores"], eager["blocks.1.attn.hook_attn_scores"]
        np.testing.assert_array_equal(np.isneginf(scores), np.isneginf(eager_scores))  # masked: the same keys
        finite = np.isfinite(eager_scores)
        assert_close(scores[finite], eager_scores[finite], rel=tol, what=f"{dtype} scores")
        pattern, eager_pattern = kept["blocks.1.attn.hook_pattern"], eager["blocks.1.attn.hook_pattern"]
        assert_close(pattern, eager_pattern, rel=tol, what=f"{dtype} pattern")
        np.testing.assert_array_equal(pattern == 0, eager_pattern == 0)
        assert_close(kept["blocks.2.attn.hook_z"], eager["blocks.2.attn.hook_z"], rel=tol, what=f"{dtype} z")
        assert_close(kept_logits, eager_logits, rel=tol, what=f"{dtype} logits")


def _grads(model, input, fast_path=True, **kwargs):
    model.fast_path = fast_path
    try:
        return model.value_and_grad(input, **kwargs)
    finally:
        model.fast_path = True


def _assert_same_grads(g, expected, tol, what):
    pairs = [(f, getattr(g, f), getattr(expected, f)) for f in ("W_E", "W_pos", "ln_final_w", "ln_final_b", "W_U", "b_U")]
    for l, (b, e) in enumerate(zip(g.blocks, expected.blocks)):
        pairs += [(f"blocks.{l}.{f}", getattr(b, f), getattr(e, f)) for f in b.__dataclass_fields__]
    for name, a, e in pairs:
        if e is None:
            assert a is None, f"{what}: {name} should be None"
            continue
        if np.abs(e).max() == 0:  # (blocks before start_at_layer)
            np.testing.assert_array_equal(a, e)
            continue
        assert_close(a, e, rel=tol, what=f"{what} {name}")


@pytest.mark.parametrize("shape", [(1, 160), (3, 70), (2, 2), (4, 150)])
def test_gradients_on_the_fast_path_equal_the_textbook_ones(models, shape, monkeypatch):
    # value_and_grad with nobody looking inside: fast.blocks keeps a tape, fast.blocks_backward
    # reads it; backward.py's _block_backward is the reference
    tokens = np.random.default_rng(shape[1]).integers(0, V, shape)
    calls = []
    real = fast.blocks_backward
    monkeypatch.setattr(fast, "blocks_backward", lambda *a: calls.append(1) or real(*a))

    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        m = models[dtype]
        for metric in (None, metrics.logit_diff(5, 7)):
            value, g = _grads(m, tokens, metric=metric)
            assert calls == [1]  # it did take the fast path
            calls.clear()
            plain_value, plain = _grads(m, tokens, fast_path=False, metric=metric)
            assert calls == []  # and this did not
            assert value == pytest.approx(plain_value, rel=tol)
            _assert_same_grads(g, plain, tol, f"{dtype} {shape} metric={metric}")


def test_fast_gradients_from_a_layer_on_and_on_processed_weights(models):
    m = models["float64"]
    tokens = np.random.default_rng(3).integers(0, V, (2, 90))
    resid = m(tokens, stop_at_layer=1)
    value, g = _grads(m, resid, start_at_layer=1, tokens=tokens)
    plain_value, plain = _grads(m, resid, fast_path=False, start_at_layer=1, tokens=tokens)
    assert value == pytest.approx(plain_value, rel=1e-12)
    _assert_same_grads(g, plain, 1e-12, "start_at_layer=1")

    p = synthetic_model(n_layer=2, n_head=4, n_embd=64, n_ctx=128, seed=1, dtype="float64")
    p.process_weights(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    tokens = np.random.default_rng(2).integers(0, V, (2, 100))
    _, g = _grads(p, tokens)
    _, plain = _grads(p, tokens, fast_path=False)
    assert g.blocks[0].ln1_w is None and not np.shares_memory(g.W_U, g.W_E) and g.b_U is not None
    _assert_same_grads(g, plain, 1e-12, "processed")


def test_fast_gradients_are_the_same_bits_on_every_thread_count_and_call(models):
    m = models["float32"]
    tokens = [np.random.default_rng(s).integers(0, V, (2, 150)) for s in (7, 8)]
    before = npgpt2.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            npgpt2.set_num_threads(n)
            results.append(_grads(m, tokens[0])[1])
    finally:
        npgpt2.set_num_threads(before)
    first = results[0]
    kept = first.blocks[1].W_qkv.copy()
    other = _grads(m, tokens[1])[1]  # the same shape: the same tape and workspace, overwritten
    np.testing.assert_array_equal(first.blocks[1].W_qkv, kept)  # what was returned is not reused
    assert np.abs(other.blocks[1].W_qkv - kept).max() > 0
    for r in results[1:]:
        for b, e in zip(r.blocks, first.blocks):
            for f in b.__dataclass_fields__:
                np.testing.assert_array_equal(getattr(b, f), getattr(e, f))
        np.testing.assert_array_equal(r.W_E, first.W_E)


def test_few_rows_take_the_textbook_blocks(models, monkeypatch):
    monkeypatch.setattr(fast, "MIN_ROWS", 128)
    m = models["float32"]
    calls = _calls(m, monkeypatch)
    m(np.random.default_rng(0).integers(0, V, (2, 63)))  # 126 rows
    assert calls == []
    m(np.random.default_rng(0).integers(0, V, (2, 64)))  # 128 rows
    assert calls == [1]


def test_concurrent_fast_gradients_are_each_correct(models):
    # each call has its own tape; the workspaces are taken one call at a time
    m = models["float32"]
    inputs = [np.random.default_rng(s).integers(0, V, (1 + s % 2, 40 + 13 * s)) for s in range(4)]
    expected = [_grads(m, t)[1] for t in inputs]

    def same(i):
        g = m.value_and_grad(inputs[i])[1]
        return np.array_equal(g.W_E, expected[i].W_E) and np.array_equal(g.blocks[0].W_qkv, expected[i].blocks[0].W_qkv)

    assert _in_threads(len(inputs), 3, same) == []


def test_a_metric_with_no_hook_runs_the_fast_backward_for_activations_only(models, monkeypatch):

    m = models["float64"]
    tokens = np.random.default_rng(5).integers(0, V, (2, 70))
    calls = []
    real = fast.blocks_backward
    monkeypatch.setattr(fast, "blocks_backward", lambda *a: calls.append(a[-1]) or real(*a))
    metric = metrics.logit_diff(5, 7)
    value = m.run_with_hooks(tokens, metric=metric)
    assert calls == [False]  # the fast blocks, without the weights' gradients
    assert value == pytest.approx(metric(_plain(m, tokens)), rel=1e-12)


@pytest.mark.skipif(not threads._blas.found, reason="no BLAS whose thread count npgpt2 can set")
@pytest.mark.parametrize("shape", [(1, 20), (2, 100), (1, 200)])
def test_no_product_takes_blas_as_another_thread_left_it(shape, monkeypatch):
    # BLAS's thread count belongs to the process: tiled work in another thread holds it at one thread
    # meanwhile. Every product of a call, forward or backward, textbook path or eager attention, must
    # give the same bits whether BLAS was left at one thread or at npgpt2's own count.
    monkeypatch.setattr(fast, "MIN_ROWS", 128)  # (the real threshold: (1, 20) is below it)
    m = synthetic_model(n_layer=2, n_head=4, n_embd=256, n_ctx=256, seed=3, dtype="float32")
    tokens = np.random.default_rng(1).integers(0, m.cfg.d_vocab, shape)
    seen = []
    calls = {
        "forward": lambda: m(tokens),
        "cache, eager attention, per-head results": lambda: _eager_cache(m, tokens),
        "gradients with a backward hook": lambda: _hooked_grads(m, tokens, None),
        "a logit difference's gradients with a backward hook": lambda: _hooked_grads(m, tokens, metrics.logit_diff(5, 7)),
        "gradients, textbook path": lambda: _grads(m, tokens, fast_path=False)[1].blocks[0].W_qkv,
    }
    before = npgpt2.get_num_threads()
    npgpt2.set_num_threads(2)
    try:
        for what, call in calls.items():
            results = []
            for left_at in (1, 2):
                threads._blas.set(left_at)  # as another thread's tiled work, or nothing, left it
                results.append(call())
            for a, b in zip(*(r if isinstance(r, list) else [r] for r in results)):
                assert np.array_equal(a, b), f"{what} at {shape}: BLAS's thread count changed the bits"
            seen.append(what)
    finally:
        npgpt2.set_num_threads(before)
    assert len(seen) == len(calls)


def _eager_cache(m, tokens):
    m.attn_implementation, m.cfg.use_attn_result = "eager", True
    try:
        logits, cache = m.run_with_cache(tokens)
    finally:
        m.attn_implementation, m.cfg.use_attn_result = "blockwise", False
    return [logits, cache["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_result"]]


def _hooked_grads(m, tokens, metric):
    # a backward hook that changes nothing: the gradient takes backward.py's textbook path
    with m.hooks(bwd_hooks=[("blocks.1.hook_resid_mid", lambda g, hook: g)]):
        value, grads = m.value_and_grad(tokens, metric=metric)
    return [np.float64(value), grads.W_E, grads.W_pos, grads.blocks[0].W_qkv, grads.blocks[1].W_O, grads.blocks[1].W_in]


@pytest.mark.parametrize("rows", [2, 300])
def test_linear_refuses_an_unknown_way_to_cut_at_every_size(rows, monkeypatch):
    monkeypatch.setattr(fast, "MIN_ROWS", 128)
    x, W = np.ones((rows, 4), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="by='cols': expected 'rows' or 'columns'"):
        fast.linear(x, W, by="cols")


_OPENBLAS_RESTART = all(hasattr(threads._blas._lib, n) for n in ("openblas_read_env", "blas_thread_shutdown_",
                                                                  "blas_thread_init", "openblas_thread_timeout"))


@pytest.mark.skipif(not _OPENBLAS_RESTART, reason="numpy's BLAS is not an OpenBLAS whose threads npgpt2 can restart")
@pytest.mark.parametrize("users", [None, "25"])
def test_openblas_idle_threads_spin_briefly_unless_the_user_says(users):
    """Imported after numpy has run a product on BLAS's threads (started with OpenBLAS's default
    timeout), npgpt2 restarts them with a spin of 2**BLAS_SPIN cycles, unless the user set
    OPENBLAS_THREAD_TIMEOUT; products on two threads still give the right numbers afterwards."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "a = np.random.default_rng(0).standard_normal((512, 512))\n"
        "before = a @ a\n"  # OpenBLAS's threads are running
        "from npgpt2 import threads\n"
        "lib = threads._blas._lib\n"
        "threads._blas.set(2)\n"
        "after = a.astype(np.float32) @ a.astype(np.float32)\n"
        "assert np.allclose(after, before, rtol=1e-4, atol=1e-3), 'a product after the restart is wrong'\n"
        "print(lib.openblas_thread_timeout(), threads.BLAS_SPIN)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["OPENBLAS_NUM_THREADS"] = "2"
    if users is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = users
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    timeout, spin = map(int, done.stdout.split())
    assert timeout == (spin if users is None else int(users))
    assert spin < 28  # shorter than OpenBLAS's default
