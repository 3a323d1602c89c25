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
# # Toy models of superposition, and a sparse autoencoder that takes one apart
#
# A model with *d* dimensions can hold *d* features at right angles, one per direction, without
# interference. Elhage et al. (2022, "Toy Models of Superposition") showed that it can hold **more**
# when the features are sparse (rarely active at once): it packs them at angles to each other and
# accepts a little interference when two happen to fire together. That is **superposition**, and
# it is why single neurons in real models are so often polysemantic.
#
# The toy model: `n` features `x` (each active with probability `1 - sparsity`), squeezed into
# `d < n` dimensions `h = W x` and read back with `x' = ReLU(W^T h + b)`, trained to reconstruct
# `x` with the loss weighted by each feature's importance. Three experiments:
#
# 1. five features in two dimensions, from dense to sparse,
# 2. twenty features in five dimensions, counting how many get stored,
# 3. a sparse autoencoder trained on the hidden layer recovers the features the toy model
#    superposed, which is the idea behind using SAEs on real models (`sae.py`).
#
# Everything trains here in seconds, with gradients written by hand in NumPy.
#
# *Run time: about 30 s on a 2-core machine (`benchmarks/bench_lessons.py` measures every lesson).*

# %% tags=["parameters"]
STEPS = 3000  # training steps of each toy model
SAE_STEPS = 5000  # training steps of the sparse autoencoder in part 3
OUT_DIR = None  # a folder for the pictures, or None

# %%
import os

import numpy as np
import pandas as pd

from npgpt2 import plot
from npgpt2.display import show
from npgpt2.training.sae import init_sae, train_sae
from npgpt2.training.toy_models import generate_batch, train_toy_models

if OUT_DIR:
    os.makedirs(OUT_DIR, exist_ok=True)

# %% [markdown]
# ## 1. Five features in two dimensions
#
# Three instances trained side by side, at sparsity 0, 0.7 and 0.9, with importance falling from
# the first feature to the last. Dense features interfere all the time, so the model keeps the
# two most important ones, orthogonal, and drops the rest (a norm near 0). Sparse features rarely
# collide, and the model stores all five, as a **pentagon**.

# %%
five, _ = train_toy_models(5, 2, sparsity=(0.0, 0.7, 0.9), steps=STEPS, batch=512, restarts=4, seed=0, progress=True)
show(pd.DataFrame(five.feature_norms(), index=[f"sparsity {s}" for s in five.sparsity],
                  columns=[f"||W_{i}||" for i in range(5)]).round(2))
W = five.W[-1]  # [2, 5] at sparsity 0.9
angles = np.sort(np.degrees(np.arctan2(W[1], W[0])) % 360)
print("angles between neighbouring features at sparsity 0.9:",
      np.round(np.diff(np.r_[angles, angles[0] + 360])).tolist(), "(a pentagon: 72 each)")

# %% [markdown]
# Each feature's direction in the 2-D hidden space (top) and `W^T W` (bottom), whose off-diagonal
# entries are the interference between features: zero for the dense instance's two kept features,
# negative between neighbours in the pentagon.

# %%
plot.toy_model_geometry(five, path=os.path.join(OUT_DIR, "five_in_two.png") if OUT_DIR else None);

# %% [markdown]
# ## 2. Twenty features in five dimensions
#
# The same experiment, bigger, across six sparsities. `table()` counts the features stored
# (norm above 0.5) and their **dimensions per feature** `d / ||W||_F^2`: 1 when every stored
# feature has a dimension of its own, 0.5 for antipodal pairs, 0.4 for pentagons. The sparser the
# features, the more are stored and the fewer dimensions each gets.

# %%
twenty, _ = train_toy_models(20, 5, sparsity=(0.0, 0.5, 0.8, 0.9, 0.95, 0.99), steps=STEPS, batch=512, seed=0,
                             progress=True)
show(twenty.table().round(3))
plot.toy_model_geometry(twenty, path=os.path.join(OUT_DIR, "twenty_in_five.png") if OUT_DIR else None);

# %% [markdown]
# ## 3. An SAE finds the superposed features again
#
# Eight equally important sparse features squeezed into four dimensions. Looking at the hidden
# layer alone, the eight directions are not visible: four dimensions, eight features at odd
# angles. A **sparse autoencoder** (an encoder to 16 latents, a ReLU, a decoder back to four
# dimensions, with an L1 penalty on the latents) is trained on those hidden activations only.
# If it works, some of its decoder rows point along the toy model's eight feature directions.

# %%
toy, _ = train_toy_models(8, 4, sparsity=(0.95,), importance=np.ones(8), steps=STEPS, batch=512, restarts=2, seed=0,
                          progress=True)
rng = np.random.default_rng(1)


def hidden():
    """An endless stream of the toy model's hidden activations on fresh random sparse inputs."""
    while True:
        yield toy.hidden(generate_batch(rng, 1024, 8, toy.sparsity))[:, 0]


sae, log = train_sae(hidden(), d_sae=16, l1_coeff=3e-2, lr=3e-3, n_steps=SAE_STEPS, resample_every=1000,
                     init=init_sae(4, 16, 0))
features = toy.W[0] / np.linalg.norm(toy.W[0], axis=0)  # [4, 8] unit feature directions
cos = sae.W_dec @ features  # [16 latents, 8 features]
print("best cosine between each true feature and a decoder row:", np.round(cos.max(0), 3).tolist())
print(f"fraction of variance explained {log['fve'].iloc[-1]:.4f}, L0 (active latents per input) {log['l0'].iloc[-1]:.2f}")
show(sae)

# %%
plot.sae_training_curves(log, path=os.path.join(OUT_DIR, "sae_on_toy_training.png") if OUT_DIR else None);
results = {"five": five, "twenty": twenty, "sae_cosines": cos.max(0), "log": log}

# %% [markdown]
# **Takeaways.** Sparsity lets a model store more features than it has dimensions, at the price of
# interference; the geometry (pairs, pentagons) is what gradient descent finds. An SAE trained on
# the activations alone can undo the packing, finding one latent per feature. `sae.py` does the
# same on GPT-2's residual stream, where we do not know the features in advance.
