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


def _notebooks_extra() -> set:
    import re
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["notebooks"]
    return {re.split(r"[<>=\[ ]", spec)[0].lower() for spec in extra}


def test_the_notebooks_extra_has_what_the_lessons_and_the_docs_use():
    """This lesson writes Parquet (pyarrow); the docs tell learners to run ``jupyter lab``
    (jupyterlab); tqdm's bars in a notebook need ipywidgets (else every lesson warns)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    docs = " ".join(open(p, encoding="utf-8").read() for p in
                    [os.path.join(root, "README.md")] + [os.path.join(root, "docs", n) for n in os.listdir(os.path.join(root, "docs")) if n.endswith(".md")])
    needed = {"pyarrow", "ipywidgets"} | ({"jupyterlab"} if "jupyter lab" in docs else set())
    assert needed <= _notebooks_extra(), needed - _notebooks_extra()


def test_git_ignores_what_the_lesson_writes():
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    for path in ("examples/dashboards-output/harvest/manifest.json", "dashboards-output/site/index.html"):
        proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=root)
        assert proc.returncode == 0, f"git does not ignore {path}"
