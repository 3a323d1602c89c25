"""The superposition and SAE walkthroughs run (on synthetic models) and their pictures render."""

import os

import numpy as np

from npgpt2.testing import run_walkthrough

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_superposition_walkthrough(tmp_path):
    r = run_walkthrough(os.path.join(EXAMPLES, "superposition.py"), OUT_DIR=str(tmp_path), STEPS=2000)["results"]
    assert r["five"].n_represented().tolist()[0] == 2 and r["five"].n_represented().tolist()[-1] == 5
    assert r["sae_cosines"].min() > 0.95
    for name in ("five_in_two.png", "twenty_in_five.png", "sae_on_toy_training.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_sae_walkthrough_on_a_synthetic_model(tmp_path):
    r = run_walkthrough(os.path.join(EXAMPLES, "sae.py"), OUT_DIR=str(tmp_path))["results"]
    assert set(r["splice"].columns) == {"hook", "clean_loss", "sae_loss", "zero_ablation_loss", "ce_loss_recovered"}
    assert len(r["top"]) > 0 and (r["top"]["activation"] > 0).all()
    assert not r["top"]["context"].str.endswith("<|endoftext|>").any()  # padding is not context
    assert np.isfinite(r["effect"]["logit_effect"]).all()
    assert (tmp_path / "sae_training.png").exists()
