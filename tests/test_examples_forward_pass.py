"""The forward-pass walkthrough recomputes every activation of block 0 (and the residual stream
after every block, and the logits) by hand in NumPy; each matches the model's own cache."""

import os

import npgpt2
from npgpt2.testing import run_walkthrough

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_forward_pass_walkthrough(tiny_dir):
    model = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    ex = run_walkthrough(os.path.join(EXAMPLES, "forward_pass.py"), MODEL=model)
    block0 = {"hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale", "blocks.0.ln1.hook_normalized",
              "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_attn_scores",
              "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid",
              "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"}
    later = {f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layer)}
    assert set(ex["checks"]) == block0 | later
    assert max(ex["checks"].values()) <= 1e-12
    assert abs(ex["loss"] - model.loss(model.to_tokens(ex["PROMPT"]))) <= 1e-12
    assert abs(ex["my_logits"] - ex["logits"]).max() <= 1e-12
