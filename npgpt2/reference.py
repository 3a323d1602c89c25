"""The whole of GPT-2 on one screen: read this first.

Pure functions, one sequence, no hooks, no cache, no checks. ``gpt2(tokens, model.weights,
model.cfg.n_head)`` gives the logits that ``model(tokens)[0]`` gives. It is written apart from ops.py
on purpose (its own softmax, GELU and layer norm): the tests use it as the independent oracle for
every fast path of model.py (blockwise attention, the key/value cache, weight processing, hooks).
"""

import numpy as np


def gelu(x):  # GPT-2's tanh approximation of GELU
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))  # shifting by the max keeps exp finite
    return e / np.sum(e, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps: float = 1e-5):  # [pos, d_model] -> [pos, d_model]
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.var(x, axis=-1, keepdims=True)
    x = (x - mean) / np.sqrt(var + eps)
    return x * (1 if g is None else g) + (0 if b is None else b)  # g, b are None once folded


def attention(q, k, v):  # [pos, d_head] each -> [pos, d_head]
    future = np.triu(np.ones((len(q), len(k)), dtype=bool), k=1)  # key j > query i
    scores = q @ k.T / np.sqrt(q.shape[-1]) + np.where(future, -np.inf, 0)  # [pos, pos]
    return softmax(scores) @ v


def mha(x, w, n_head):  # [pos, d_model] -> [pos, d_model]
    q, k, v = np.split(x @ w.W_qkv + w.b_qkv, 3, axis=-1)  # each [pos, d_model]
    heads = [attention(qh, kh, vh)  # each [pos, d_head]
             for qh, kh, vh in zip(np.split(q, n_head, -1), np.split(k, n_head, -1), np.split(v, n_head, -1))]
    return np.hstack(heads) @ w.W_O + w.b_O


def mlp(x, w):  # [pos, d_model] -> [pos, d_mlp] -> [pos, d_model]
    return gelu(x @ w.W_in + w.b_in) @ w.W_out + w.b_out


def block(x, w, n_head, eps):  # [pos, d_model] -> [pos, d_model]
    x = x + mha(layer_norm(x, w.ln1_w, w.ln1_b, eps), w, n_head)
    return x + mlp(layer_norm(x, w.ln2_w, w.ln2_b, eps), w)


def gpt2(tokens, weights, n_head: int, eps: float = 1e-5):  # tokens [pos] -> logits [pos, d_vocab]
    x = weights.W_E[tokens] + weights.W_pos[: len(tokens)]  # [pos, d_model]
    for w in weights.blocks:
        x = block(x, w, n_head, eps)
    x = layer_norm(x, weights.ln_final_w, weights.ln_final_b, eps)
    return x @ weights.W_U + (0 if weights.b_U is None else weights.b_U)  # [pos, d_vocab]
