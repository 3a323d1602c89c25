"""The backward pass against central finite differences in float64: each op's backward, the whole
model's gradient along random directions, activation gradients, hooks, padding, metrics."""

import dataclasses

import numpy as np
import pytest

import npgpt2
from npgpt2 import metrics, ops
from npgpt2.training import named_parameters

V = 50257
EPS = 1e-6
TOL = 1e-6  # relative error of an analytic directional derivative against central differences


def _agree(analytic: float, fd: float, grad: np.ndarray, D: np.ndarray, what=""):
    """Relative error against the size the derivative could have had, sum |grad * D| (a derivative
    that nearly cancels is still judged at the scale of its terms)."""
    scale = max(float(np.abs(grad * D).sum()), abs(fd))
    assert abs(analytic - fd) <= TOL * scale, (what, analytic, fd, scale)


def _check(f, x, grad, eps=EPS, n=3, seed=0):
    """grad . D against (f(x + eps D) - f(x - eps D)) / 2 eps along n random directions D."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        D = rng.standard_normal(x.shape)
        fd = (f(x + eps * D) - f(x - eps * D)) / (2 * eps)
        _agree(float((grad * D).sum()), fd, grad, D)


# ------------------------------------------------------------------------------------ each op
@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_linear_backward(rng):
    x, W, b = rng.standard_normal((2, 5, 6)), rng.standard_normal((6, 4)), rng.standard_normal(4)
    G = rng.standard_normal((2, 5, 4))  # the gradient of sum(G * out)
    d_x, d_W, d_b = ops.linear_backward(G, x, W)
    _check(lambda x_: (G * ops.linear(x_, W, b)).sum(), x, d_x)
    _check(lambda W_: (G * ops.linear(x, W_, b)).sum(), W, d_W)
    _check(lambda b_: (G * ops.linear(x, W, b_)).sum(), b, d_b)


@pytest.mark.parametrize("transpose_dW", [False, True])
def test_linear_backward_through_the_few_columns_a_metric_reads(rng, transpose_dW):
    # a logit difference's gradient is zero outside two columns: only those are taken back
    x, W = rng.standard_normal((2, 5, 6)), rng.standard_normal((6, 40))
    W = np.ascontiguousarray(W.T).T if transpose_dW else W  # (as the tied W_E.T)
    G = np.zeros((2, 5, 40))
    G[:, -1, [3, 17]] = rng.standard_normal((2, 2))
    columns = ops.nonzero_columns(G)
    np.testing.assert_array_equal(columns, [3, 17])
    sparse = ops.linear_backward(G, x, W, transpose_dW=transpose_dW, columns=columns)
    dense = ops.linear_backward(G, x, W, transpose_dW=transpose_dW)
    for a, e in zip(sparse, dense):
        np.testing.assert_allclose(a, e, rtol=1e-13, atol=1e-15)
    assert sparse[1].shape == W.shape and sparse[1].T.flags.c_contiguous == transpose_dW
    assert ops.linear_backward(G, x, W, weights=False, columns=columns)[1:] == (None, None)
    G[0, 0] = 1.0  # dense rows: every column takes part
    assert ops.nonzero_columns(G) is None


@pytest.mark.parametrize("folded", [False, True])
def test_layer_norm_backward(rng, folded):
    x = rng.standard_normal((2, 5, 8)) * 3 + 1
    w, b = (None, None) if folded else (rng.standard_normal(8), rng.standard_normal(8))
    G = rng.standard_normal(x.shape)
    centred = ops.center(x)
    scale = ops.ln_scale(centred, 1e-5)
    d_x, d_w, d_b = ops.layer_norm_backward(G, centred / scale, scale, w)
    _check(lambda x_: (G * ops.layer_norm(x_, w, b, 1e-5)).sum(), x, d_x)
    if not folded:
        _check(lambda w_: (G * ops.layer_norm(x, w_, b, 1e-5)).sum(), w, d_w)
        _check(lambda b_: (G * ops.layer_norm(x, w, b_, 1e-5)).sum(), b, d_b)
    else:
        assert d_w is None


def test_layer_norm_pieces_backward(rng):
    x = rng.standard_normal((3, 8))
    G = rng.standard_normal((3, 8))
    _check(lambda x_: (G * ops.center(x_)).sum(), x, ops.center_backward(G))
    c = ops.center(x)
    g1 = rng.standard_normal((3, 1))
    _check(lambda c_: (g1 * ops.ln_scale(c_, 1e-5)).sum(), c, ops.ln_scale_backward(g1, c / ops.ln_scale(c, 1e-5)))
    s = ops.ln_scale(c, 1e-5)
    d_c, d_s = ops.divide_backward(G, c / s, s)
    _check(lambda c_: (G * (c_ / s)).sum(), c, d_c)
    _check(lambda s_: (G * (c / s_)).sum(), s, d_s)


def test_gelu_new_backward(rng):
    x = rng.standard_normal((4, 7)) * 3
    G = rng.standard_normal(x.shape)
    _check(lambda x_: (G * ops.gelu_new(x_)).sum(), x, ops.gelu_new_backward(G, x))


def test_softmax_backward(rng):
    x = rng.standard_normal((3, 6)) * 4
    x[0, 3] = -np.inf  # a masked entry: probability 0, gradient 0
    G = rng.standard_normal(x.shape)
    d_x = ops.softmax_backward(G, ops.softmax(x))
    assert d_x[0, 3] == 0
    finite = np.where(np.isinf(x), 0, x)
    _check(lambda x_: (G * ops.softmax(np.where(np.isinf(x), -np.inf, x_))).sum(), finite, d_x)


def test_cross_entropy_backward(rng):
    logits = rng.standard_normal((2, 5, 11)) * 3
    targets = rng.integers(0, 11, (2, 5))
    weights = rng.random((2, 5))

    def f(z):
        return -(np.take_along_axis(ops.log_softmax(z), targets[..., None], -1)[..., 0] * weights).sum()

    _check(f, logits, ops.cross_entropy_backward(logits, targets, weights))


def test_embedding_backward_adds_repeated_tokens(rng):
    W = rng.standard_normal((10, 4))
    tokens = np.array([[1, 3, 1], [3, 3, 0]])
    G = rng.standard_normal((2, 3, 4))
    d_W = ops.embedding_backward(G, tokens, 10)
    _check(lambda W_: (G * W_[tokens]).sum(), W, d_W)
    np.testing.assert_allclose(d_W[3], G[0, 1] + G[1, 0] + G[1, 1])


@pytest.mark.parametrize("n_q,n_k,block", [(20, 20, 64), (20, 20, 6), (5, 12, 2)])
def test_causal_attention_backward(rng, n_q, n_k, block):
    q = rng.standard_normal((2, 3, n_q, 4))
    k, v = rng.standard_normal((2, 3, n_k, 4)), rng.standard_normal((2, 3, n_k, 4))
    G = rng.standard_normal(q.shape)
    d_q, d_k, d_v = ops.causal_attention_backward(G, q, k, v, ops.causal_attention(q, k, v), block=block)
    _check(lambda q_: (G * ops.causal_attention(q_, k, v)).sum(), q, d_q)
    _check(lambda k_: (G * ops.causal_attention(q, k_, v)).sum(), k, d_k)
    _check(lambda v_: (G * ops.causal_attention(q, k, v_)).sum(), v, d_v)


# ------------------------------------------------------------------------------ the whole model
def _with(model, **changes):
    """A model sharing everything but some weights: changes are {"W_E": array} or {"blocks.1.W_in": array}."""
    weights = model.weights
    for key, value in changes.items():
        if key.startswith("blocks."):
            _, l, field = key.split(".")
            blocks = list(weights.blocks)
            blocks[int(l)] = dataclasses.replace(blocks[int(l)], **{field: value})
            weights = dataclasses.replace(weights, blocks=blocks)
        else:
            weights = dataclasses.replace(weights, **{key: value})
            if key == "W_E" and np.shares_memory(model.weights.W_U, model.weights.W_E):
                weights = dataclasses.replace(weights, W_U=value.T)  # keep the tie
    return npgpt2.GPT2(model.cfg, weights, model.tokenizer)


def _param_names(model):
    names = ["W_E", "W_pos", "ln_final_w", "ln_final_b"]
    for l, b in enumerate(model.weights.blocks):
        names += [f"blocks.{l}.{f.name}" for f in dataclasses.fields(b) if getattr(b, f.name) is not None]
    return names


def _get(weights, name):
    if name.startswith("blocks."):
        _, l, field = name.split(".")
        return getattr(weights.blocks[int(l)], field)
    return getattr(weights, name)


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(2).integers(0, V, (2, 9))


def test_value_and_grad_of_the_loss_along_random_directions(model64, batch):
    value, grads = model64.value_and_grad(batch)
    assert value == pytest.approx(model64.loss(batch), abs=1e-12)
    rng = np.random.default_rng(5)
    for name in _param_names(model64):
        W, G = _get(model64.weights, name), _get(grads, name)
        assert G.shape == W.shape and G.dtype == np.float64, name
        D = rng.standard_normal(W.shape)
        if name == "W_E":  # only the rows that matter, so the difference is not lost in rounding
            D = np.zeros(W.shape)
            D[np.unique(batch)] = rng.standard_normal((len(np.unique(batch)), W.shape[1]))
            D[:50] += rng.standard_normal((50, W.shape[1]))  # unembedding-only rows too
        eps = 1e-6
        fd = (_with(model64, **{name: W + eps * D}).loss(batch) - _with(model64, **{name: W - eps * D}).loss(batch)) / (2 * eps)
        _agree(float((G * D).sum()), fd, G, D, name)


@pytest.mark.parametrize("shape", [(3, 20, 700), (1, 40, 500)])  # pieces of batch rows; of one row's positions
def test_the_loss_shared_among_threads_gives_the_same_bits(shape, monkeypatch):
    rng = np.random.default_rng(6)
    logits = rng.standard_normal(shape) * 4
    loss = metrics.Loss(rng.integers(0, shape[2], shape[:2]), weights=rng.random((shape[0], shape[1] - 1)))
    results = []
    for shared in (1 << 40, 1):  # on this thread alone; shared among the threads
        monkeypatch.setattr(metrics, "_SHARED", shared)
        results.append(loss.value_and_grad(logits.copy()))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][0] == pytest.approx(loss(logits), abs=1e-12)  # and the value is the loss


def test_the_tied_embedding_gets_both_gradients(model64, batch):
    _, grads = model64.value_and_grad(batch)
    assert np.shares_memory(grads.W_U, grads.W_E)
    unseen = np.setdiff1d(np.arange(V), batch)[:5]  # rows only the unembedding reads
    assert np.abs(grads.W_E[unseen]).max() > 0


def test_eager_and_blockwise_backward_agree(model64, batch):
    _, blockwise = model64.value_and_grad(batch)
    model64.attn_implementation = "eager"
    try:
        _, eager = model64.value_and_grad(batch)
    finally:
        model64.attn_implementation = "blockwise"
    for name in _param_names(model64):
        np.testing.assert_allclose(_get(eager, name), _get(blockwise, name), atol=1e-12, rtol=0, err_msg=name)


def test_float32_gradients_follow_float64(model, model64, batch):
    _, g32 = model.value_and_grad(batch)
    _, g64 = model64.value_and_grad(batch)
    for name in _param_names(model64):
        a, b = _get(g32, name), _get(g64, name)
        assert a.dtype == np.float32
        assert np.abs(a - b).max() <= 1e-4 * max(np.abs(b).max(), 1e-6), name


ACTIVATIONS = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale",
               "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q", "blocks.1.attn.hook_k",
               "blocks.1.attn.hook_v", "blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern",
               "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.1.hook_resid_mid",
               "blocks.1.ln2.hook_scale", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post",
               "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post", "ln_final.hook_scale",
               "ln_final.hook_normalized", "blocks.1.attn.hook_result"]


@pytest.mark.parametrize("metric_name", ["loss", "logit_diff"])
def test_activation_gradients_equal_finite_differences_through_a_hook(model64, batch, metric_name):
    metric = metrics.loss(batch) if metric_name == "loss" else metrics.logit_diff(" Mary", [" John", " the"])
    value, cache = model64.run_with_cache(batch, names_filter=ACTIVATIONS, incl_bwd=True, metric=metric)
    assert value == pytest.approx(metric(model64(batch)), abs=1e-12)
    rng = np.random.default_rng(6)
    for name in ACTIVATIONS:
        act, grad = cache[name], cache[name + "_grad"]
        assert grad.shape == act.shape and type(grad) is np.ndarray, name
        D = rng.standard_normal(act.shape)
        if name.endswith("attn_scores"):
            D = np.where(np.isinf(act), 0, D)  # the masked scores are -inf and stay so

        def f(eps):
            return metric(model64.run_with_hooks(batch, fwd_hooks=[(name, lambda a, h: a + eps * D)]))

        fd = (f(EPS) - f(-EPS)) / (2 * EPS)
        _agree(float(np.where(np.isinf(act), 0, grad * D).sum()), fd, np.where(np.isinf(act), 0, grad), D, name)


def test_padding_contributes_nothing(model64):
    texts = ["The quick brown fox jumps", "Hello there"]
    tokens, mask = model64.to_tokens(texts, return_mask=True)
    value, grads = model64.value_and_grad(texts)
    counts = mask[:, 1:].sum(1)  # predictions per row
    rows = [model64.value_and_grad(model64.to_tokens(t)) for t in texts]
    assert value == pytest.approx(sum(c * v for c, (v, _) in zip(counts, rows)) / counts.sum(), abs=1e-12)
    for name in _param_names(model64):
        expected = sum(c * _get(g, name) for c, (_, g) in zip(counts, rows)) / counts.sum()
        np.testing.assert_allclose(_get(grads, name), expected, atol=1e-12, err_msg=name)


def test_gradient_with_respect_to_a_residual_input(model64, batch):
    resid = model64(batch, stop_at_layer=1)
    metric = metrics.logprob(" the")
    value, cache = model64.run_with_cache(resid, start_at_layer=1, metric=metric, incl_bwd=True,
                                          names_filter="blocks.1.hook_resid_pre")
    grad = cache["blocks.1.hook_resid_pre_grad"]
    _check(lambda r: metric(model64(r, start_at_layer=1)), resid, grad)
    _, grads = model64.value_and_grad(resid, metric=metric, start_at_layer=1)
    assert np.abs(grads.blocks[0].W_in).max() == 0 and np.abs(grads.blocks[1].W_in).max() > 0
    assert np.abs(grads.W_E).max() > 0  # through the unembedding only


def test_a_zeroing_backward_hook_cuts_everything_before_it(model64, batch):
    model64.fast_path = False  # the textbook blocks, as the hooked call below takes: the same bits
    try:
        _, plain = model64.value_and_grad(batch)
    finally:
        model64.fast_path = True
    with model64.hooks(bwd_hooks=[("blocks.1.hook_resid_mid", lambda g, h: g * 0)]):
        _, cut = model64.value_and_grad(batch)
    # all that comes before resid_mid of layer 1 reaches the metric only through it
    for name in ["W_pos", "blocks.0.W_in", "blocks.0.W_qkv", "blocks.1.W_qkv", "blocks.1.ln1_w"]:
        assert np.abs(_get(cut, name)).max() == 0, name
    for name in ["blocks.1.W_in", "blocks.1.W_out", "ln_final_w"]:
        np.testing.assert_array_equal(_get(cut, name), _get(plain, name), err_msg=name)
    assert model64._bwd_hooks == {}


def test_a_forward_hook_that_sets_values_cuts_the_gradient_there(model64, batch):
    const = np.random.default_rng(9).standard_normal(batch.shape + (64,))

    def patch(act, hook):  # position 3 replaced by a constant; the others left alone
        out = act.copy()
        out[:, 3] = const[:, 3]
        return out

    hooks = [("blocks.0.hook_resid_post", patch)]
    with model64.hooks(hooks):
        value, grads = model64.value_and_grad(batch)
    # the gradient of the hooked computation: finite differences with the hook in place
    rng = np.random.default_rng(3)
    for name in ["blocks.0.W_in", "blocks.0.W_qkv", "W_pos"]:
        W = _get(model64.weights, name)
        D = rng.standard_normal(W.shape)

        def f(eps):
            m = _with(model64, **{name: W + eps * D})
            return m.run_with_hooks(batch, fwd_hooks=hooks, return_type="loss")

        fd = (f(EPS) - f(-EPS)) / (2 * EPS)
        _agree(float((_get(grads, name) * D).sum()), fd, _get(grads, name), D, name)
    # layer 0's MLP output at position 3 reaches the metric only through the replaced entries
    with model64.hooks(hooks):
        _, cache = model64.run_with_cache(batch, names_filter=["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"],
                                          incl_bwd=True, return_type="loss")
    assert np.abs(cache["blocks.0.hook_mlp_out_grad"][:, 3]).max() == 0
    assert np.abs(cache["blocks.0.hook_mlp_out_grad"][:, 2]).max() > 0
    assert np.abs(cache["blocks.0.hook_resid_post_grad"][:, 3]).max() > 0  # the gradient at the hook itself


def test_metrics_gradients(model64, batch):
    logits = model64(batch)
    for metric in [metrics.loss(batch), metrics.loss(batch, weights=np.arange(16.0).reshape(2, 8)),
                   metrics.logit_diff(" Mary", " John", pos=-2), metrics.logprob([" the", " a"]),
                   metrics.prob(" the"), metrics.normalized(metrics.logit_diff(" Mary", " John"), 2.0, -1.0)]:
        _check(metric, logits, metric.grad(logits))
        value, grad = metric.value_and_grad(logits)  # the shared-work path gives the same
        assert value == pytest.approx(metric(logits), abs=1e-12)
        np.testing.assert_allclose(grad, metric.grad(logits), atol=1e-15)
    assert metrics.logit_diff(" Mary", " John")(logits) == pytest.approx(
        float(np.mean(logits[:, -1, 5335] - logits[:, -1, 1757])))


class _Opaque:
    """A metric that says nothing of which logits it reads: the forward makes them all."""

    def __init__(self, metric):
        self.metric = metric

    def __call__(self, logits):
        return self.metric(logits)

    def grad(self, logits):
        return self.metric.grad(logits)


def test_a_metric_of_a_few_logits_gets_them_alone_and_the_same_gradients(model64, batch):
    seen = []
    rows_pos = np.array([-1, 5])  # one position per row
    for metric in [metrics.logit_diff(" Mary", " John"), metrics.logit_diff([" Mary", " the"], " John", pos=rows_pos),
                   metrics.logprob([" the", " a"], pos=-2), metrics.prob(" the"),
                   metrics.normalized(metrics.logit_diff(" Mary", " John"), 2.0, -1.0)]:
        assert metric.logits_read(2) is not None
        for restricted in (metric, _Opaque(metric)):
            with model64.hooks([("ln_final.hook_normalized", lambda act, hook: seen.append(act.shape))]):
                value, grads = model64.value_and_grad(batch, metric=restricted)
                _, cache = model64.run_with_cache(batch, names_filter=["blocks.1.hook_resid_pre", "ln_final.hook_scale"],
                                                  incl_bwd=True, metric=restricted)
            if restricted is metric:
                first = value, grads, cache
        assert value == pytest.approx(first[0], rel=1e-12)  # the full logits give the same metric ...
        restricted_grads = dict(named_parameters(first[1]))
        for name, g in named_parameters(grads):  # ... and the same gradients
            np.testing.assert_allclose(restricted_grads[name], g, rtol=0, atol=1e-12 * np.abs(g).max())
        for name in cache:
            np.testing.assert_allclose(first[2][name], cache[name], rtol=0, atol=1e-12 * np.abs(cache[name]).max() + 1e-300)
    with pytest.raises(ValueError, match=r"reads position 40; the input has \d+ positions"):
        model64.value_and_grad(batch, metric=metrics.logit_diff(" Mary", " John", pos=40))
    with pytest.raises(ValueError, match="reads token 50300; expected an id from 0 to 50256"):
        model64.value_and_grad(batch, metric=metrics.logit_diff(50300, " John"))
    every_position = cache["blocks.1.hook_resid_pre"].shape
    assert seen and all(s == every_position for s in seen)  # the final layer norm's hooks fire on every position
    assert metrics.loss(batch).logits_read(2) is None  # the loss reads every logit


def test_gradient_requests_without_a_scalar_are_refused(model, batch):
    with pytest.raises(ValueError, match="return_type='loss' or metric="):
        model.run_with_cache(batch, incl_bwd=True)
    with pytest.raises(ValueError, match="return_type='loss' or metric="):
        model.run_with_hooks(batch, bwd_hooks=[("hook_embed", lambda g, h: None)])
    with pytest.raises(TypeError, match=r"has no grad\(logits\) method: gradients need d metric / d logits"):
        model.value_and_grad(batch, metric=lambda logits: float(logits.sum()))
    with pytest.raises(ValueError, match="' Maryland' is 2 tokens|is 2 tokens"):
        metrics.logit_diff(" Maryland is", " John")
    with pytest.raises(npgpt2.HookError, match="dir='sideways'"):
        model.add_hook("hook_embed", lambda g, h: None, dir="sideways")


def test_backward_hooks_observe_and_are_removed_after_errors(model64, batch):
    seen = []
    model64.add_hook("blocks.0.hook_resid_pre", lambda g, h: seen.append((h.name, g.shape)), dir="bwd")
    try:
        value, cache = model64.run_with_cache(batch, return_type="loss", incl_bwd=True,
                                              names_filter="blocks.0.hook_resid_pre")
        assert seen == [("blocks.0.hook_resid_pre", batch.shape + (64,))]
        model64(batch)  # a plain forward fires no backward hook
        assert len(seen) == 1
    finally:
        model64.reset_hooks()

    def boom(g, h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        model64.run_with_hooks(batch, bwd_hooks=[("hook_embed", boom)], return_type="loss")
    assert model64._bwd_hooks == {} and model64._hooks == {}
    model64.value_and_grad(batch)  # no hook left behind


def test_gradients_of_a_processed_model_are_those_of_the_arrays_it_uses(tiny_dir, batch):
    processed = npgpt2.from_pretrained(tiny_dir, dtype="float64", fold_ln=True, center_writing_weights=True,
                                       center_unembed=True)
    assert not np.shares_memory(processed.weights.W_U, processed.weights.W_E)
    value, grads = processed.value_and_grad(batch)
    assert grads.blocks[0].ln1_w is None and grads.ln_final_w is None  # folded away
    assert grads.b_U is not None and not np.shares_memory(grads.W_U, grads.W_E)
    rng = np.random.default_rng(8)
    for name in ["W_E", "W_U", "b_U", "blocks.1.W_qkv", "blocks.0.b_in"]:
        W, G = _get(processed.weights, name), _get(grads, name)
        D = rng.standard_normal(W.shape)
        fd = (_with(processed, **{name: W + EPS * D}).loss(batch) - _with(processed, **{name: W - EPS * D}).loss(batch)) / (2 * EPS)
        _agree(float((G * D).sum()), fd, G, D, name)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
def test_gradient_a_backward_hook_writes_at_masked_keys_goes_nowhere(model64, padded):
    """Masked keys (later positions, padding) got no attention: as TransformerLens's masked_fill, the
    backward pass gives them no gradient, whatever a backward hook on the scores writes there."""
    tokens = np.random.default_rng(4).integers(0, 50257, (2, 7))
    mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]]) if padded else None
    _, cache = model64.run_with_cache(tokens, attention_mask=mask, names_filter="blocks.0.attn.hook_pattern")
    masked = cache["blocks.0.attn.hook_pattern"] == 0  # [batch, head, query, key]: no attention given
    seen = []

    def unchanged(g, hook):
        return g

    def writes_at_masked_keys(g, hook):
        seen.append(hook.name)
        return np.where(masked, 1.0, g)

    grads = {}
    for fn in (unchanged, writes_at_masked_keys):
        with model64.hooks(bwd_hooks=[("blocks.0.attn.hook_attn_scores", fn)]):
            _, grads[fn.__name__] = model64.value_and_grad(tokens, attention_mask=mask)
    assert seen == ["blocks.0.attn.hook_attn_scores"] and masked.sum() > 0
    for (name, a), (_, b) in zip(named_parameters(grads["unchanged"]), named_parameters(grads["writes_at_masked_keys"])):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_backward_pass_started_inside_a_backward_hook_is_refused(model64):
    """The hook stays registered for the inner pass, which would call it again, without end."""
    tokens = np.random.default_rng(5).integers(0, 50257, (1, 6))
    calls = []

    def reentrant(g, hook):
        calls.append(hook.name)
        model64.value_and_grad(tokens)

    with model64.hooks(bwd_hooks=[("blocks.1.hook_resid_mid", reentrant)]):
        with pytest.raises(npgpt2.HookError, match="value_and_grad was called from inside a backward hook at "
                                                   "blocks.1.hook_resid_mid"):
            model64.value_and_grad(tokens)
    assert calls == ["blocks.1.hook_resid_mid"]
    loss, _ = model64.value_and_grad(tokens)  # outside any hook: as before
    assert loss == pytest.approx(model64.loss(tokens), rel=1e-12)

    def forward_inside(g, hook):  # a forward pass in a backward hook stays allowed
        calls.append(float(model64(tokens).sum()))

    with model64.hooks(bwd_hooks=[("blocks.1.hook_resid_mid", forward_inside)]):
        model64.value_and_grad(tokens)
    assert len(calls) == 2
