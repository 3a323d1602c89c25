"""Reference computations written out in a few lines of plain NumPy, sharing no code with npgpt2,
for the tests to compare the package against."""

import numpy as np


def softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def gelu_new(x):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, w, b, eps):
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def causal_scores(q, k):
    """q k^T for queries that are the last n_q of n_k positions, -inf on keys in a query's future.
    q: [..., n_q, d], k: [..., n_k, d] -> [..., n_q, n_k]. (No 1/sqrt(d): q comes scaled.)"""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n_q, n_k = q.shape[-2], k.shape[-2]
    scores = q @ np.swapaxes(k, -1, -2)
    for i in range(n_q):
        scores[..., i, n_k - n_q + i + 1:] = -np.inf
    return scores


def greedy(model, tokens, n_new):
    """Greedy decoding the slow way: a full forward pass over the whole sequence at every step,
    then the argmax of the last position. tokens [pos] -> [pos + n_new]"""
    seq = list(np.asarray(tokens).tolist())
    for _ in range(n_new):
        seq.append(int(model(np.array([seq]))[0, -1].argmax()))
    return np.array(seq)
