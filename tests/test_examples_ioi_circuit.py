"""The IOI circuit walkthrough runs on a small random model, and its numbers are what its parts say."""

import os

import numpy as np

import npgpt2
from npgpt2 import metrics
from npgpt2.analysis.edges import circuit_faithfulness, path_patch
from npgpt2.testing import run_walkthrough

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_ioi_circuit_walkthrough(tiny_dir, tmp_path):
    model = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    ex = run_walkthrough(os.path.join(EXAMPLES, "ioi_circuit.py"), MODEL=model, TOP=20, OUT_DIR=str(tmp_path),
                         IG_STEPS=2)
    clean, corrupted, answers, wrongs = ex["prompts"]()
    assert " Mary" not in corrupted[0] and corrupted[0].count(" Carl") == 1
    r = ex["results"]
    assert len(r["scores"]) == 110 and 0 < len(r["circuit"]) <= 20  # 2 layers x 4 heads: 110 edges
    assert set(r["correlations"]) == {"resid_pre", "attn_head_out_all_pos"}
    assert all(-1 <= c <= 1 for c in r["correlations"].values())
    metric = metrics.logit_diff(answers, wrongs)
    again = circuit_faithfulness(model, model.to_tokens(clean), model.to_tokens(corrupted), r["circuit"], metric)
    np.testing.assert_allclose(r["faithfulness"], again)
    assert r["path_patching"].shape == (2, 4) and np.isfinite(r["path_patching"]).all()
    # the heads checked by path patching are those EAP-IG scores highest into the logits, and each
    # one's share lost is that of its own path patch
    into_logits = r["scores"][(r["scores"]["downstream"] == "logits") & (r["scores"]["upstream"] != "embed")
                              & ~r["scores"]["upstream"].str.startswith("mlp")]
    assert set(r["path_checked"]["head"]) == set(into_logits["upstream"])  # 8 heads, fewer than 12: all
    head = r["path_checked"].iloc[0]
    value = path_patch(model, model.to_tokens(clean), model.to_tokens(corrupted), metric, head["head"], "logits")
    np.testing.assert_allclose(head["share_lost"], (value - r["clean"]) / (r["corrupted"] - r["clean"]), rtol=1e-12)
    assert (tmp_path / "ioi_circuit.png").read_bytes()[:4] == b"\x89PNG"
