"""The backpropagation walkthrough runs, its by-hand steps meet the model's gradients, and its
integrated gradients are complete."""

import os

import npgpt2
from npgpt2.testing import run_walkthrough

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_backprop_walkthrough(tiny_dir):
    r = run_walkthrough(os.path.join(EXAMPLES, "backprop.py"), MODEL=npgpt2.from_pretrained(tiny_dir, dtype="float64"))["results"]
    assert set(r["errors"]) == {"resid_post", "mlp_out", "post", "pre", "resid_mid", "z", "pattern", "scores", "q"}
    assert max(r["errors"].values()) <= 1e-12
    assert r["integrated_gradients"].attrs["completeness_error"] <= 0.01
    assert len(r["grad_x_input"]) == 14
