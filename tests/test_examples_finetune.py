"""The fine-tuning walkthrough runs, its loss falls, the held-out loss falls, the model then
continues the rhyme as written, the by-hand AdamW step meets the optimizer's, and the saved folder
loads back (in npgpt2, and in transformers in the reference run)."""

import os

import numpy as np
import pytest

import npgpt2
from npgpt2.testing import run_walkthrough

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
FINETUNE = os.path.join(EXAMPLES, "finetune.py")


def test_finetune_walkthrough(tmp_path):
    # gpt2 is not in the tests' cache: the small untrained model
    r = run_walkthrough(FINETUNE, TRAIN_STEPS=40, OUT_DIR=str(tmp_path / "out"), COMPARE_WITH_TRANSFORMERS=False)["results"]
    assert len(r["losses"]) == 40
    assert r["losses"][0] > 10 and r["losses"][-1] < 1.5  # from ln(50257) = 10.8 (knowing nothing)
    assert r["val_before"] > 10 and r["val_after"] < 1.5
    assert r["sample_after"].startswith(" wonder what you are!\nUp above the world")  # the rhyme goes on
    assert r["sample_before"] != r["sample_after"]
    # the second step redone in float64 from torch's formulas, for a decayed matrix and a bias
    assert set(r["by_hand_errors"]) == {"blocks.0.W_in", "ln_final_b"}
    assert max(r["by_hand_errors"].values()) < 1e-4
    # the saved folder, read back from disk, is the fine-tuned model
    assert r["folder"] == str(tmp_path / "out")
    assert sorted(os.listdir(r["folder"])) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert r["reload_error"] == 0.0 and r["reloaded_sample"] == r["sample_after"]
    again = npgpt2.from_pretrained(r["folder"])
    assert again.generate("Twinkle, twinkle, little star,\nHow I", max_new_tokens=24).endswith(r["sample_after"])
    assert r["transformers_error"] is None


@pytest.mark.reference
def test_finetune_walkthrough_saves_what_transformers_loads(tmp_path):
    pytest.importorskip("transformers")
    r = run_walkthrough(FINETUNE, TRAIN_STEPS=10, OUT_DIR=str(tmp_path / "out"))["results"]
    assert r["transformers_error"] is not None and r["transformers_error"] < 1e-5
    assert np.isfinite(r["losses"]).all()
