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
# # GPT-2's forward pass, one step at a time
#
# This lesson computes GPT-2's output by hand, in NumPy, from the weights: the embeddings, then
# for every block a layer norm, multi-head attention (the textbook version: scores, mask, softmax,
# weighted sum of values), a residual add, another layer norm, the MLP and another add; then the
# final layer norm and the unembedding. After every step it prints the array's shape, and checks
# the array against the activation the model itself exposes at that point under its
# TransformerLens name (`blocks.0.attn.hook_pattern`, ...).
#
# Nothing here is hidden behind a framework: `npgpt2/reference.py` is the same computation on one
# screen, and `npgpt2/model.py` is it again with hooks, batching and a key/value cache. When you
# are done here, `npgpt2.step_through(model, "The cat sat")` walks through `model.py` in the
# debugger.
#
# The notation: `batch` prompts, `pos` positions (tokens), `d_model` the width of the residual
# stream, `n_head` heads of width `d_head = d_model / n_head`, `d_mlp = 4 d_model` neurons,
# `d_vocab` = 50,257 tokens.
#
# *Run time: about 5 s on a 2-core machine at GPT-2 small's size (`benchmarks/bench_lessons.py`
# measures every lesson).*

# %% tags=["parameters"]
MODEL = "gpt2"  # a hub name or a local folder; a small random model stands in when it is not cached
PROMPT = "The cat sat on the mat because it was"

# %%
import numpy as np

from npgpt2.display import show
from npgpt2.testing import pretrained_or_synthetic

model = pretrained_or_synthetic(MODEL, dtype="float64")  # float64: the by-hand steps agree to ~1e-12
cfg = model.cfg
show(model)
print(f"d_model={cfg.d_model}  n_head={cfg.n_head}  d_head={cfg.d_head}  d_mlp={cfg.d_mlp}  n_layer={cfg.n_layer}")

# %% [markdown]
# Run the model once with every activation cached: the reference we check each step against.
# `show(cache)` in a notebook lists the hook points grouped by layer, with their shapes and the
# memory they take.

# %%
tokens = model.to_tokens(PROMPT)  # [batch=1, pos]
logits, cache = model.run_with_cache(tokens)
show(cache)
checks = {}


def check(step, mine, name):
    """Print the shape of a by-hand array and how far it is from the model's activation ``name``."""
    theirs = cache[name]
    with np.errstate(invalid="ignore"):  # -inf - -inf, at the masked scores
        error = float(np.abs(np.where(mine == theirs, 0.0, mine - theirs)).max())
    checks[name] = error
    print(f"{step:<44} {str(list(mine.shape)):<18} vs {name}: {error:.1e}")


print("tokens", tokens.shape, model.to_str_tokens(tokens))

# %% [markdown]
# ## 1. Embeddings
#
# Each token id picks a row of the token embedding `W_E` `[d_vocab, d_model]`, and each position a
# row of the learned position embedding `W_pos` `[n_ctx, d_model]`. Their sum is the **residual
# stream**: the running vector at each position that every later layer reads from and adds to.

# %%
embed = model.W_E[tokens]  # [batch, pos, d_model]
pos_embed = model.W_pos[: tokens.shape[1]][None]  # [1, pos, d_model]
resid = embed + pos_embed  # [batch, pos, d_model]
check("token embedding W_E[tokens]", embed, "hook_embed")
check("embedding + position embedding", resid, "blocks.0.hook_resid_pre")

# %% [markdown]
# ## 2. Layer norm
#
# Before attention, each position's vector is centred (its mean over `d_model` subtracted),
# divided by its standard deviation (the **scale**, `sqrt(var + eps)`), then multiplied by a
# learned gain and shifted by a learned bias. The scale depends on the input, which is why it is
# a hook point of its own: interpretability work often freezes it.

# %%
w = model.weights.blocks[0]  # block 0's weights, in GPT-2's own layout (x @ W + b)
centred = resid - resid.mean(-1, keepdims=True)  # [batch, pos, d_model]
scale = np.sqrt((centred ** 2).mean(-1, keepdims=True) + cfg.layer_norm_epsilon)  # [batch, pos, 1]
normalized = centred / scale  # [batch, pos, d_model]
attn_in = normalized * w.ln1_w + w.ln1_b  # [batch, pos, d_model]
check("layer norm scale", scale, "blocks.0.ln1.hook_scale")
check("normalized (before gain and bias)", normalized, "blocks.0.ln1.hook_normalized")

# %% [markdown]
# ## 3. Attention, the textbook way
#
# One matrix multiplication makes the queries, keys and values of every head at once:
# `W_qkv` is `[d_model, 3 d_model]`. Splitting the last axis into three, then each third into
# `n_head` pieces of `d_head`, gives `q`, `k`, `v` of shape `[batch, pos, head, d_head]`.

# %%
qkv = attn_in @ w.W_qkv + w.b_qkv  # [batch, pos, 3 * d_model]
q, k, v = np.split(qkv, 3, axis=-1)  # each [batch, pos, d_model]
batch, pos = tokens.shape
q = q.reshape(batch, pos, cfg.n_head, cfg.d_head)  # [batch, pos, head, d_head]
k = k.reshape(batch, pos, cfg.n_head, cfg.d_head)
v = v.reshape(batch, pos, cfg.n_head, cfg.d_head)
check("queries", q, "blocks.0.attn.hook_q")
check("keys", k, "blocks.0.attn.hook_k")
check("values", v, "blocks.0.attn.hook_v")

# %% [markdown]
# Each head compares every query with every key: `scores = q k^T / sqrt(d_head)`, a
# `[query_pos, key_pos]` matrix per head. Dividing by `sqrt(d_head)` keeps the scores' size
# independent of the head width. GPT-2 predicts the next token, so a position may not look ahead:
# the **causal mask** sets every score with a key after its query to `-inf`, which the softmax
# turns into exactly zero attention.

# %%
q_heads = q.transpose(0, 2, 1, 3)  # [batch, head, query_pos, d_head]
k_heads = k.transpose(0, 2, 1, 3)  # [batch, head, key_pos, d_head]
v_heads = v.transpose(0, 2, 1, 3)  # [batch, head, key_pos, d_head]
scores = q_heads @ k_heads.swapaxes(-1, -2) / np.sqrt(cfg.d_head)  # [batch, head, query_pos, key_pos]
future = np.triu(np.ones((pos, pos), dtype=bool), k=1)  # [query_pos, key_pos]: True where key > query
scores = np.where(future, -np.inf, scores)
check("scores q.k / sqrt(d_head), masked", scores, "blocks.0.attn.hook_attn_scores")

# %% [markdown]
# The softmax over the keys turns each query's row of scores into weights that sum to 1: the
# **attention pattern**. (Subtracting each row's maximum first changes nothing mathematically and
# keeps `exp` from overflowing.)

# %%
e = np.exp(scores - scores.max(-1, keepdims=True))
pattern = e / e.sum(-1, keepdims=True)  # [batch, head, query_pos, key_pos]
check("pattern = softmax(scores)", pattern, "blocks.0.attn.hook_pattern")
print("every row sums to 1:", np.allclose(pattern.sum(-1), 1), "| nothing above the diagonal:",
      bool((pattern[..., future] == 0).all()))

# %% [markdown]
# Hover over a token below to see where it attends in each head (in a terminal, this prints a
# one-line summary; `.save("page.html")` writes the same view as a page).

# %%
from npgpt2 import plot

show(plot.attention_view(cache, model.to_str_tokens(tokens), 0, title="block 0"))

# %% [markdown]
# Each query's output is the pattern-weighted average of the values: `z = pattern @ v`, per head.
# The heads' outputs are laid side by side (`[batch, pos, n_head * d_head]` = `d_model`) and mixed
# by the output matrix `W_O`; the result is **added** to the residual stream.

# %%
z_heads = pattern @ v_heads  # [batch, head, query_pos, d_head]
z = z_heads.transpose(0, 2, 1, 3)  # [batch, pos, head, d_head]
check("z = pattern @ v", z, "blocks.0.attn.hook_z")
attn_out = z.reshape(batch, pos, cfg.d_model) @ w.W_O + w.b_O  # [batch, pos, d_model]
check("attention output concat(z) @ W_O + b_O", attn_out, "blocks.0.hook_attn_out")
resid_mid = resid + attn_out  # [batch, pos, d_model]
check("residual stream after attention", resid_mid, "blocks.0.hook_resid_mid")

# %% [markdown]
# `W_O` split by head, `[head, d_head, d_model]`, shows that the attention layer is a **sum of
# independent heads**, each writing `z[h] @ W_O[h]` into the residual stream. This is the view
# most interpretability work takes (TransformerLens's `hook_result`).

# %%
W_O = w.W_O.reshape(cfg.n_head, cfg.d_head, cfg.d_model)  # [head, d_head, d_model]
per_head = np.einsum("bphd,hdm->bphm", z, W_O)  # [batch, pos, head, d_model]
print("sum over heads + b_O equals the attention output:",
      np.abs(per_head.sum(2) + w.b_O - attn_out).max())

# %% [markdown]
# ## 4. The MLP
#
# A second layer norm, then a two-layer perceptron applied to each position on its own:
# `d_model -> d_mlp` (4x wider), GELU, `d_mlp -> d_model`. The `d_mlp` values after the GELU are
# the **neurons**. GPT-2's GELU is the tanh approximation. (`npgpt2.ops.gelu_new` computes the
# same function as `pre / (1 + exp(-2u))`, u being the argument of tanh below: 0.5 (1 + tanh(u)) is
# the sigmoid of 2u, and NumPy's exp costs about half its tanh.)

# %%
centred = resid_mid - resid_mid.mean(-1, keepdims=True)
mlp_in = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + cfg.layer_norm_epsilon) * w.ln2_w + w.ln2_b
pre = mlp_in @ w.W_in + w.b_in  # [batch, pos, d_mlp]
post = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))  # [batch, pos, d_mlp]
mlp_out = post @ w.W_out + w.b_out  # [batch, pos, d_model]
check("MLP pre-activation", pre, "blocks.0.mlp.hook_pre")
check("neurons GELU(pre)", post, "blocks.0.mlp.hook_post")
check("MLP output", mlp_out, "blocks.0.hook_mlp_out")
resid = resid_mid + mlp_out  # [batch, pos, d_model]
check("residual stream leaving block 0", resid, "blocks.0.hook_resid_post")

# %% [markdown]
# ## 5. The other blocks, then the unembedding
#
# Every block does the same with its own weights. We have checked block 0 step by step; the
# pure functions of `npgpt2/reference.py` do exactly what we did, so we use them for the rest.
# After the last block comes the final layer norm, then the unembedding `W_U` `[d_model, d_vocab]`
# (GPT-2 ties it to the embedding: `W_U = W_E^T`), giving one logit per vocabulary token at each
# position.

# %%
from npgpt2 import reference

for l in range(1, cfg.n_layer):
    resid = reference.block(resid[0], model.weights.blocks[l], cfg.n_head, cfg.layer_norm_epsilon)[None]
    check(f"residual stream leaving block {l}", resid, f"blocks.{l}.hook_resid_post")
final = reference.layer_norm(resid, model.weights.ln_final_w, model.weights.ln_final_b, cfg.layer_norm_epsilon)
my_logits = final @ model.W_U  # [batch, pos, d_vocab]
print(f"logits {list(my_logits.shape)}; largest difference from the model's: {np.abs(my_logits - logits).max():.1e}")
print("tied embedding: W_U is W_E transposed:", np.shares_memory(model.W_U, model.W_E) or np.array_equal(model.W_U, model.W_E.T))

# %% [markdown]
# ## 6. From logits to a prediction
#
# The logits at position *j* score every possible next token after reading tokens `0..j`. A
# softmax turns them into probabilities; the loss is the mean negative log-probability of the
# tokens that really came next.

# %%
logp = my_logits[0] - my_logits[0].max(-1, keepdims=True)
logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))  # [pos, d_vocab] log-probabilities
loss = -logp[np.arange(pos - 1), tokens[0, 1:]].mean()
print(f"loss by hand {loss:.6f}, model.loss {model.loss(tokens):.6f}")
top = np.argsort(-logp[-1])[:5]
print("after", repr(PROMPT), "the model expects:", [(model.tokenizer.token_str(t), round(float(np.exp(logp[-1, t])), 4)) for t in top])
worst = max(checks.values())
print(f"\n{len(checks)} activations recomputed by hand; largest difference {worst:.1e}")

# %% [markdown]
# **Takeaways.** GPT-2 is embeddings, then `n_layer` times "read the residual stream through a
# layer norm, compute, add back", then an unembedding. Attention is the only place positions
# exchange information; everything else acts on each position alone. Every array above has a
# name under which npgpt2 caches it and lets a hook replace it: the next lessons use those names
# to find what the heads and neurons do.
