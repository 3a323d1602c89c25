"""Every walkthrough in examples/ runs top to bottom as a Jupyter notebook: jupytext turns the
percent-format script into a notebook, the parameters cell gets a small synthetic model (as
papermill would inject them), and nbclient executes it in an ipykernel kernel. Needs the
``notebooks`` extra (jupytext, nbclient, ipykernel); run with ``python -m pytest -q -m notebooks``
(CI does)."""

import glob
import os

import pytest

from npgpt2.testing import run_walkthrough_notebook, walkthrough_parameters

pytestmark = pytest.mark.notebooks
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALKTHROUGHS = sorted(p for p in glob.glob(os.path.join(ROOT, "examples", "*.py"))
                      if not os.path.basename(p).startswith("_") and "\n# %%" in open(p, encoding="utf-8").read())
# Small settings so that each notebook runs in seconds on the synthetic model
FAST = {"STEPS": 300, "SAE_STEPS": 300, "SEQ_LEN": 20, "TOP": 20, "IG_STEPS": 2, "IG_STEPS_SALIENCY": 16,
        "TOKENS": 3000, "PAGES": 4}


def outputs(nb, kind):
    """Every output of the executed notebook carrying the MIME type ``kind``."""
    return [o["data"][kind] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind in o.get("data", {})]


@pytest.fixture
def kernel_env(monkeypatch):
    # the kernel imports this checkout's npgpt2 (not another installed copy) and inherits the
    # tests' offline Hugging Face cache from the environment
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def test_there_are_walkthroughs():
    names = {os.path.basename(p) for p in WALKTHROUGHS}
    assert {"token_tables.py", "forward_pass.py", "ioi.py", "induction.py", "superposition.py", "sae.py",
            "backprop.py", "ioi_circuit.py", "induction_circuit.py", "dashboards.py", "finetune.py"} <= names


@pytest.mark.parametrize("path", WALKTHROUGHS, ids=os.path.basename)
def test_walkthrough_runs_as_a_notebook(path, tiny_dir, tmp_path, kernel_env):
    known = walkthrough_parameters(path) if '# %% tags=["parameters"]' in open(path, encoding="utf-8").read() else {}
    wanted = {"MODEL": str(tiny_dir), "OUT_DIR": str(tmp_path / "out"), **FAST}
    nb = run_walkthrough_notebook(path, {k: v for k, v in wanted.items() if k in known}, tmp_path)
    prose = [c for c in nb.cells if c.cell_type == "markdown"]
    assert len(prose) >= 4 and sum(len(c.source) for c in prose) > 1500  # a lesson, not only code
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "error"]
    name = os.path.basename(path)
    if "MODEL" in known:
        # the model introduces itself with its HTML table, naming the synthetic checkpoint's folder
        assert any(f"GPT2 {tiny_dir}" in h for h in outputs(nb, "text/html")), name
    if name == "ioi.py":
        assert any("npgpt2-attn" in h for h in outputs(nb, "text/html"))  # the attention view, inline
    if name == "dashboards.py":  # the harvest shows itself as its table, with the hook it read
        assert any("Harvest of blocks.1.mlp.hook_post" in h for h in outputs(nb, "text/html"))
    if name in ("token_tables.py", "ioi.py", "induction.py", "superposition.py"):
        assert outputs(nb, "image/png"), f"{name} drew no figure inline"


def test_parameters_go_after_the_parameters_cell_and_need_one(tmp_path):
    from npgpt2.testing import walkthrough_notebook

    nb = walkthrough_notebook(os.path.join(ROOT, "examples", "induction.py"), {"SEQ_LEN": 7})
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    marker = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert "injected-parameters" in tags[marker + 1] and nb.cells[marker + 1].source == "SEQ_LEN = 7"
    plain = tmp_path / "plain.py"
    plain.write_text("# %%\nx = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no parameters cell"):
        walkthrough_notebook(str(plain), {"x": 2})
