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
# # Sparse autoencoders on GPT-2's residual stream
#
# `superposition.py` showed a model storing more features than it has dimensions, and a sparse
# autoencoder (SAE) recovering them. On GPT-2 we do not know the features in advance: the SAE is
# how we look for them. An SAE maps an activation `x` `[d_in]` to many latents
# `f = ReLU((x - b_dec) W_enc + b_enc)` `[d_sae]`, few of them active at once, and back:
# `x' = f W_dec + b_dec`. Each latent, if the SAE is good, is one interpretable feature.
#
# This lesson asks the three questions one asks of any SAE:
#
# 1. **Is it faithful?** Splice it into the forward pass (replace the activation by its
#    reconstruction) and measure how much of the language-model loss it keeps: *CE loss recovered*.
# 2. **What is active?** The latents that fire on a prompt, position by position.
# 3. **What does one latent mean?** Its strongest activations in a corpus (what it reads), and its
#    direct effect on the logits (what it writes).
#
# With the real `gpt2` and the published SAE `gpt2-small-res-jb` (layer 8's residual stream) in
# the local Hugging Face cache, the lesson loads both. Otherwise it trains an SAE on a small random
# model on the spot, which also shows the training loop (activations streamed from the model,
# Adam, a unit-norm decoder, dead latents resampled).
#
# *Run time: about 25 s on a 2-core machine at GPT-2 small's size (`benchmarks/bench_lessons.py`
# measures every lesson).*

# %% tags=["parameters"]
MODEL = None  # None: gpt2 with the published SAE if both are cached, else a small random model; or a hub name / folder
OUT_DIR = None  # a folder for the pictures, or None
CORPUS = [
    "The cat sat on the mat and looked out of the window.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "def add(a, b):\n    return a + b",
    "The stock market fell sharply on Tuesday after the announcement.",
    "She opened the door, and the dog ran out into the garden.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at 100 degrees Celsius at sea level.",
    "I am not sure what you are saying, but I will listen.",
] * 4
PROMPT = "The cat sat on the mat and looked at the dog."

# %%
import os

import pandas as pd

import npgpt2
from npgpt2 import plot
from npgpt2.display import show
from npgpt2.sae import SAE, active_latents, ce_loss_recovered, latent_logit_effect, top_activating
from npgpt2.testing import pretrained_or_synthetic, synthetic_model
from npgpt2.training.sae import activation_batches, train_sae

if OUT_DIR:
    os.makedirs(OUT_DIR, exist_ok=True)

# %% [markdown]
# ## Loading (or training) an SAE
#
# A published SAE was trained on a particular model *with particular weight processing*: the
# `jb` SAEs on GPT-2 with `center_writing_weights=True`. Loading the model the same way matters,
# since the SAE's input must be the activation it was trained on.

# %%
model = sae = None
if MODEL is None:
    try:
        sae = SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre", local_files_only=True)
        model = npgpt2.from_pretrained("gpt2", local_files_only=True, center_writing_weights=True)
        print("real gpt2 with the published SAE gpt2-small-res-jb / blocks.8.hook_resid_pre")
    except (npgpt2.SAEError, npgpt2.OfflineError):
        print("(gpt2 and the published SAE are not both cached: using a small random model)")
        model = synthetic_model(n_layer=3, center_writing_weights=True)
else:
    model = pretrained_or_synthetic(MODEL)
    if not model.processing["center_writing_weights"]:
        model.process_weights(center_writing_weights=True)
show(model)

# %% [markdown]
# Without a published SAE, train one: `activation_batches` streams the residual stream at a hook
# point from the model over the corpus (shuffled in a buffer), and `train_sae` runs Adam on
# reconstruction error plus an L1 penalty on the latents, keeping the decoder rows at unit norm and
# resampling latents that have stopped firing.

# %%
if sae is None:
    hook = f"blocks.{model.cfg.n_layer - 1}.hook_resid_pre"
    stream = activation_batches(model, CORPUS * 8, hook, batch_size=256, buffer_size=2048, prepend_bos=True)
    sae, log = train_sae(stream, d_sae=8 * model.cfg.d_model, l1_coeff=1e-3, lr=1e-3, resample_every=50,
                         hook_name=hook)
    sae.cfg.update(prepend_bos=True, model_processing={"center_writing_weights": True}, training_log=log.to_dict("list"))
    show(log.tail(3))
    plot.sae_training_curves(log, path=os.path.join(OUT_DIR, "sae_training.png") if OUT_DIR else None);
show(sae)

# %% [markdown]
# ## 1. Is it faithful? CE loss recovered
#
# Three losses on the same texts: the clean model's, the model with the activation replaced by the
# SAE's reconstruction, and the model with the activation zeroed. CE loss recovered is
# `(zero - sae) / (zero - clean)`: 1 means the SAE loses nothing, 0 means it is as bad as deleting
# the activation. Good published SAEs reach 0.9 and more; a low value means the latents below
# describe a different computation from the model's.

# %%
splice = ce_loss_recovered(model, sae, CORPUS[:8])
show(splice)

# %% [markdown]
# ## 2. What is active on a prompt
#
# The top latents at each position, with their activations. A good SAE is sparse: a handful of
# latents per token (its L0), out of thousands.

# %%
active = active_latents(model, sae, PROMPT, k=3)
show(active.head(15))

# %% [markdown]
# ## 3. What one latent means
#
# Take the most active latent. What it **reads**: the contexts in the corpus where it fires most
# (the highlighted token last). What it **writes**: its decoder row, pushed through the
# unembedding, says which next tokens it promotes and suppresses directly.

# %%
latent = int(active.sort_values("activation", ascending=False)["latent"].iloc[0])
top = top_activating(model, sae, CORPUS, latent, k=5)
print(f"latent {latent}: strongest activations in the corpus")
show(top)
effect = latent_logit_effect(model, sae, latent, k=5)
print(f"latent {latent}: direct effect on the logits")
show(effect)
results = {"splice": splice, "active": active, "top": top, "effect": effect, "latent": latent}

# %% [markdown]
# **Takeaways.** Always check faithfulness first: latents of an SAE that loses most of the loss
# explain little. Then read a latent from both ends, its activating contexts and its logit effect;
# when they tell the same story, you have probably found a feature. On the random model the
# contexts are arbitrary, which is what an uninterpretable latent looks like.
