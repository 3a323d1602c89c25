"""The fine-tuning example runs, its loss falls, the held-out loss falls, and the model then
continues the rhyme as written."""

import os
import runpy

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_finetune_example():
    ex = runpy.run_path(os.path.join(EXAMPLES, "finetune.py"))
    r = ex["main"](steps=40)  # gpt2 is not in the tests' cache: the small untrained model
    assert len(r["losses"]) == 40
    assert r["losses"][0] > 10 and r["losses"][-1] < 1.5  # from ln(50257) = 10.8 (knowing nothing)
    assert r["val_before"] > 10 and r["val_after"] < 1.5
    assert r["sample_after"].startswith(" wonder what you are!\nUp above the world")  # the rhyme goes on
    assert r["sample_before"] != r["sample_after"]
