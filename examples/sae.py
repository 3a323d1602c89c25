"""Sparse autoencoders on GPT-2's residual stream.

With the real gpt2 and the published SAE ``gpt2-small-res-jb`` / ``blocks.8.hook_resid_pre`` in the
local Hugging Face cache: load both (the model with center_writing_weights=True, as the SAE was
trained), measure how much of the loss the SAE's reconstruction keeps (CE loss recovered), list the
latents active on a prompt, and for the most active one its top activating contexts in a small
corpus and its direct effect on the logits.

Otherwise (nothing to download here) the same steps run on a small random model with an SAE
trained on the spot, which also shows the training loop: activations streamed from the model,
Adam, a unit-norm decoder, dead-latent resampling.

    python examples/sae.py [--out-dir sae-output]
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

import npgpt2
from npgpt2.sae import SAE, active_latents, ce_loss_recovered, latent_logit_effect, top_activating
from npgpt2.training.sae import activation_batches, train_sae
from npgpt2.testing import synthetic_model

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


def load(model=None, sae=None):
    if model is not None and sae is not None:
        return model, sae
    try:
        sae = SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre", local_files_only=True)
        model = npgpt2.from_pretrained("gpt2", local_files_only=True, center_writing_weights=True)
        print("real gpt2 with the published SAE gpt2-small-res-jb / blocks.8.hook_resid_pre\n")
        return model, sae
    except (npgpt2.SAEError, npgpt2.OfflineError):
        pass
    print("(gpt2 and the published SAE are not both cached: using a small random model)\n")
    if model is None:
        model = synthetic_model(n_layer=3, center_writing_weights=True)
    elif not model.processing["center_writing_weights"]:
        model.process_weights(center_writing_weights=True)
    hook = f"blocks.{model.cfg.n_layer - 1}.hook_resid_pre"
    print(f"training an SAE on {hook} of the small model ...")
    stream = activation_batches(model, CORPUS * 8, hook, batch_size=256, buffer_size=2048, prepend_bos=True)
    sae, log = train_sae(stream, d_sae=8 * model.cfg.d_model, l1_coeff=1e-3, lr=1e-3, resample_every=50,
                         hook_name=hook, progress=False)
    sae.cfg.update(prepend_bos=True, model_processing={"center_writing_weights": True}, training_log=log.to_dict("list"))
    print(log.tail(3).round(4).to_string(index=False), "\n")
    return model, sae


def main(model=None, sae=None, out_dir: str | None = None) -> dict:
    pd.set_option("display.width", 160)
    model, sae = load(model, sae)
    splice = ce_loss_recovered(model, sae, CORPUS[:8])
    print("splicing the SAE into the forward pass:")
    print(splice.round(4).to_string(index=False))
    active = active_latents(model, sae, PROMPT, k=3)
    print(f"\nlatents active on {PROMPT!r} (top 3 per position):")
    print(active.head(15).round(3).to_string(index=False))
    latent = int(active.sort_values("activation", ascending=False)["latent"].iloc[0])
    top = top_activating(model, sae, CORPUS, latent, k=5)
    print(f"\nlatent {latent}: strongest activations in the corpus")
    print(top.round(3).to_string(index=False))
    effect = latent_logit_effect(model, sae, latent, k=5)
    print(f"\nlatent {latent}: direct effect on the logits")
    print(effect.round(3).to_string(index=False))
    if out_dir and "training_log" in sae.cfg:
        from npgpt2 import plot

        os.makedirs(out_dir, exist_ok=True)
        plot.sae_training_curves(pd.DataFrame(sae.cfg["training_log"]), path=os.path.join(out_dir, "sae_training.png"))
        print(f"\ntraining curves written to {out_dir}")
    return {"splice": splice, "active": active, "top": top, "effect": effect, "latent": latent}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir")
    args = ap.parse_args()
    main(out_dir=args.out_dir)
