"""GPT-2's backward pass: the forward pass of model.py, read from the bottom up.

Given d metric / d logits, the chain rule walks back through the unembedding, the final layer norm,
the blocks from the last to the first (in each, the MLP before the attention), and the embeddings.
Every step is an ``ops.*_backward`` function standing beside its forward in ops.py. At each hook
point, ``hook.grad(name, d_act)`` fires the backward hooks and keeps the gradient for the cache, so
``d_resid``, ``d_pattern``, ``d_q`` ... here are the gradients TransformerLens calls
``blocks.{l}.hook_resid_pre_grad``, ``attn.hook_pattern_grad``, ``attn.hook_q_grad``.

Two rules from the forward:
* a residual connection copies the gradient to both of its branches, and they add up again where the
  branches came from (``d_resid_mid = d_resid_post + (what flows back through the MLP)``);
* a weight used in two places gets both gradients: the tied embedding is read by the lookup and
  written by the unembedding, so ``grads.W_E`` is the sum of the two.

The products go through fast.py (``fast.linear_backward``, ``fast.attention_backward``, ``fast.matmul``):
the same products as ops.py's, in pieces with BLAS's thread count held fixed, so that the gradients'
bits do not depend on what other threads are doing (threads.py).

The forward keeps only what this needs (the activations named in ``hooks.py``'s
``_saved_for_backward``), and only in calls that ask for gradients.
"""

from __future__ import annotations

import math

import numpy as np

from . import fast, ops
from .hooks import Run
from .inputs import check_mask, padding_mask, position_ids
from .weights import BlockWeights, GPT2Weights


def backward(model, hook: Run, d_logits: np.ndarray, tokens: np.ndarray | None, start_at_layer: int = 0,
             attention_mask: np.ndarray | None = None, columns: np.ndarray | None = None):
    """d metric / d logits [batch, pos, d_vocab] -> (grads: a ``GPT2Weights`` of d metric / d weight,
    d_input: d metric / d residual stream entering block ``start_at_layer`` [batch, pos, d_model]).

    ``hook`` is the Run of the forward pass that made the logits (with what it saved). Without
    ``hook.param_grads`` only the activations' gradients are computed (a third of the work less), and
    grads is None. ``attention_mask``: the forward's [batch, pos] (its padding keys got no attention
    and its positions counted from each row's first real token; the same here). ``columns``: the
    only columns of d_logits that may be non-zero (a metric of a few logits), or None: any.
    """
    cfg, w = model.cfg, model.weights
    padding = padding_mask(attention_mask, d_logits.dtype)  # [batch, 1, 1, key_pos] or None

    # the unembedding: logits = final_ln_out @ W_U + b_U
    final_ln_out = ops.affine(hook.saved["ln_final.hook_normalized"], w.ln_final_w, w.ln_final_b)  # [batch, pos, d_model]
    d_final_ln_out, d_W_U, d_b_U = fast.linear_backward(d_logits, final_ln_out, w.W_U, transpose_dW=True,
                                                        weights=hook.param_grads, columns=columns)
    d_resid, d_ln_final_w, d_ln_final_b = _layer_norm_backward(hook, "ln_final.", d_final_ln_out, w.ln_final_w)

    # the blocks, last to first; blocks before start_at_layer did not run and get zero gradients
    block_grads = [_zero_block(b) if l < start_at_layer and hook.param_grads else None for l, b in enumerate(w.blocks)]
    if hook.tape is not None:  # fast.py ran the blocks: the same steps, arranged for speed
        tape, hook.tape = hook.tape, None  # (read once: dropped when the blocks are done)
        d_resid, grads = fast.blocks_backward(model, tape, d_resid, start_at_layer, cfg.n_layer, hook.param_grads)
        for l, g in (grads or {}).items():
            block_grads[l] = g
    else:
        for l in reversed(range(start_at_layer, cfg.n_layer)):
            d_resid, block_grads[l] = _block_backward(model, hook, l, d_resid, padding)  # [batch, pos, d_model]

    # the embeddings: resid = W_E[tokens] + W_pos[pos]; the sum copies the gradient to both
    if start_at_layer == 0:
        d_embed = hook.grad("hook_embed", d_resid)  # [batch, pos, d_model]
        d_pos_embed = hook.grad("hook_pos_embed", d_resid)  # [batch, pos, d_model]
    if not hook.param_grads:
        return None, d_resid

    # GPT-2's unembedding is the embedding, transposed: then the embedding's gradient is the
    # lookup's plus the unembedding's (torch's wte.weight.grad), and d_W_U (computed transposed,
    # [d_vocab, d_model]) is where it starts
    tied = np.shares_memory(w.W_U, w.W_E)
    d_W_E = d_W_U.T if tied else np.zeros_like(w.W_E)  # [d_vocab, d_model]
    d_W_pos = np.zeros_like(w.W_pos)
    if start_at_layer == 0:
        ops.embedding_backward(d_embed, tokens, cfg.d_vocab, out=d_W_E)  # adds each position's row
        positions = position_ids(attention_mask, d_pos_embed.shape[:2])  # [batch, pos], as the forward's
        ops.embedding_backward(d_pos_embed, positions, cfg.n_ctx, out=d_W_pos)  # [n_ctx, d_model]: each position's row
    grads = GPT2Weights(
        W_E=d_W_E, W_pos=d_W_pos, blocks=block_grads, ln_final_w=d_ln_final_w,
        ln_final_b=None if w.ln_final_b is None else d_ln_final_b,
        W_U=d_W_E.T if tied else d_W_U, b_U=None if w.b_U is None else d_b_U)
    return grads, d_resid


def _block_backward(model, hook: Run, l: int, d_resid_post: np.ndarray, padding=None):
    """One block, backwards.  d_resid_post [batch, pos, d_model] -> (d_resid_pre, BlockWeights of grads)"""
    w = model.weights.blocks[l]
    name = f"blocks.{l}."
    d_resid_post = hook.grad(name + "hook_resid_post", d_resid_post)  # [batch, pos, d_model]

    # resid_post = resid_mid + mlp_out
    d_mlp_out = hook.grad(name + "hook_mlp_out", d_resid_post)  # [batch, pos, d_model]
    mlp_in = ops.affine(hook.saved[name + "ln2.hook_normalized"], w.ln2_w, w.ln2_b)  # [batch, pos, d_model]
    d_mlp_in, d_W_in, d_b_in, d_W_out, d_b_out = _mlp_backward(hook, name, w, d_mlp_out, mlp_in)
    d_ln2, d_ln2_w, d_ln2_b = _layer_norm_backward(hook, name + "ln2.", d_mlp_in, w.ln2_w)
    d_resid_mid = hook.grad(name + "hook_resid_mid", d_resid_post + d_ln2)  # [batch, pos, d_model]

    # resid_mid = resid_pre + attn_out
    d_attn_out = hook.grad(name + "hook_attn_out", d_resid_mid)  # [batch, pos, d_model]
    attn_in = ops.affine(hook.saved[name + "ln1.hook_normalized"], w.ln1_w, w.ln1_b)  # [batch, pos, d_model]
    d_attn_in, d_W_qkv, d_b_qkv, d_W_O, d_b_O = _attention_backward(model, hook, name, w, d_attn_out, attn_in, padding)
    d_ln1, d_ln1_w, d_ln1_b = _layer_norm_backward(hook, name + "ln1.", d_attn_in, w.ln1_w)
    d_resid_pre = hook.grad(name + "hook_resid_pre", d_resid_mid + d_ln1)  # [batch, pos, d_model]

    grads = BlockWeights(
        ln1_w=d_ln1_w, ln1_b=None if w.ln1_b is None else d_ln1_b, W_qkv=d_W_qkv, b_qkv=d_b_qkv,
        W_O=d_W_O, b_O=d_b_O, ln2_w=d_ln2_w, ln2_b=None if w.ln2_b is None else d_ln2_b,
        W_in=d_W_in, b_in=d_b_in, W_out=d_W_out, b_out=d_b_out)
    return d_resid_pre, grads


def _mlp_backward(hook: Run, name: str, w: BlockWeights, d_mlp_out, mlp_in):
    """mlp_out = gelu(mlp_in @ W_in + b_in) @ W_out + b_out, backwards."""
    pre, post = hook.saved[name + "mlp.hook_pre"], hook.saved[name + "mlp.hook_post"]  # [batch, pos, d_mlp]
    d_post, d_W_out, d_b_out = fast.linear_backward(d_mlp_out, post, w.W_out, weights=hook.param_grads)  # [batch, pos, d_mlp]
    d_post = hook.grad(name + "mlp.hook_post", d_post)  # [batch, pos, d_mlp]
    d_pre = ops.gelu_new_backward(d_post, pre, overwrite=hook.private(name + "mlp.hook_post"))  # [batch, pos, d_mlp]
    d_pre = hook.grad(name + "mlp.hook_pre", d_pre)  # [batch, pos, d_mlp]
    d_mlp_in, d_W_in, d_b_in = fast.linear_backward(d_pre, mlp_in, w.W_in, weights=hook.param_grads)  # [batch, pos, d_model]
    return d_mlp_in, d_W_in, d_b_in, d_W_out, d_b_out


def _attention_backward(model, hook: Run, name: str, w: BlockWeights, d_attn_out, attn_in, padding=None):
    """Causal multi-head self-attention, backwards (model.GPT2._attention read from its last line up)."""
    a = name + "attn."
    z = hook.saved[a + "hook_z"]  # [batch, pos, head, d_head]
    batch, pos, n_head, d_head = z.shape
    d_model = n_head * d_head

    if a + "hook_result" in hook.saved:  # attn_out = sum over heads of result + b_O
        d_result = hook.grad(a + "hook_result", np.broadcast_to(d_attn_out[:, :, None], (batch, pos, n_head, d_model)))
        W_O = w.W_O.reshape(n_head, d_head, d_model)  # [head, d_head, d_model]
        d_result_heads = d_result.transpose(2, 0, 1, 3).reshape(n_head, batch * pos, d_model)  # [head, rows, d_model]
        z_heads_rows = z.transpose(2, 0, 1, 3).reshape(n_head, batch * pos, d_head)  # [head, rows, d_head]
        # result[h] = z[h] @ W_O[h], per head
        d_z = fast.matmul(d_result_heads, W_O.swapaxes(-1, -2)).reshape(n_head, batch, pos, d_head).transpose(1, 2, 0, 3)
        d_W_O = fast.matmul(z_heads_rows.swapaxes(-1, -2), d_result_heads).reshape(d_model, d_model) \
            if hook.param_grads else None  # [head * d_head, d_model]
        d_b_O = d_attn_out.sum(axis=(0, 1)) if hook.param_grads else None
    else:  # attn_out = concat(z) @ W_O + b_O
        d_z_flat, d_W_O, d_b_O = fast.linear_backward(d_attn_out, z.reshape(batch, pos, d_model), w.W_O,
                                                            weights=hook.param_grads)
        d_z = d_z_flat.reshape(batch, pos, n_head, d_head)  # [batch, pos, head, d_head]
    d_z = hook.grad(a + "hook_z", d_z)  # [batch, pos, head, d_head]
    d_z_heads = d_z.transpose(0, 2, 1, 3)  # [batch, head, query_pos, d_head]

    q_heads = hook.saved[a + "hook_q"].transpose(0, 2, 1, 3)  # [batch, head, query_pos, d_head]
    k_heads = hook.saved[a + "hook_k"].transpose(0, 2, 1, 3)  # [batch, head, key_pos, d_head]
    v_heads = hook.saved[a + "hook_v"].transpose(0, 2, 1, 3)  # [batch, head, key_pos, d_head]
    pattern = hook.saved.get(a + "hook_pattern")  # saved when the forward took the eager path
    if pattern is not None:  # z_heads = pattern @ v_heads; pattern = softmax(scores)
        d_v_heads = fast.matmul(pattern.swapaxes(-1, -2), d_z_heads)  # [batch, head, key_pos, d_head]
        d_pattern = hook.grad(a + "hook_pattern", fast.matmul(d_z_heads, v_heads.swapaxes(-1, -2)))  # [batch, head, query_pos, key_pos]
        d_scores = hook.grad(a + "hook_attn_scores", ops.softmax_backward(d_pattern, hook.computed(a + "hook_pattern")))
        d_scores = np.where(pattern > 0, d_scores, 0) if hook.bwd_hooks else d_scores  # masked keys pass nothing on
        # scores = q_heads @ k_heads^T / sqrt(d_head) + mask
        d_q_heads = fast.matmul(d_scores, k_heads) / math.sqrt(d_head)  # [batch, head, query_pos, d_head]
        d_k_heads = fast.matmul(d_scores.swapaxes(-1, -2), q_heads) / math.sqrt(d_head)  # [batch, head, key_pos, d_head]
    else:  # the blockwise forward kept no pattern: recompute it a block at a time
        z_heads = hook.computed(a + "hook_z").transpose(0, 2, 1, 3)  # [batch, head, query_pos, d_head]
        d_q_heads, d_k_heads, d_v_heads = fast.attention_backward(
            d_z_heads, q_heads / math.sqrt(d_head), k_heads, v_heads, z_heads, padding=padding)
        d_q_heads = d_q_heads / math.sqrt(d_head)  # the forward divided q by sqrt(d_head)

    d_q = hook.grad(a + "hook_q", d_q_heads.transpose(0, 2, 1, 3))  # [batch, pos, head, d_head]
    d_k = hook.grad(a + "hook_k", d_k_heads.transpose(0, 2, 1, 3))  # [batch, pos, head, d_head]
    d_v = hook.grad(a + "hook_v", d_v_heads.transpose(0, 2, 1, 3))  # [batch, pos, head, d_head]
    d_qkv = np.concatenate([g.reshape(batch, pos, d_model) for g in (d_q, d_k, d_v)], axis=-1)  # [batch, pos, 3 * d_model]
    d_attn_in, d_W_qkv, d_b_qkv = fast.linear_backward(d_qkv, attn_in, w.W_qkv, weights=hook.param_grads)  # [batch, pos, d_model]
    return d_attn_in, d_W_qkv, d_b_qkv, d_W_O, d_b_O


def _layer_norm_backward(hook: Run, name: str, d_out: np.ndarray, gain):
    """The hooked layer norm of model.py, backwards; as ops.layer_norm_backward, with the gradients
    of ``hook_normalized`` and ``hook_scale`` passing their hook points."""
    normalized, scale = hook.saved[name + "hook_normalized"], hook.saved[name + "hook_scale"]
    d_normalized, d_gain, d_bias = ops.affine_backward(d_out, normalized, gain)  # [batch, pos, d_model]
    d_normalized = hook.grad(name + "hook_normalized", d_normalized)  # [batch, pos, d_model]
    normalized = hook.computed(name + "hook_normalized")  # centred / scale, even where a hook changed it
    d_centred, d_scale = ops.divide_backward(d_normalized, normalized, scale)  # [batch, pos, d_model], [batch, pos, 1]
    d_scale = hook.grad(name + "hook_scale", d_scale)  # [batch, pos, 1]
    d_centred = d_centred + ops.ln_scale_backward(d_scale, normalized)  # the scale depends on x too
    return ops.center_backward(d_centred), d_gain, d_bias  # [batch, pos, d_model]


def _zero_block(b: BlockWeights) -> BlockWeights:
    return BlockWeights(**{f: None if getattr(b, f) is None else np.zeros_like(getattr(b, f))
                           for f in b.__dataclass_fields__})


class Differentiable:
    """The gradient half of ``GPT2``: ``value_and_grad`` and the forward-then-backward of the calls
    that ask for gradients (``run_with_cache(incl_bwd=True)``, ``run_with_hooks(bwd_hooks=...)``)."""

    def value_and_grad(self, input, metric=None, attention_mask=None, **kwargs):
        """(metric value, grads): grads is a ``GPT2Weights`` shaped like ``model.weights``, holding
        d metric / d weight. ``metric`` defaults to the mean next-token loss (padding skipped); any
        of ``npgpt2.metrics`` or an object with ``__call__`` and ``grad(logits)`` works.

        ``grads.W_E`` holds the whole gradient of the tied embedding (the lookup plus the
        unembedding), as torch's ``wte.weight.grad`` does; ``grads.W_U`` is its transpose then.
        """
        run = self._new_run(save=self._saved_for_backward)
        run.param_grads = True
        value, grads = self._backward_run(run, input, metric, "loss" if metric is None else None,
                                          "value_and_grad", attention_mask=attention_mask, **kwargs)
        return value, grads

    def _backward_run(self, run, input, metric, return_type, caller: str, attention_mask=None,
                      start_at_layer=None, tokens=None, prepend_bos=None, padding_side=None, **kwargs):
        """The forward pass with ``run`` saving what the backward needs, the metric, the backward.
        -> (metric value, grads)"""
        from . import metrics
        from .hooks import check_not_in_backward_hook

        check_not_in_backward_hook(caller)
        if kwargs.pop("past_kv", None) is not None or kwargs.pop("stop_at_layer", None) is not None:
            raise ValueError(f"{caller}: gradients need the whole forward pass to the logits; "
                             "past_kv and stop_at_layer cannot be used")
        if kwargs:
            raise TypeError(f"{caller} got unexpected arguments {', '.join(kwargs)}")
        if start_at_layer is None:
            tokens, mask = self._prepare(input, attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)
            input = tokens
        elif tokens is not None:
            tokens, mask = self._prepare(tokens, attention_mask)
        else:
            mask = check_mask(attention_mask, np.shape(input)[:2])
        if metric is None:
            if return_type != "loss":
                raise ValueError(f"{caller} needs a scalar to differentiate: pass return_type='loss' or "
                                 "metric=... (see npgpt2.metrics, e.g. metrics.logit_diff(' Mary', ' John'))")
            if tokens is None:
                raise ValueError(f"{caller}: the loss needs token ids: pass tokens=... with start_at_layer")
            metric = metrics.loss(tokens, mask)
        metric = metrics.check_metric(metric)
        read = metrics.logits_read_by(metric, np.shape(input)[0])
        if read is None:
            logits = self._forward(run, input, "logits", attention_mask=mask, start_at_layer=start_at_layer,
                                   tokens=tokens)  # [batch, pos, d_vocab]
        else:  # the metric reads a few logits (a logit difference, a log-probability): only they are made
            resid = self._forward(run, input, "logits", attention_mask=mask, start_at_layer=start_at_layer,
                                  tokens=tokens, stop_at_layer=self.cfg.n_layer)  # [batch, pos, d_model]
            logits = _read_logits(self, run, resid, *read)  # [batch, pos, d_vocab]
        if isinstance(metric, metrics.Loss):  # the logits are ours alone: the gradient overwrites them
            value, d_logits = metric.value_and_grad(logits, out=logits)
        elif hasattr(metric, "value_and_grad"):  # both from one pass over the logits
            value, d_logits = metric.value_and_grad(logits)
        else:
            value, d_logits = metric(logits), metric.grad(logits)
        value, d_logits = float(value), np.asarray(d_logits, dtype=logits.dtype)  # [batch, pos, d_vocab]
        if d_logits.shape != logits.shape:
            raise ValueError(f"{type(metric).__name__}.grad returned shape {d_logits.shape}; expected "
                             f"{logits.shape}, the logits' shape")
        start = self._check_layer(start_at_layer, "start_at_layer", 0)
        # a metric of a few logits (a logit difference) takes only their columns back through W_U:
        # those it says it reads, or those its gradient shows (the loss's, a softmax, has every column)
        if read is not None:
            columns = read[1]
        elif isinstance(metric, metrics.Loss):
            columns = None
        else:
            columns = ops.nonzero_columns(d_logits)
        grads, _ = backward(self, run, d_logits, tokens, start, mask, columns)
        return value, grads


def _read_logits(model, hook: Run, resid: np.ndarray, pos: np.ndarray, columns: np.ndarray | None) -> np.ndarray:
    """The logits a metric reads (``Metric.logits_read``: each row's position ``pos`` [batch], there
    the vocabulary ``columns`` or all), the others zero: ``model._unembed`` for a gradient that
    starts from those alone. The final layer norm runs on every position, so its hook points (and
    what the backward pass keeps of them) are as in the whole forward pass.
    resid [batch, pos, d_model] -> logits [batch, pos, d_vocab]"""
    w = model.weights
    n_pos, d_vocab = resid.shape[1], w.W_U.shape[1]
    pos = np.asarray(pos)
    if np.any((pos < -n_pos) | (pos >= n_pos)):
        raise ValueError(f"the metric reads position {pos[(pos < -n_pos) | (pos >= n_pos)][0]}; the input has "
                         f"{n_pos} positions (0 to {n_pos - 1}, or -1 to -{n_pos} from the end)")
    if columns is not None and np.any((columns < 0) | (columns >= d_vocab)):
        raise ValueError(f"the metric reads token {columns[(columns < 0) | (columns >= d_vocab)][0]}; expected an id "
                         f"from 0 to {d_vocab - 1}")
    normalized = model._layer_norm(hook, "ln_final.", resid, w.ln_final_w, w.ln_final_b)  # [batch, pos, d_model]
    rows = np.arange(len(resid))
    W_U, b_U = w.W_U, w.b_U
    if columns is not None:
        W_U, b_U = W_U[:, columns], None if b_U is None else b_U[columns]
    read = fast.linear(normalized[rows, pos], W_U, b_U)  # [batch, columns]
    logits = np.zeros(resid.shape[:2] + (w.W_U.shape[1],), read.dtype)  # [batch, pos, d_vocab]
    if columns is None:
        logits[rows, pos] = read
    else:
        logits[rows[:, None], pos[:, None], columns[None, :]] = read
    return logits
