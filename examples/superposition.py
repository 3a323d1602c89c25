"""Toy models of superposition, then a sparse autoencoder that takes one apart.

1. Five features, two dimensions: with dense features the model keeps the two most important,
   orthogonal, and drops the rest; with sparse features it stores all five as a pentagon.
2. Twenty features in five dimensions: the sparser the features, the more of them are stored, and
   the fewer dimensions each gets ("dimensions per feature").
3. Eight sparse features squeezed into four dimensions: an SAE trained on that hidden layer finds
   every one of the eight directions again.

    python examples/superposition.py [--out-dir superposition-output]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

from npgpt2.training.sae import init_sae, train_sae
from npgpt2.training.toy_models import generate_batch, train_toy_models


def main(out_dir: str | None = None, steps: int = 3000) -> dict:
    pd.set_option("display.width", 160)
    print("1. five features in two dimensions")
    five, _ = train_toy_models(5, 2, sparsity=(0.0, 0.7, 0.9), steps=steps, batch=512, restarts=4, seed=0)
    print(pd.DataFrame(five.feature_norms(), index=[f"sparsity {s}" for s in five.sparsity],
                       columns=[f"||W_{i}||" for i in range(5)]).round(2).to_string())
    W = five.W[-1]
    angles = np.sort(np.degrees(np.arctan2(W[1], W[0])) % 360)
    print("   angles between neighbouring features at sparsity 0.9:",
          np.round(np.diff(np.r_[angles, angles[0] + 360])).tolist(), "(a pentagon: 72 each)")

    print("\n2. twenty features in five dimensions")
    twenty, _ = train_toy_models(20, 5, sparsity=(0.0, 0.5, 0.8, 0.9, 0.95, 0.99), steps=steps, batch=512, seed=0)
    print(twenty.table().round(3).to_string(index=False))

    print("\n3. an SAE on the hidden layer of eight sparse features in four dimensions")
    toy, _ = train_toy_models(8, 4, sparsity=(0.95,), importance=np.ones(8), steps=steps, batch=512, restarts=2, seed=0)
    rng = np.random.default_rng(1)

    def hidden():
        while True:
            yield toy.hidden(generate_batch(rng, 1024, 8, toy.sparsity))[:, 0]

    sae, log = train_sae(hidden(), d_sae=16, l1_coeff=3e-2, lr=3e-3, n_steps=5000, resample_every=1000,
                         init=init_sae(4, 16, 0), progress=False)
    features = toy.W[0] / np.linalg.norm(toy.W[0], axis=0)
    cos = sae.W_dec @ features
    print("   best cosine between each true feature and a decoder row:", np.round(cos.max(0), 3).tolist())
    print(f"   final fraction of variance explained {log['fve'].iloc[-1]:.4f}, L0 {log['l0'].iloc[-1]:.2f}")
    if out_dir:
        from npgpt2 import plot

        os.makedirs(out_dir, exist_ok=True)
        plot.toy_model_geometry(five, path=os.path.join(out_dir, "five_in_two.png"))
        plot.toy_model_geometry(twenty, path=os.path.join(out_dir, "twenty_in_five.png"))
        plot.sae_training_curves(log, path=os.path.join(out_dir, "sae_on_toy_training.png"))
        print(f"\npictures written to {out_dir}")
    return {"five": five, "twenty": twenty, "sae_cosines": cos.max(0), "log": log}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir")
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    main(args.out_dir, args.steps)
