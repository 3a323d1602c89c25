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
# # Induction heads
#
# If "Harry Potter" appeared earlier in a text, then after the next "Harry" a language model
# should expect "Potter". Transformers learn a two-head circuit for this (Elhage et al. 2021;
# Olsson et al. 2022):
#
# * a **previous-token head** writes, at every position, "the token before me was A";
# * an **induction head** at a later position holding A uses that (through **K-composition**:
#   its keys read what the previous-token head wrote) to find where A occurred before, attends to
#   the token right *after* it, and copies that token into its prediction.
#
# The cleanest test needs no natural text at all: a sequence of random tokens, then the same
# sequence again. The first copy cannot be predicted; the second can, but only by induction.
# This lesson measures the loss on each copy, scores every head as an induction head and as a
# previous-token head, and looks at the best of each.
#
# It runs by default on the zoo's induction model (`npgpt2.zoo.induction()`: a 2-layer GPT-2 with
# a 300-word vocabulary, trained here in about a minute the first time), whose previous-token heads
# are in layer 0 and induction heads in layer 1. With `MODEL = "gpt2"` (when cached) the induction
# heads are 5.1, 5.5, 6.9, 7.2, 7.10 and the strongest previous-token head is 4.11. A small random
# model has none: its tables show what the measurements look like when there is nothing to find.
#
# *Run time: about 5 s on a 2-core machine (the first run also trains the zoo's model, about a
# minute; `benchmarks/bench_lessons.py` measures every lesson).*

# %% tags=["parameters"]
MODEL = "zoo:induction"  # "zoo:induction", a hub name or a local folder; a small random model stands in for one not cached
SEQ_LEN = 50  # random tokens per copy
OUT_DIR = None  # a folder for the pictures, or None

# %%
import os

import numpy as np
import pandas as pd

from npgpt2 import plot
from npgpt2.analysis.head_detector import detect_head, induction_scores, repeated_tokens
from npgpt2.display import show
from npgpt2.testing import pretrained_or_synthetic

model = pretrained_or_synthetic(MODEL)
if OUT_DIR:
    os.makedirs(OUT_DIR, exist_ok=True)
seq_len = min(SEQ_LEN, (model.cfg.n_ctx - 1) // 2)  # two copies and a BOS must fit the context
show(model)

# %% [markdown]
# ## 1. Repeated random tokens
#
# `repeated_tokens` draws `seq_len` random tokens and repeats them, after an `<|endoftext|>` (BOS)
# that gives heads somewhere to rest their attention. Here is the start of one such sequence.

# %%
tokens = repeated_tokens(model, seq_len, 2, batch=1, seed=1)  # [1, 1 + 2 * seq_len]
print(tokens.shape, model.to_str_tokens(tokens[0, :12]), "...")

# %% [markdown]
# ## 2. The loss on each copy
#
# `induction_scores` runs a small batch of such sequences and returns the per-token loss with the
# copy each position is in. On a model with induction heads the repeat costs a fraction of the
# first copy (GPT-2 small: about 7 nats, then under 1); without them both cost the same.

# %%
scores, loss = induction_scores(model, seq_len=seq_len, n_repeats=2, batch=4, seed=0)
by_copy = loss.groupby("copy")["loss"].mean()
print(f"loss per token: first copy {by_copy[0]:.3f} nats, repeat {by_copy[1]:.3f} nats")

# %% [markdown]
# ## 3. Scoring the heads
#
# An induction head at position *i* in the repeat attends to position *i - seq_len + 1*: the token
# after the previous occurrence of its own token. Its **induction score** is its mean attention
# there. A previous-token head attends to *i - 1*. `detect_head` scores every head against a
# detection pattern of that shape (TransformerLens's head detector).

# %%
prev = detect_head(model, tokens, "previous_token_head")  # [layer, head]
induct = detect_head(model, tokens, "induction_head")
heads = pd.DataFrame([{"head": f"L{l}H{h}", "layer": l, "head_index": h, "induction_score": scores[l, h],
                       "induction_detector": induct[l, h], "previous_token_detector": prev[l, h]}
                      for l in range(model.cfg.n_layer) for h in range(model.cfg.n_head)])
print("top induction heads:")
show(heads.sort_values("induction_score", ascending=False).head(5))
print("top previous-token heads:")
show(heads.sort_values("previous_token_detector", ascending=False).head(5))

# %%
plot.heatmap(scores, [f"layer {l}" for l in range(model.cfg.n_layer)], [f"H{h}" for h in range(model.cfg.n_head)],
             title="induction score", path=os.path.join(OUT_DIR, "induction_scores.png") if OUT_DIR else None);

# %% [markdown]
# ## 4. Looking at them
#
# An induction head's pattern on a repeated sequence has a stripe parallel to the diagonal,
# `seq_len - 1` positions below it; a previous-token head's is the line just below the diagonal.
# Hover over a token in the second copy to see both at once.

# %%
best = heads.sort_values("induction_score", ascending=False).iloc[0]
best_prev = heads.sort_values("previous_token_detector", ascending=False).iloc[0]
pair = [(int(best.layer), int(best.head_index)), (int(best_prev.layer), int(best_prev.head_index))]
short = tokens[:, : 1 + 2 * min(seq_len, 12)]  # a readable stretch: two copies of 12 tokens
_, cache = model.run_with_cache(short, names_filter=lambda n: n.endswith("hook_pattern"))
show(plot.attention_view(cache, model.to_str_tokens(short), pair, title="induction head, previous-token head"))
plot.attention_patterns(cache, model.to_str_tokens(short), pair,
                        path=os.path.join(OUT_DIR, "induction_heads.png") if OUT_DIR else None);

# %% [markdown]
# ## 5. Why it must be two heads
#
# One head alone cannot do it: attention decides where to look from the query and key at each
# position, and a token's key knows only its own position's content. "Attend to the token whose
# *predecessor* matches me" needs the predecessor's identity in the key, and only an earlier head
# can move it there. So the induction head is always in a later layer than its previous-token
# head. Check it: on the induction model the induction heads are in layer 1 and the previous-token
# heads in layer 0; on gpt2 every top induction head's layer is greater than 4.

# %%
print("induction head", pair[0], "previous-token head", pair[1],
      "- in order" if pair[0][0] > pair[1][0] else "- not in order (a random model has no such circuit)")
results = {"scores": scores, "loss": loss, "heads": heads}

# %% [markdown]
# **Takeaways.** Repeated random tokens isolate induction: there is nothing else to predict the
# repeat with. The loss drop measures the behaviour, the scores find the heads, and the layer
# order reflects the circuit. `superposition.py` turns to a different question: how features are
# stored at all.
