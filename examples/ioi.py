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
# # Indirect object identification: an exploratory analysis
#
# "When John and Mary went to the shops, John gave the bag to" → " Mary". To finish the sentence
# the model must notice that John is mentioned twice and Mary once, and copy the name that is
# *not* repeated: the indirect object. Wang et al. (2022) found the circuit in GPT-2 small that
# does it; this lesson follows the first steps of that work, as TransformerLens's Exploratory
# Analysis Demo does, in plain NumPy:
#
# 1. a **metric**: the logit difference between the right and the wrong name,
# 2. the **logit lens** of that metric: after which layer does the answer appear?
# 3. **direct logit attribution**: which layers and heads write the answer into the residual stream?
# 4. the **attention patterns** of those heads: what do they look at?
# 5. **activation patching**: which activations carry the information, found by swapping them
#    between prompts,
# 6. **ablation**: knock out the top head and watch other heads take over.
#
# With the real `gpt2` cached the famous heads appear (name movers 9.9, 9.6, 10.0). On the small
# random model every table has the same shape and meaning but noise in it.
#
# *Run time: about 30 s on a 2-core machine at GPT-2 small's size (`benchmarks/bench_lessons.py`
# measures every lesson).*

# %% tags=["parameters"]
MODEL = "gpt2"  # a hub name or a local folder; a small random model stands in when it is not cached
OUT_DIR = None  # a folder for the pictures and attention pages, or None

# %%
import os

import numpy as np
import pandas as pd

from npgpt2 import plot
from npgpt2.analysis import direct_logit_attribution, patching
from npgpt2.analysis.ablation import ablation_hook
from npgpt2.display import show
from npgpt2.prompts import ioi_prompts
from npgpt2.testing import pretrained_or_synthetic

model = pretrained_or_synthetic(MODEL)
if OUT_DIR:
    os.makedirs(OUT_DIR, exist_ok=True)
show(model)
results = {}

# %% [markdown]
# ## The prompts
#
# Four sentence templates, each with both name orders: eight prompts. Swapping the order makes
# the right answer in one prompt the wrong answer in its partner, so no head can score well by
# always preferring one name or one position. Every prompt has the same number of tokens, so they
# batch without padding.

# %%
prompts, answers = ioi_prompts()
tokens = model.to_tokens(prompts)  # [8, pos]
right = np.array([model.to_single_token(a) for a, _ in answers])  # [8] the indirect object
wrong = np.array([model.to_single_token(w) for _, w in answers])  # [8] the repeated subject
show(pd.DataFrame({"prompt": prompts, "answer": [a for a, _ in answers], "wrong": [w for _, w in answers]}))

# %% [markdown]
# ## 1. The logit difference
#
# `logit(right) - logit(wrong)` at the last position. It is the log of the ratio of the two
# probabilities (the softmax's normaliser cancels), so it measures exactly the choice between the
# two names and nothing else. Being a difference of logits, it is linear in the final residual
# stream, which is what makes the attributions below exact.

# %%
logits, cache = model.run_with_cache(tokens)
last = logits[:, -1]  # [8, d_vocab]
per_prompt = last[np.arange(8), right] - last[np.arange(8), wrong]
results["logit_diff"] = pd.DataFrame({"prompt": prompts, "answer": [a for a, _ in answers],
                                      "wrong": [w for _, w in answers], "logit_diff": per_prompt})
print(f"mean logit difference {per_prompt.mean():.3f} (real gpt2: about 3.5)")
show(results["logit_diff"])

# %% [markdown]
# ## 2. The logit lens of the logit difference
#
# The residual stream after each layer (and between attention and MLP), at the last position, put
# through the final layer norm and projected on the *answer direction*
# `W_U[:, right] - W_U[:, wrong]`. After the last layer this is the model's own logit difference;
# before, it says how much of the answer is already written. On GPT-2 small the difference stays
# near zero until layer 9 and then jumps: the work happens late.

# %%
resid, labels = cache.accumulated_resid(pos_slice=-1, incl_mid=True, apply_ln=True, return_labels=True)
direction = model.tokens_to_residual_directions(right) - model.tokens_to_residual_directions(wrong)  # [8, d_model]
lens = np.einsum("cbd,bd->cb", resid, direction) + (model.b_U[right] - model.b_U[wrong])  # [component, 8]
results["lens"] = pd.DataFrame({"layer": labels, "logit_diff": lens.mean(1)})
show(results["lens"])

# %% [markdown]
# ## 3. Direct logit attribution
#
# The final residual stream is a sum: the embeddings, plus each attention layer's output, plus
# each MLP's output. Each attention output is itself a sum over heads. Put each term through the
# final layer norm's (frozen) scale and onto the answer direction, and the terms add up to the
# logit difference: each component's **direct** contribution. "Direct" is the catch: a head that
# matters by changing what later heads do gets no credit here.

# %%
results["dla_layer"] = direct_logit_attribution(model, cache, tokens, right, wrong, by="layer")
results["dla_head"] = direct_logit_attribution(model, cache, tokens, right, wrong, by="head")
heads = results["dla_head"][results["dla_head"]["type"] == "head"]
show(results["dla_layer"][["component", "attribution"]])
show(pd.concat([heads.head(5), heads.tail(3)])[["component", "attribution"]])

# %%
plot.attribution_heatmap(results["dla_head"], path=os.path.join(OUT_DIR, "dla_heads.png") if OUT_DIR else None);

# %% [markdown]
# ## 4. What the top heads attend to
#
# The heads with the largest positive attribution are candidate **name movers**: at the last
# position they should attend to the indirect object's name and copy it. The most negative ones
# are candidate **negative name movers**, which do the same with the opposite sign. Hover over
# the last token in the view below to see where it attends in each head.

# %%
top = [(int(r.layer), int(r.head)) for r in pd.concat([heads.head(3), heads.tail(1)]).itertuples()]
results["top_heads"] = top
str_tokens = model.to_str_tokens(tokens[0])
view = plot.attention_view(cache, str_tokens, top, title=prompts[0])
show(view)

# %%
plot.attention_patterns(cache, str_tokens, top, path=os.path.join(OUT_DIR, "top_heads.png") if OUT_DIR else None);
if OUT_DIR:
    view.save(os.path.join(OUT_DIR, "top_heads.html"))
    for layer in sorted({l for l, _ in top}):  # every head of the layer, one page per layer
        plot.attention_html(cache["pattern", layer][0], str_tokens, layer,
                            path=os.path.join(OUT_DIR, f"attention_layer{layer}.html"))

# %% [markdown]
# ## 5. Activation patching
#
# Attribution says where the answer is *written*; patching says where the information that decides
# it *lives*. Run the model on a **corrupted** prompt (the partner with the other name order,
# whose right answer is our wrong one), and put back one activation from the **clean** run. If the
# logit difference recovers, that activation carried what mattered. The metric is normalised:
# 0 is the corrupted run, 1 the clean run.
#
# Exact patching costs a forward pass (from the patched layer on) for every patched activation:
# the residual stream at each layer and position of GPT-2 small is 12 x 15 = 180 runs. To keep the
# lesson to about a minute, the sweeps here patch one pair of prompts, the first template in both
# name orders, rather than all eight: each pair differs from its partner in the same way, so the
# picture is the same, with one template's noise in it instead of four templates' average.

# %%
pair = tokens[:2]  # the first template, in both name orders
corrupted = pair[::-1]  # each prompt's partner: the right name of one is the wrong name of the other
metric = patching.logit_diff_metric(right[:2], wrong[:2])
pair_logits, pair_cache = model.run_with_cache(pair)
norm = patching.normalized_metric(metric, metric(pair_logits), metric(model(corrupted)))
resid_pre = patching.get_act_patch_resid_pre(model, corrupted, pair_cache, norm)  # [layer, pos]
results["patch_resid_pre"] = patching.patching_frame(resid_pre, ("layer", "pos"), str_tokens)
show(pd.DataFrame(resid_pre, columns=[f"{i}:{t.strip()}" for i, t in enumerate(str_tokens)]).round(2))

# %% [markdown]
# The clean and corrupted prompts differ only where the repeated name stands, so early on only
# that position matters. On the real model the information then moves to the last position in
# the middle layers (the S-inhibition heads carry it there). Which heads carry it? Patching each
# head's output, at every position at once, is 12 x 12 = 144 more runs:

# %%
head_out = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, pair_cache, norm)  # [layer, head]
results["patch_heads"] = patching.patching_frame(head_out, ("layer", "head"))
plot.heatmap(head_out, [f"layer {l}" for l in range(model.cfg.n_layer)], [f"H{h}" for h in range(model.cfg.n_head)],
             title="patching each head's output (all positions)", center=True);
show(results["patch_heads"].sort_values("metric", ascending=False).head(5))

# %% [markdown]
# Each further exact sweep costs as much again: the attention layers' and the MLPs' outputs at
# every (layer, position) would be 360 more runs. **Attribution patching** estimates a whole sweep
# from one forward and one backward pass of the corrupted run, to first order (`ioi_circuit.py`
# measures how far that can be trusted). `get_attr_patch_block_every` estimates the residual
# stream, the attention outputs and the MLP outputs at once; its values are changes of the
# normalised metric from the corrupted run (which is 0), so they read like the exact sweep's. Its
# first row estimates the exact sweep above, which says how far to trust the other two:

# %%
results["patch_blocks"] = patching.get_attr_patch_block_every(model, corrupted, pair_cache, norm)  # [3, layer, pos]
agreement = np.corrcoef(results["patch_blocks"][0].ravel(), resid_pre.ravel())[0, 1]
print(f"residual stream: attribution against exact patching, correlation {agreement:.3f}")
for name, sweep in zip(("attention output", "MLP output"), results["patch_blocks"][1:]):
    l, p = np.unravel_index(np.abs(sweep).argmax(), sweep.shape)
    print(f"{name}: largest estimated effect {sweep[l, p]:+.2f}, layer {l}, position {p} ({str_tokens[p]!r})")

# %% [markdown]
# ## 6. Ablation and backup heads
#
# Replace the top name mover's output by its mean over the prompts, and recompute every head's
# direct attribution. On GPT-2 small the logit difference drops less than that head's own
# contribution: other heads (backup name movers) start doing its job. Interpretability has to
# reckon with this self-repair whenever it ablates.

# %%
layer, head = top[0]
hook_name, hook = ablation_hook(model, f"L{layer}H{head}", method="mean")
with model.hooks([(hook_name, hook)]):
    _, ablated_cache = model.run_with_cache(tokens)
after = direct_logit_attribution(model, ablated_cache, tokens, right, wrong, by="head")
change = heads[["component", "attribution"]].merge(after[["component", "attribution"]], on="component",
                                                   suffixes=("_before", "_after"))
change["change"] = change["attribution_after"] - change["attribution_before"]
results["ablation"] = change.sort_values("change", ascending=False).reset_index(drop=True)
print(f"mean-ablating L{layer}H{head}: the heads whose direct effect grows most")
show(results["ablation"].head(5))

# %% [markdown]
# **Takeaways.** A good metric (the logit difference) makes attribution exact and patching
# readable. Direct attribution finds the heads that write the answer; patching finds where the
# deciding information flows; ablation reminds us that components compensate for each other.
# `ioi_circuit.py` goes on to find the whole circuit with gradients and check it exactly.
