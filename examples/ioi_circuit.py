"""Finding the indirect-object-identification circuit with edge attribution, then checking it exactly.

The clean prompts are the IOI prompts of examples/ioi.py ("When John and Mary went to the shops,
John gave the bag to" -> " Mary"); the corrupted ones put three different names in the three places
("When Alice and Bob went to the shops, Carl gave the bag to"), so there is no name to copy. The metric is the logit difference between the right and
the wrong name.

1. Attribution patching: every residual-stream and head sweep estimated from one corrupted forward
   and backward pass, next to the exact sweep, with their correlation.
2. EAP-IG scores all 32,491 edges (gpt2-small); the top edges, pruned to those that reach the
   logits, form a circuit.
3. The circuit is evaluated exactly: every edge outside it carries its corrupted value
   (``patch_edges``); faithfulness 1 means it restores the clean logit difference.
4. Path patching of each head into the logits: the direct effect the name movers are known for.

Runs on the real gpt2 when it is cached (the name movers 9.9, 9.6, 10.0 show up in step 4), else on
a small random model (the same steps, noise in the results).

    python examples/ioi_circuit.py [--model gpt2] [--top 60] [--out-dir ioi-circuit-output]
"""

from __future__ import annotations

import argparse
import os
import runpy

import numpy as np

from npgpt2 import metrics, plot
from npgpt2.analysis import patching
from npgpt2.analysis.edges import circuit_faithfulness, edge_attribution, greedy_circuit, path_patch_heads
from npgpt2.testing import pretrained_or_synthetic

CORRUPT_NAMES = (" Alice", " Bob", " Carl")


def prompts():
    """(clean prompts, corrupted prompts, answers, wrong names): the IOI set and its corruption."""
    ioi = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ioi.py"))
    clean, answers = ioi["ioi_prompts"]()
    corrupted = []  # "When Alice and Bob went to the shops, Carl gave the bag to": no name to copy
    for text, (answer, subject) in zip(clean, answers):
        text = text.replace(answer, CORRUPT_NAMES[0]).replace(subject, CORRUPT_NAMES[1], 1)
        corrupted.append(text.replace(subject, CORRUPT_NAMES[2], 1))
    return clean, corrupted, [a for a, _ in answers], [w for _, w in answers]


def main(model=None, top: int = 60, out_dir: str | None = None, ig_steps: int = 5) -> dict:
    model = model if model is not None else pretrained_or_synthetic()
    clean_text, corrupted_text, answers, wrongs = prompts()
    clean, corrupted = model.to_tokens(clean_text), model.to_tokens(corrupted_text)
    if clean.shape != corrupted.shape:
        raise ValueError("the corrupted names must be single tokens, as the clean ones are")
    metric = metrics.logit_diff(answers, wrongs)
    clean_value, corrupted_value = metric(model(clean)), metric(model(corrupted))
    print(f"logit difference: clean {clean_value:.3f}, corrupted {corrupted_value:.3f}\n")

    # 1. attribution patching against exact patching
    _, clean_cache = model.run_with_cache(clean)
    correlations = {}
    for sweep in ("resid_pre", "attn_head_out_all_pos"):
        df = patching.attribution_vs_exact(model, corrupted, clean_cache, metric, sweep, progress=False)
        correlations[sweep] = df.attrs["correlation"]
        print(f"attribution vs exact patching, {sweep}: correlation {df.attrs['correlation']:.3f}")

    # 2. edge attribution, and a circuit from its top edges
    scores = edge_attribution(model, clean, corrupted, metric, method="eap-ig", ig_steps=ig_steps)
    circuit = greedy_circuit(scores, top)
    print(f"\nEAP-IG over {len(scores):,} edges; the top {top}, pruned to {len(circuit)} that reach the logits:")
    print(circuit.head(15).to_string(index=False, float_format=lambda v: f"{v:8.4f}"))

    # 3. the circuit, exactly
    faithfulness = circuit_faithfulness(model, clean, corrupted, circuit, metric)
    print(f"\nfaithfulness of the circuit (every other edge corrupted): {faithfulness:.3f}")

    # 4. path patching each head into the logits
    direct = path_patch_heads(model, clean, corrupted, metric, "logits", progress=False)
    effect = (direct - clean_value) / (corrupted_value - clean_value)  # 1 = all of the behaviour lost
    order = np.dstack(np.unravel_index(np.argsort(-np.abs(effect), axis=None), effect.shape))[0][:5]
    print("\nheads whose direct path to the logits matters most (share of the logit difference lost "
          "when only it is corrupted):")
    for l, h in order:
        print(f"  L{l}H{h}: {effect[l, h]:+.3f}")

    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        plot.circuit(circuit, path=os.path.join(out_dir, "ioi_circuit.png"), n_head=model.cfg.n_head,
                     title=f"IOI, EAP-IG top {len(circuit)} edges, faithfulness {faithfulness:.2f}")
    return {"clean": clean_value, "corrupted": corrupted_value, "correlations": correlations, "scores": scores,
            "circuit": circuit, "faithfulness": faithfulness, "path_patching": direct}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--out-dir", default="ioi-circuit-output")
    args = ap.parse_args()
    main(pretrained_or_synthetic(args.model), top=args.top, out_dir=args.out_dir)
