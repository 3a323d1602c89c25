# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The backward pass, one step at a time, and what it is for: saliency
#
# npgpt2 computes gradients by hand: `npgpt2/backward.py` is the forward pass read from the bottom
# up, and each step is an `ops.*_backward` function written beside its forward in `ops.py`. This
# lesson follows the gradient of one number back through the last block, redoing each step with
# those functions and checking it against the gradient the model reports at that hook point (as in
# Karpathy's "Becoming a backprop ninja": a check after every line).
#
# The number is the **logit difference** between two answers, " Mary" and " John", after "When
# Mary and John went to the store, John gave a drink to". Its gradient with respect to an
# activation says how the answer would change, to first order, if that activation moved: the
# basis of attribution patching (`ioi_circuit.py`) and of saliency (part 2).
#
# Everything runs in float64, so the by-hand steps agree with the model to about 1e-12.
#
# *Run time: about 10 s on a 2-core machine at GPT-2 small's size (`benchmarks/bench_lessons.py`
# measures every lesson).*

# %% tags=["parameters"]
MODEL = "gpt2"  # a hub name or a local folder; a small random model stands in when it is not cached
PROMPT = "When Mary and John went to the store, John gave a drink to"
IG_STEPS_SALIENCY = 32  # integrated gradients' steps from the baseline to the prompt (the check below warns if too few)

# %%
import math

import numpy as np

from npgpt2 import metrics, ops, plot
from npgpt2.analysis import token_saliency
from npgpt2.display import show
from npgpt2.testing import pretrained_or_synthetic

model = pretrained_or_synthetic(MODEL, dtype="float64")
show(model)
tokens = model.to_tokens(PROMPT)
metric = metrics.logit_diff(" Mary", " John")  # differentiable: metric(logits) and metric.grad(logits)
errors = {}


def step(name, grad, by_hand=None, key=None):
    """Print a gradient's shape and norm, and how far the by-hand step is from it (relative to
    the gradient's largest entry), remembered under ``key``."""
    line = f"d {name:<44} {str(list(grad.shape)):<18} |grad| = {np.linalg.norm(grad):9.4f}"
    if by_hand is not None:
        errors[key] = e = float(np.abs(by_hand - grad).max() / max(np.abs(grad).max(), 1e-300))
        line += f"   by hand: {e:.1e}"
    print(line)

# %% [markdown]
# ## Part 1: the gradient back through the last block
#
# `run_with_cache(..., metric=m, incl_bwd=True)` runs the forward pass, then the backward pass of
# the metric, and caches every activation's gradient under the activation's name plus `_grad`.

# %%
L = model.cfg.n_layer - 1
b = f"blocks.{L}."
w = model.weights.blocks[L]
value, cache = model.run_with_cache(tokens, metric=metric, incl_bwd=True)
print(f"logit difference = {value:.4f}; its gradient, from the logits back through block {L}:")

# %% [markdown]
# **The logits and the unembedding.** `d metric / d logits` is +1 at " Mary" and -1 at " John",
# at the last position, and zero elsewhere. The logits are `ln_final(resid) @ W_U`: the gradient
# goes back through `W_U` (multiply by its transpose) and through the final layer norm, whose
# backward has to account for the mean and the scale depending on every input.

# %%
d_logits = metric.grad(model(tokens))  # [batch, pos, d_vocab]
step("logits", d_logits)
d_normalized_out = d_logits @ model.W_U.T  # linear_backward's d_x: [batch, pos, d_model]
d_resid, _, _ = ops.layer_norm_backward(d_normalized_out, cache["ln_final.hook_normalized"],
                                        cache["ln_final.hook_scale"], model.weights.ln_final_w)
step(b + "hook_resid_post", cache[b + "hook_resid_post_grad"], d_resid, "resid_post")

# %% [markdown]
# **The residual connection.** `resid_post = resid_mid + mlp_out`: a sum passes its gradient to
# both terms unchanged. So the MLP's output receives exactly `d resid_post`.

# %%
d_mlp_out = cache[b + "hook_mlp_out_grad"]
step(b + "hook_mlp_out (= d resid_post)", d_mlp_out, d_resid, "mlp_out")

# %% [markdown]
# **The MLP.** Back through `W_out` to the neurons, then through the GELU: multiply by its slope
# at the pre-activation. Neurons in the GELU's flat negative region pass almost nothing back.

# %%
d_post, _, _ = ops.linear_backward(d_mlp_out, cache[b + "mlp.hook_post"], w.W_out)  # [batch, pos, d_mlp]
step(b + "mlp.hook_post", cache[b + "mlp.hook_post_grad"], d_post, "post")
d_pre = ops.gelu_new_backward(d_post, cache[b + "mlp.hook_pre"])
step(b + "mlp.hook_pre", cache[b + "mlp.hook_pre_grad"], d_pre, "pre")

# %% [markdown]
# **Two paths meet.** `resid_mid` feeds `resid_post` directly *and* the MLP (through `ln2`). Its
# gradient is the sum of what comes back along both paths: the reason backward passes accumulate
# gradients (`+=`) rather than overwrite them.

# %%
mlp_in = ops.affine(cache[b + "ln2.hook_normalized"], w.ln2_w, w.ln2_b)
d_mlp_in, _, _ = ops.linear_backward(d_pre, mlp_in, w.W_in)
d_ln2, _, _ = ops.layer_norm_backward(d_mlp_in, cache[b + "ln2.hook_normalized"], cache[b + "ln2.hook_scale"], w.ln2_w)
d_resid_mid = d_resid + d_ln2  # the two paths add up
step(b + "hook_resid_mid (two paths added)", cache[b + "hook_resid_mid_grad"], d_resid_mid, "resid_mid")

# %% [markdown]
# **Attention.** Back through `W_O` to each head's `z`; then `z = pattern @ v` gives
# `d pattern = d z @ v^T`; the softmax's backward is `p * (d p - sum(p * d p))` along each row
# (masked keys, with `p = 0`, get nothing); and `scores = q k^T / sqrt(d_head)` gives
# `d q = d scores @ k / sqrt(d_head)`.

# %%
z = cache[b + "attn.hook_z"]  # [batch, pos, head, d_head]
d_z_flat, _, _ = ops.linear_backward(d_resid_mid, z.reshape(*z.shape[:2], -1), w.W_O)
d_z = d_z_flat.reshape(z.shape)
step(b + "attn.hook_z", cache[b + "attn.hook_z_grad"], d_z, "z")
v_heads = cache[b + "attn.hook_v"].transpose(0, 2, 1, 3)  # [batch, head, key_pos, d_head]
d_pattern = d_z.transpose(0, 2, 1, 3) @ v_heads.swapaxes(-1, -2)  # [batch, head, query_pos, key_pos]
step(b + "attn.hook_pattern", cache[b + "attn.hook_pattern_grad"], d_pattern, "pattern")
d_scores = ops.softmax_backward(d_pattern, cache[b + "attn.hook_pattern"])
step(b + "attn.hook_attn_scores", cache[b + "attn.hook_attn_scores_grad"], d_scores, "scores")
k_heads = cache[b + "attn.hook_k"].transpose(0, 2, 1, 3)
d_q = (d_scores @ k_heads / math.sqrt(model.cfg.d_head)).transpose(0, 2, 1, 3)  # [batch, pos, head, d_head]
step(b + "attn.hook_q", cache[b + "attn.hook_q_grad"], d_q, "q")
step(b + f"hook_resid_pre (on to block {L - 1})", cache[b + "hook_resid_pre_grad"])
print(f"\nlargest relative difference of a by-hand step: {max(errors.values()):.1e}")

# %% [markdown]
# ## Part 2: which tokens does the answer lean on?
#
# **Gradient x input** scores each prompt token by `sum(grad * embedding)` over its embedding
# vector: the first-order effect of removing it. It is cheap and often misleading, because the
# gradient is taken at one point. **Integrated gradients** average the gradient along a straight
# path from a baseline (here, the `<|endoftext|>` embedding) to the prompt; their scores add up to
# `metric(prompt) - metric(baseline)` (*completeness*), which we check.

# %%
gxi = token_saliency(model, PROMPT, metric, method="grad_x_input")
ig = token_saliency(model, PROMPT, metric, method="integrated_gradients", steps=IG_STEPS_SALIENCY)
table = gxi[["position", "token", "score"]].rename(columns={"score": "grad x input"})
table["integrated gradients"] = ig["score"]
show(table)
a = ig.attrs
print(f"integrated gradients add up to {a['sum_of_scores']:.4f}; metric - baseline = {a['metric'] - a['baseline_metric']:.4f} "
      f"(completeness error {a['completeness_error']:.2%} with {a['steps']} steps)")
plot.saliency_plot(ig);
results = {"value": value, "errors": errors, "grad_x_input": gxi, "integrated_gradients": ig}

# %% [markdown]
# **Takeaways.** Backpropagation is the forward pass read backwards: every op has a small local
# rule, sums pass gradients through, and branches that meet add theirs up. On the real model,
# saliency puts weight on the names: the repeated " John" (which the model must not copy) and
# " Mary". `ioi_circuit.py` uses the same gradients at scale, to score every edge of the model.
