"""Indirect object identification (IOI) on GPT-2 small, end to end, in NumPy.

"When John and Mary went to the shops, John gave the bag to" -> " Mary". The analysis of
TransformerLens's Exploratory Analysis Demo: logit difference, logit lens of the logit difference,
direct logit attribution by layer and by head, attention patterns of the top heads, activation
patching of the residual stream, layers and heads, and ablation of the top name mover.

Runs on the real gpt2 when it is in the local Hugging Face cache (then the famous heads show up:
name movers 9.9, 9.6, 10.0 ...), and on a small random model otherwise (the same tables, noise in
them).

    python examples/ioi.py [--model gpt2] [--out-dir ioi-output]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

import npgpt2
from npgpt2.analysis import patching
from npgpt2.analysis import direct_logit_attribution
from npgpt2.analysis.ablation import ablation_hook
from npgpt2.testing import pretrained_or_synthetic

PROMPT_FORMATS = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
]
NAMES = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]


def ioi_prompts():
    """The eight prompts (each template with the name order swapped) and their (answer, wrong) names."""
    prompts, answers = [], []
    for fmt, pair in zip(PROMPT_FORMATS, NAMES):
        for j in range(2):
            answer, subject = pair[j], pair[1 - j]
            prompts.append(fmt.format(subject))
            answers.append((answer, subject))
    return prompts, answers




def main(model: npgpt2.GPT2 | None = None, out_dir: str | None = None) -> dict:
    model = model if model is not None else pretrained_or_synthetic()
    pd.set_option("display.width", 200)
    prompts, answers = ioi_prompts()
    tokens = model.to_tokens(prompts)  # [8, 14]: every prompt has the same number of tokens
    right = np.array([model.to_single_token(a) for a, _ in answers])
    wrong = np.array([model.to_single_token(w) for _, w in answers])
    results = {}

    # 1. Logit difference: how much more the model expects the indirect object than the subject.
    logits, cache = model.run_with_cache(tokens)
    metric = patching.logit_diff_metric(right, wrong)
    last = logits[:, -1]
    per_prompt = last[np.arange(8), right] - last[np.arange(8), wrong]
    results["logit_diff"] = pd.DataFrame({"prompt": prompts, "answer": [a for a, _ in answers],
                                          "wrong": [w for _, w in answers], "logit_diff": per_prompt})
    print("1. logit difference per prompt (mean %.3f)" % per_prompt.mean())
    print(results["logit_diff"].round(3).to_string(index=False))

    # 2. Logit lens of the logit difference: the residual stream after each layer (and between
    # attention and MLP), at the last position, put through the final layer norm and projected on
    # the unembedding difference W_U[:, answer] - W_U[:, wrong]. After the last layer this is the
    # model's own logit difference.
    resid, labels = cache.accumulated_resid(pos_slice=-1, incl_mid=True, apply_ln=True, return_labels=True)
    direction = model.tokens_to_residual_directions(right) - model.tokens_to_residual_directions(wrong)
    lens = np.einsum("cbd,bd->cb", resid, direction) + (model.b_U[right] - model.b_U[wrong])
    results["lens"] = pd.DataFrame({"layer": labels, "logit_diff": lens.mean(1)})
    print("\n2. logit lens of the logit difference (mean over prompts)")
    print(results["lens"].round(3).to_string(index=False))

    # 3. Direct logit attribution by layer and by head.
    results["dla_layer"] = direct_logit_attribution(model, cache, tokens, right, wrong, by="layer")
    results["dla_head"] = direct_logit_attribution(model, cache, tokens, right, wrong, by="head")
    heads = results["dla_head"][results["dla_head"]["type"] == "head"]
    print("\n3. direct logit attribution: layers, then the top and bottom heads")
    print(results["dla_layer"][["component", "attribution"]].round(3).to_string(index=False))
    print(pd.concat([heads.head(5), heads.tail(3)])[["component", "attribution"]].round(3).to_string(index=False))

    # 4. Attention patterns of the top heads (positive and negative), on the first prompt.
    top = [(int(r.layer), int(r.head)) for r in pd.concat([heads.head(3), heads.tail(1)]).itertuples()]
    results["top_heads"] = top
    if out_dir:
        from npgpt2 import plot

        os.makedirs(out_dir, exist_ok=True)
        str_tokens = model.to_str_tokens(tokens[0])
        plot.attention_patterns(cache, str_tokens, top, path=os.path.join(out_dir, "top_heads.png"))
        plot.attribution_heatmap(results["dla_head"], path=os.path.join(out_dir, "dla_heads.png"))
        for layer in sorted({l for l, _ in top}):
            plot.attention_html(cache["pattern", layer][0], str_tokens, layer,
                                path=os.path.join(out_dir, f"attention_layer{layer}.html"))
        print(f"\n4. attention patterns of {top} written to {out_dir}")

    # 5. Activation patching, clean -> corrupted (the prompts with the other name order), with the
    # metric normalised so that 0 is the corrupted run and 1 the clean run.
    corrupted = tokens[[i + 1 if i % 2 == 0 else i - 1 for i in range(8)]]
    corrupted_value = metric(model(corrupted))
    norm = patching.normalized_metric(metric, metric(logits), corrupted_value)
    str_tokens = model.to_str_tokens(tokens[0])
    resid_pre = patching.get_act_patch_resid_pre(model, corrupted, cache, norm)
    blocks = patching.get_act_patch_block_every(model, corrupted, cache, norm)
    head_out = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, norm)
    results["patch_resid_pre"] = patching.patching_frame(resid_pre, ("layer", "pos"), str_tokens)
    results["patch_blocks"] = blocks
    results["patch_heads"] = patching.patching_frame(head_out, ("layer", "head"))
    print("\n5. patching the residual stream (rows: layer, columns: position), normalised metric")
    print(pd.DataFrame(resid_pre, columns=[f"{i}:{t.strip()}" for i, t in enumerate(str_tokens)]).round(2).to_string())
    print("   heads with the largest effect when patched over all positions:")
    print(results["patch_heads"].sort_values("metric", ascending=False).head(5).round(3).to_string(index=False))

    # 6. Ablate the top name mover (mean over the prompts) and see how the other heads' direct
    # attributions change: backup heads take over part of its job on the real model.
    layer, head = top[0]
    hook_name, hook = ablation_hook(model, f"L{layer}H{head}", method="mean")
    with model.hooks([(hook_name, hook)]):
        _, ablated_cache = model.run_with_cache(tokens)
    after = direct_logit_attribution(model, ablated_cache, tokens, right, wrong, by="head")
    change = heads[["component", "attribution"]].merge(
        after[["component", "attribution"]], on="component", suffixes=("_before", "_after"))
    change["change"] = change["attribution_after"] - change["attribution_before"]
    results["ablation"] = change.sort_values("change", ascending=False).reset_index(drop=True)
    print(f"\n6. mean-ablating L{layer}H{head}: the heads whose direct effect grows most")
    print(results["ablation"].head(5).round(3).to_string(index=False))
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--out-dir", help="write pictures and the attention HTML pages here (needs matplotlib)")
    args = ap.parse_args()
    main(pretrained_or_synthetic(args.model), args.out_dir)
