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
# # Attribution and circuits: finding the IOI circuit with gradients, then checking it exactly
#
# `ioi.py` found heads that matter for indirect object identification one sweep at a time. Exact
# activation patching costs one forward pass per patched activation; for every *edge* between
# components (32,491 in GPT-2 small) that is far too many. Gradients estimate them all at once:
#
# 1. **Attribution patching** (Nanda 2023): the effect of patching an activation, to first order,
#    is `(clean - corrupted) * d metric / d activation`, all from one forward and one backward
#    pass. We set it beside the exact sweeps and measure how well they agree.
# 2. **EAP-IG** (Hanna et al. 2024) scores every edge of the computational graph (embeddings and
#    each head's and MLP's output, into every later head's query, key and value inputs, MLP input
#    and the logits) the same way, with integrated gradients for accuracy. The top edges, pruned
#    to those that still reach the logits, form a **circuit**.
# 3. The circuit is then evaluated **exactly**: run the model with every edge outside the circuit
#    carrying its corrupted value. **Faithfulness** 1 means the circuit alone restores the clean
#    behaviour.
# 4. **Path patching** each head's direct path into the logits (Wang et al. 2022) finds the name
#    movers.
#
# The clean prompts are the IOI set; the corrupted ones put three new names in the three places
# ("When Alice and Bob went to the shops, Carl gave the bag to"), so there is no name to copy.
#
# *Run time: about 40 s on a 2-core machine at GPT-2 small's size (`benchmarks/bench_lessons.py`
# measures every lesson).*

# %% tags=["parameters"]
MODEL = "gpt2"  # a hub name or a local folder; a small random model stands in when it is not cached
TOP = 60  # edges kept before pruning
IG_STEPS = 5  # integrated-gradient steps of EAP-IG
OUT_DIR = None  # a folder for the circuit's picture, or None

# %%
import os

import numpy as np
import pandas as pd

from npgpt2 import metrics, plot
from npgpt2.analysis import patching
from npgpt2.analysis.edges import circuit_faithfulness, edge_attribution, greedy_circuit, path_patch_heads
from npgpt2.display import show
from npgpt2.prompts import ioi_corrupted, ioi_prompts
from npgpt2.testing import pretrained_or_synthetic

model = pretrained_or_synthetic(MODEL)
if OUT_DIR:
    os.makedirs(OUT_DIR, exist_ok=True)
show(model)


def prompts():
    """(clean prompts, corrupted prompts, answers, wrong names): the IOI set and its corruption."""
    clean, answers = ioi_prompts()
    return clean, ioi_corrupted(clean, answers), [a for a, _ in answers], [w for _, w in answers]


clean_text, corrupted_text, answers, wrongs = prompts()
clean, corrupted = model.to_tokens(clean_text), model.to_tokens(corrupted_text)
if clean.shape != corrupted.shape:
    raise ValueError("the corrupted names must be single tokens, as the clean ones are")
show(pd.DataFrame({"clean": clean_text, "corrupted": corrupted_text}).head(4))

# %% [markdown]
# The metric is the logit difference between the right and the wrong name, as a *differentiable*
# metric (`metrics.logit_diff` has a `grad`), so the backward pass can start from it.

# %%
metric = metrics.logit_diff(answers, wrongs)
clean_value, corrupted_value = metric(model(clean)), metric(model(corrupted))
print(f"logit difference: clean {clean_value:.3f}, corrupted {corrupted_value:.3f}")

# %% [markdown]
# ## 1. Attribution patching against exact patching
#
# For two sweeps, the residual stream at every (layer, position) and every head's output, the
# estimate from one backward pass beside the exact patch. On GPT-2 small the residual-stream
# estimate is good in most layers; the first-order approximation is worst where the clean and
# corrupted activations differ most (the embeddings of the changed names).
#
# The exact sweeps cost a forward pass per patch, 12 x 15 = 180 and 12 x 12 = 144 runs on GPT-2
# small; to keep the lesson to about a minute they run on the first two prompts (a template in
# both name orders) rather than all eight. The estimate is compared on the same two.

# %%
few = slice(0, 2)
_, clean_cache = model.run_with_cache(clean[few])
few_metric = metrics.logit_diff(answers[few], wrongs[few])
correlations = {}
for sweep in ("resid_pre", "attn_head_out_all_pos"):
    df = patching.attribution_vs_exact(model, corrupted[few], clean_cache, few_metric, sweep)
    correlations[sweep] = df.attrs["correlation"]
    print(f"{sweep}: correlation between attribution and exact patching {df.attrs['correlation']:.3f}")
show(df.head(8))

# %% [markdown]
# ## 2. Edge attribution and a circuit
#
# EAP-IG scores each edge by the change in the metric its corruption would cause, to first order,
# integrating the gradient over `IG_STEPS` points between the corrupted and the clean run.
# `greedy_circuit` keeps the `TOP` edges by absolute score and prunes any that no longer connect
# to the logits.

# %%
scores = edge_attribution(model, clean, corrupted, metric, method="eap-ig", ig_steps=IG_STEPS)
circuit = greedy_circuit(scores, TOP)
print(f"EAP-IG over {len(scores):,} edges; the top {TOP}, pruned to {len(circuit)} that reach the logits:")
show(circuit.head(15))

# %% [markdown]
# ## 3. The circuit, exactly
#
# Attribution is an estimate. `circuit_faithfulness` runs the model with every edge *outside* the
# circuit patched to its corrupted value, and reports where the metric lands between the corrupted
# run (0) and the clean run (1).

# %%
faithfulness = circuit_faithfulness(model, clean, corrupted, circuit, metric)
print(f"faithfulness of the circuit (every other edge corrupted): {faithfulness:.3f}")
plot.circuit(circuit, path=os.path.join(OUT_DIR, "ioi_circuit.png") if OUT_DIR else None, n_head=model.cfg.n_head,
             n_layer=model.cfg.n_layer, title=f"{model.name} · IOI, EAP-IG top {len(circuit)} edges, faithfulness {faithfulness:.2f}");

# %% [markdown]
# ## 4. Path patching into the logits
#
# For a head, corrupt only its *direct* path to the logits (everything else clean) and measure
# the share of the logit difference lost. The name movers (9.9, 9.6, 10.0 on GPT-2 small) lose the
# most; negative name movers (10.7, 11.10) show up with the opposite sign.
#
# Each head's path costs a forward pass. Rather than all 144 heads, we check the 12 whose edge
# into the logits EAP-IG scored highest (in absolute value): attribution proposes, exact patching
# checks. (`path_patch_heads` without `heads=` sweeps every head.)

# %%
into_logits = scores[(scores["downstream"] == "logits") & scores["upstream"].str.match(r"L\d+H\d+$")]
candidates = into_logits.reindex(into_logits["score"].abs().sort_values(ascending=False).index).head(12)
direct = path_patch_heads(model, clean, corrupted, metric, "logits",
                          heads=list(candidates["upstream"]))  # [layer, head], NaN for the heads not checked
effect = (direct - clean_value) / (corrupted_value - clean_value)  # 1 = all of the behaviour lost
checked = pd.DataFrame({"head": candidates["upstream"].to_numpy(), "eap_ig_score": candidates["score"].to_numpy()})
checked["share_lost"] = [effect[l, h] for l, h in (map(int, name[1:].split("H")) for name in checked["head"])]
print("the heads EAP-IG ranks highest into the logits, and the share of the logit difference lost when only "
      "their direct path is corrupted:")
show(checked.sort_values("share_lost", key=np.abs, ascending=False).head(8))
results = {"clean": clean_value, "corrupted": corrupted_value, "correlations": correlations, "scores": scores,
           "circuit": circuit, "faithfulness": faithfulness, "path_patching": direct, "path_checked": checked}

# %% [markdown]
# **Takeaways.** Gradients make it affordable to score every edge; exact patching of the chosen
# circuit keeps the result honest. Report both: a circuit found by attribution and not checked
# exactly is a hypothesis, not a finding.
