"""Backpropagation through GPT-2, one step at a time, then what it is for: saliency.

Part 1 follows the gradient of one number, the logit difference between two answers, back through
the last block: from the logits to the final layer norm, into the MLP (through the GELU), past the
residual connection, into attention (through the softmax to the queries and keys). At each step it
prints the gradient's shape and size, and recomputes the step by hand with the ``ops.*_backward``
function that npgpt2's backward pass uses (see npgpt2/backward.py), checking it against the
gradient the model reports at that hook point.

Part 2 asks which prompt tokens the prediction leans on: gradient x input and integrated gradients
over the token embeddings, and checks integrated gradients' completeness (the scores add up to the
change in the metric from the baseline).

Runs on the real gpt2 when it is cached, else on a small random model (float64 either way, so the
by-hand steps agree to ~1e-12).

    python examples/backprop.py [--model gpt2]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from npgpt2 import metrics, ops
from npgpt2.analysis import token_saliency
from npgpt2.testing import pretrained_or_synthetic

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _show(step: str, grad: np.ndarray, by_hand: np.ndarray | None = None) -> float:
    """Print a gradient's shape and norm (and how far the by-hand step is from it)."""
    line = f"  {step:<46} {str(list(grad.shape)):<18} |grad| = {np.linalg.norm(grad):9.4f}"
    error = 0.0
    if by_hand is not None:
        error = float(np.abs(by_hand - grad).max() / max(np.abs(grad).max(), 1e-300))
        line += f"   by hand: {error:.1e}"
    print(line)
    return error


def follow_the_gradient(model, metric, tokens) -> dict:
    """The gradient of ``metric`` back through the last block, each step redone by hand."""
    L = model.cfg.n_layer - 1
    b = f"blocks.{L}."
    w = model.weights.blocks[L]
    value, cache = model.run_with_cache(tokens, metric=metric, incl_bwd=True)
    print(f"metric = {value:.4f}; its gradient, from the logits back through block {L}:")
    errors = {}

    # the logits: d metric / d logits has +1/batch at the answer, -1/batch at the wrong token
    d_logits = metric.grad(model(tokens))
    _show("d logits", d_logits)
    # logits = ln_final(resid) @ W_U: back through the unembedding and the final layer norm
    normalized = cache["ln_final.hook_normalized"]
    d_final_out = d_logits @ model.W_U.T  # linear_backward's d_x
    d_resid, _, _ = ops.layer_norm_backward(d_final_out, normalized, cache["ln_final.hook_scale"],
                                            model.weights.ln_final_w)
    errors["resid_post"] = _show(f"d {b}hook_resid_post", cache[b + "hook_resid_post_grad"], d_resid)

    # resid_post = resid_mid + mlp_out: the sum passes the gradient to both branches unchanged
    d_mlp_out = cache[b + "hook_mlp_out_grad"]
    errors["mlp_out"] = _show(f"d {b}hook_mlp_out (= d resid_post)", d_mlp_out, d_resid)
    # mlp_out = post @ W_out + b_out
    d_post, _, _ = ops.linear_backward(d_mlp_out, cache[b + "mlp.hook_post"], w.W_out)
    errors["post"] = _show(f"d {b}mlp.hook_post", cache[b + "mlp.hook_post_grad"], d_post)
    # post = gelu(pre): times the GELU's slope at pre
    d_pre = ops.gelu_new_backward(d_post, cache[b + "mlp.hook_pre"])
    errors["pre"] = _show(f"d {b}mlp.hook_pre", cache[b + "mlp.hook_pre_grad"], d_pre)
    # pre = ln2(resid_mid) @ W_in + b_in, and resid_mid also feeds resid_post directly
    mlp_in = ops.affine(cache[b + "ln2.hook_normalized"], w.ln2_w, w.ln2_b)
    d_mlp_in, _, _ = ops.linear_backward(d_pre, mlp_in, w.W_in)
    d_ln2, _, _ = ops.layer_norm_backward(d_mlp_in, cache[b + "ln2.hook_normalized"],
                                          cache[b + "ln2.hook_scale"], w.ln2_w)
    d_resid_mid = d_resid + d_ln2  # the two paths add up
    errors["resid_mid"] = _show(f"d {b}hook_resid_mid (two paths added)", cache[b + "hook_resid_mid_grad"],
                                d_resid_mid)

    # attention: attn_out = concat(z) @ W_O + b_O
    z = cache[b + "attn.hook_z"]
    d_z_flat, _, _ = ops.linear_backward(d_resid_mid, z.reshape(*z.shape[:2], -1), w.W_attn_out)
    d_z = d_z_flat.reshape(z.shape)
    errors["z"] = _show(f"d {b}attn.hook_z", cache[b + "attn.hook_z_grad"], d_z)
    # z = pattern @ v (per head): d pattern = d_z v^T
    v_heads = cache[b + "attn.hook_v"].transpose(0, 2, 1, 3)
    d_z_heads = d_z.transpose(0, 2, 1, 3)
    d_pattern = d_z_heads @ v_heads.swapaxes(-1, -2)
    errors["pattern"] = _show(f"d {b}attn.hook_pattern", cache[b + "attn.hook_pattern_grad"], d_pattern)
    # pattern = softmax(scores): p (d_pattern - sum p d_pattern); masked keys get nothing
    d_scores = ops.softmax_backward(d_pattern, cache[b + "attn.hook_pattern"])
    errors["scores"] = _show(f"d {b}attn.hook_attn_scores", cache[b + "attn.hook_attn_scores_grad"], d_scores)
    # scores = q k^T / sqrt(d_head): d q = d_scores k / sqrt(d_head)
    k_heads = cache[b + "attn.hook_k"].transpose(0, 2, 1, 3)
    d_q = (d_scores @ k_heads / math.sqrt(model.cfg.d_head)).transpose(0, 2, 1, 3)
    errors["q"] = _show(f"d {b}attn.hook_q", cache[b + "attn.hook_q_grad"], d_q)
    _show(f"d {b}hook_resid_pre (on to block {L - 1})", cache[b + "hook_resid_pre_grad"])
    return {"value": value, "errors": errors}


def main(model=None) -> dict:
    model = model if model is not None else pretrained_or_synthetic(dtype="float64")
    tokens = model.to_tokens(PROMPT)
    metric = metrics.logit_diff(" Mary", " John")
    print(f"prompt: {PROMPT!r}\n")
    part1 = follow_the_gradient(model, metric, tokens)

    print("\nwhich tokens the logit difference leans on (scores over the token embeddings):")
    gxi = token_saliency(model, PROMPT, metric, method="grad_x_input")
    ig = token_saliency(model, PROMPT, metric, method="integrated_gradients", steps=64)
    table = gxi[["position", "token", "score"]].rename(columns={"score": "grad x input"})
    table["integrated gradients"] = ig["score"]
    print(table.to_string(index=False, float_format=lambda v: f"{v:9.4f}"))
    a = ig.attrs
    print(f"\nintegrated gradients add up to {a['sum_of_scores']:.4f}; metric - baseline = "
          f"{a['metric']:.4f} - ({a['baseline_metric']:.4f}) = {a['metric'] - a['baseline_metric']:.4f} "
          f"(completeness error {a['completeness_error']:.2%}, {a['steps']} steps)")
    return {**part1, "grad_x_input": gxi, "integrated_gradients": ig}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    args = ap.parse_args()
    main(pretrained_or_synthetic(args.model, dtype="float64"))
