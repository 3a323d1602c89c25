"""The corpus walkthrough runs on a small random model and a synthetic corpus, and writes its pages."""

import os

import numpy as np
import pytest

from npgpt2.testing import run_walkthrough

pytest.importorskip("pyarrow", reason="the harvest writes Parquet (pip install -e '.[test]')")
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_dashboards_walkthrough(tmp_path, model):
    r = run_walkthrough(os.path.join(EXAMPLES, "dashboards.py"), MODEL=model, OUT_DIR=str(tmp_path),
                        TOKENS=3000, PAGES=4)["results"]
    h = r["harvest"]
    assert h.manifest["hook"] == f"blocks.{model.cfg.n_layer - 1}.mlp.hook_post"
    assert h.manifest["n_contexts"] == int(np.ceil(3000 / 64))
    assert sorted(os.listdir(r["site"])) == sorted(["index.html"] + list(r["pages"]["page"]))
    assert len(r["pages"]) == 4 and (r["pages"]["max_recomputed_error"] <= 1e-5).all()
    # the neuron it quotes is the one with the largest activation, and its first top value is that max
    top = h.top[h.top["feature"] == r["neuron"]]
    assert top["value"].iloc[0] == h.features["max"].max()
    # the two splits it compares were both harvested, and agree table for table
    assert r["same_split"] == {"features": True, "top": True, "examples": True, "histogram": True}
