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
# # What a position-by-token probability table measures, and what the logit lens adds
#
# A common first experiment with GPT-2: run it on a prompt, take `softmax(logits)` at every
# position *j*, look up the probability of every prompt token *i*, and put the numbers in a table.
# The notebook this project grew from did exactly that, then labelled the columns
# `layer_0 .. layer_n` and read them as the model's layers.
#
# They are not layers. Every column comes from the **final** layer; there is one column per
# **position** of the same forward pass. This lesson
#
# 1. builds that table with the right labels and says what each part of it measures,
# 2. shows why the mislabelling was so easy to make,
# 3. builds the per-position table of what the model actually predicts, and
# 4. answers the question the layer labels were reaching for, *how does the prediction build up
#    through the layers?*, with the logit lens.
#
# It runs on the real `gpt2` when it is in the local Hugging Face cache (`npgpt2 download gpt2`),
# and otherwise on a small random model whose tables have the same shape and meaning but noise in
# them. Run it as a notebook (`jupytext --to ipynb examples/token_tables.py`) or as a script
# (`python examples/token_tables.py`).
#
# *Run time: about 10 s on a 2-core machine at GPT-2 small's size (`benchmarks/bench_lessons.py`
# measures every lesson).*

# %% tags=["parameters"]
MODEL = "gpt2"  # a hub name or a local folder; a small random model stands in when it is not cached
OUT_DIR = None  # a folder to save the heatmaps in, or None
PROMPTS = ["Hello, my dog is cute", "Oh, I love ice cream so much!", "I am not sure what you are saying"]

# %%
import os

import numpy as np

from npgpt2 import ops, plot
from npgpt2.analysis import logit_lens, next_token_table, prompt_token_probs
from npgpt2.display import show
from npgpt2.testing import pretrained_or_synthetic

model = pretrained_or_synthetic(MODEL)
if OUT_DIR:
    os.makedirs(OUT_DIR, exist_ok=True)
show(model)

# %% [markdown]
# ## 1. The table, built by hand
#
# One forward pass gives logits of shape `[batch, pos, d_vocab]`. The softmax over the vocabulary
# at position *j* is the model's distribution over the token that comes **after** token *j*,
# having read tokens `0..j` and nothing later (the attention mask sees to that).
#
# Look up, in each of those distributions, the prompt's own tokens: entry *(i, j)* is
# `P(next token = token_i | tokens 0..j)`.

# %%
prompt = PROMPTS[0]
tokens = model.to_tokens(prompt)  # [1, pos]
logits = model(tokens)  # [1, pos, d_vocab]
probs = np.exp(ops.log_softmax(logits[0].astype(np.float64)))  # [pos, d_vocab]: one distribution per position
by_hand = probs[:, tokens[0]].T  # [token i, position j]
print("tokens:", model.to_str_tokens(prompt))
print("logits", logits.shape, "-> probabilities", probs.shape, "-> table", by_hand.shape)

# %% [markdown]
# `prompt_token_probs` makes the same table, with its rows and columns labelled for what they are:
# rows *(i, token_i)*, columns *(position j, token_j)*. With `style=True` it comes back as a pandas
# `Styler`, each cell shaded by its probability (in a terminal it prints as plain numbers).

# %%
matrix = prompt_token_probs(model, prompt)
assert np.allclose(matrix.to_numpy(), by_hand, atol=1e-6)
show(prompt_token_probs(model, prompt, style=True))

# %% [markdown]
# How to read it:
#
# * **The diagonal just above the main one** (row *j + 1*, column *j*) is the probability the
#   model gave to the token that really came next. This is the part that measures how well the
#   model predicts the prompt.
# * **Rows *i ≤ j*** are tokens the model has already seen: probability there is the model
#   expecting a repeat (copying, which induction heads do).
# * **Rows *i > j + 1*** are tokens the prompt only uses later: probability there is anticipation,
#   or just that common tokens (`,`, ` the`) are likely anywhere.
#
# Correlating the columns with each other, or with one-hot position indicators, measures how each
# position's prediction loads on the prompt's tokens. It says nothing about layers.

# %% [markdown]
# ## 2. Why it is easy to read the columns as layers
#
# The table is square, `[pos, pos]`, and a 12-layer model run on a 12-token prompt gives a table
# with 12 columns: the same count as the layers. The columns also change smoothly from left to
# right, as one would expect of a prediction refined layer by layer. But the smoothness comes from
# the prefix growing by one token per column, not from depth. A quick test tells the two apart:
# a column's values depend on the prompt's length up to *j* and nothing else, while a layer's
# would change if the model had fewer layers. Truncating the prompt removes columns; the model's
# depth never enters.

# %%
shorter = prompt_token_probs(model, model.to_tokens(prompt)[:, :3])
print("first three columns, from the whole prompt and from only its first three tokens:")
print(np.abs(matrix.to_numpy()[:3, :3] - shorter.to_numpy()).max(), "largest difference (causal: the same)")

# %% [markdown]
# ## 3. What the model predicts at each position
#
# `next_token_table` turns the same forward pass into one row per position: the token there, the
# token that really comes next with its probability, log-probability and rank, the entropy of the
# prediction, and the model's own top choices. `style=True` colours the probabilities.

# %%
table = next_token_table(model, prompt, k=3)
show(next_token_table(model, prompt, k=3, style=True))

# %% [markdown]
# ## 4. The question the layer labels were reaching for: the logit lens
#
# To see how a prediction builds up through the layers, read the **residual stream** after each
# block as if it were the last: put it through the final layer norm and the unembedding. That is
# the logit lens (nostalgebraist, 2020). Its rows really are layers (`0_pre` is the embedding,
# `{l}_pre` the stream entering block *l*, `final_post` after the last block), and its last row is
# the model's own output, the diagonal of the table above.

# %%
lens = logit_lens(model, prompt)
grid = lens.pivot(index="layer", columns="position", values="next_prob")
show(grid)
# the lens read after the last layer is the model's own prediction
assert np.allclose(grid.loc["final_post"].to_numpy()[:-1], table["next_prob"].to_numpy()[:-1], atol=1e-4)

# %%
plot.logit_lens_heatmap(lens, path=os.path.join(OUT_DIR, "logit_lens_0.png") if OUT_DIR else None);

# %% [markdown]
# On the real GPT-2 the early rows are poor guesses (often the current token itself) and the right
# answer appears in the middle layers, then sharpens. On the random model the rows are noise, but
# the shapes and the last row's agreement with the model's output hold all the same.
#
# ## 5. The other prompts
#
# The same three views for every prompt, collected in `results` (what the tests check).

# %%
results = {}
for prompt in PROMPTS:
    lens = logit_lens(model, prompt)
    results[prompt] = {"matrix": prompt_token_probs(model, prompt), "table": next_token_table(model, prompt, k=3),
                       "lens": lens}
    if OUT_DIR:
        plot.logit_lens_heatmap(lens, path=os.path.join(OUT_DIR, f"logit_lens_{len(results) - 1}.png"))
    best = results[prompt]["table"]["next_prob"].max()
    print(f"{prompt!r}: best-predicted next token has probability {best:.3f}")

# %% [markdown]
# **Takeaways.** A position-by-token table is a table of *positions*, all read at the last layer;
# its most useful part is the diagonal above the main one. To ask about *layers*, read the
# residual stream at each one: the logit lens. Next: `forward_pass.py` takes one forward pass
# apart step by step.
