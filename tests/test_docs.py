"""The documentation site: every public function documented, the hook-point table generated from
the model's registry, the porting guide's place in the navigation, and (``pytest -m docs``, needs
the docs extra) ``mkdocs build --strict`` with the built hook table equal to ``model.hook_names()``."""

import glob
import html
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def _docs_hooks():
    spec = importlib.util.spec_from_file_location("npgpt2_docs_hooks", os.path.join(DOCS, "hooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _api_objects():
    """Every public class and function the API reference pages document (``::: module`` blocks),
    and every public method of those classes."""
    targets = []
    for page in glob.glob(os.path.join(DOCS, "api", "*.md")):
        targets += re.findall(r"^::: ([\w.]+)", open(page, encoding="utf-8").read(), re.M)
    for target in targets:
        try:
            obj = importlib.import_module(target)
        except ImportError:
            module, attr = target.rsplit(".", 1)
            obj = getattr(importlib.import_module(module), attr)
        if inspect.ismodule(obj):
            items = [(f"{target}.{n}", v) for n, v in vars(obj).items() if not n.startswith("_")
                     and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == obj.__name__]
        else:
            items = [(target, obj)]
        for name, value in items:
            yield name, value
            if inspect.isclass(value):
                for member, m in vars(value).items():
                    if not member.startswith("_") and inspect.isfunction(m):  # methods (properties are attributes)
                        yield f"{name}.{member}", getattr(value, member)


def test_every_public_function_in_the_api_reference_is_documented():
    found = list(_api_objects())
    assert len(found) > 150  # the reference covers the library, not a corner of it
    missing = [name for name, obj in found if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"no docstring: {missing}"


def test_the_hook_point_page_is_generated_from_the_registry():
    from npgpt2.hooks import HOOK_POINTS

    page = open(os.path.join(DOCS, "hook-points.md"), encoding="utf-8").read()
    hooks = _docs_hooks()
    assert hooks.PLACEHOLDER in page and "blocks.{l}.attn.hook_pattern" not in page  # never written by hand
    table = hooks.hook_point_table()
    assert [re.match(r"\| `([^`]+)`", row).group(1) for row in table.splitlines()[2:]] == [s.name for s in HOOK_POINTS]


def test_the_porting_guide_is_in_the_navigation_only_when_its_file_is_there(tmp_path):
    hooks = _docs_hooks()
    nav = [{"Home": "index.md"}, {"Hook points": "hook-points.md"}, {"Parity": "parity.md"}]
    assert hooks.nav_with_porting_guide(nav, str(tmp_path)) == nav
    (tmp_path / "from-transformerlens.md").write_text("# Porting\n")
    assert hooks.nav_with_porting_guide(nav, str(tmp_path)) == [
        {"Home": "index.md"}, {"Hook points": "hook-points.md"},
        {"Porting from TransformerLens": "from-transformerlens.md"}, {"Parity": "parity.md"}]
    listed = nav + [{"Porting": "from-transformerlens.md"}]  # already placed by hand: left alone
    assert hooks.nav_with_porting_guide(listed, str(tmp_path)) == listed


# ------------------------------------------------------------------------- the pictures
@pytest.fixture(scope="module")
def pictures():
    """docs/make_pictures.py run afresh into docs/images, as CI's documentation step does before the
    site is built. The trained induction model comes from the user's own cache (``$HF_HOME/npgpt2-zoo``,
    not the tests' private one), where it is built once and then reused, as the script does when run
    by hand."""
    pytest.importorskip("matplotlib")
    return _run_docs_script("make_pictures.py", "pictures.json")


def _run_docs_script(script: str, record: str):
    """Run docs/<script> --out docs/images; -> (when it started, the images folder, its record)."""
    import json
    import time

    started = time.time()
    images = os.path.join(DOCS, "images")
    from conftest import REAL_HF_HUB_CACHE

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HOME=os.path.dirname(REAL_HF_HUB_CACHE))
    out = subprocess.run([sys.executable, os.path.join(DOCS, script), "--out", images],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(os.path.join(images, record), encoding="utf-8") as f:
        return started, images, json.load(f)


def _docs_script(name: str):
    """docs/NAME.py imported as a module (for the lists of files it writes)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(DOCS, f"{name}.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.docs
def test_the_pictures_are_remade_from_the_trained_model(pictures):
    started, images, record = pictures
    script = _docs_script("make_pictures")
    assert sorted(record["files"]) == sorted(script.PICTURES)
    for name in script.PICTURES:
        path = os.path.join(images, name)
        assert os.path.getmtime(path) >= started - 1, f"{name} was not written by this run"
        assert os.path.getsize(path) == record["files"][name]
        with open(path, "rb") as f:
            head = f.read(16)
        assert head.startswith(b"\x89PNG" if name.endswith(".png") else b"<!DOCTYPE html>"), name
    assert record["model"].startswith("induction")
    # every picture is shown by the docs, and the README shows at least one of them
    page = open(os.path.join(DOCS, "techniques", "pictures.md"), encoding="utf-8").read()
    assert all(f"../images/{name}" in page for name in script.PICTURES)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    shown = re.findall(r"!\[[^\]]*\]\((docs/images/[^)]+)\)", readme)
    assert shown and all(os.path.exists(os.path.join(ROOT, s)) for s in shown)


@pytest.mark.docs
def test_the_pictures_show_the_induction_circuit(pictures):
    """What the pictures page says they show: the heads drawn are a previous-token head in layer 0
    and an induction head in layer 1, each attending where its name says on most of the prompt."""
    _, _, record = pictures
    assert record["previous_token_head"].startswith("L0") and record["previous_token_score"] > 0.5, record
    assert record["induction_head"].startswith("L1") and record["induction_score"] > 0.5, record


@pytest.fixture(scope="module")
def screenshots():
    """docs/make_screenshots.py run afresh into docs/images (npgpt2 inspect on the induction model,
    driven in Chromium), as the documentation step does before the site is built; the model from the
    user's own zoo cache, as for the pictures."""
    from browser import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return _run_docs_script("make_screenshots.py", "inspect-screenshots.json")


@pytest.mark.docs
def test_the_inspectors_screenshots_are_remade_and_shown(screenshots):
    started, images, record = screenshots
    script = _docs_script("make_screenshots")
    assert sorted(record["files"]) == sorted(script.SHOTS)
    page = open(os.path.join(DOCS, "inspect.md"), encoding="utf-8").read()
    for name in script.SHOTS:
        path = os.path.join(images, name)
        assert os.path.getmtime(path) >= started - 1, f"{name} was not written by this run"
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert f"images/{name}" in page


@pytest.mark.docs
def test_the_inspector_page_shows_what_the_docs_say(screenshots):
    """The head shown is an induction head of layer 1 that looks one past the earlier copy of the
    word; zero-ablating it alone lowers the metric, by less than half (the other heads copy too)."""
    _, _, record = screenshots
    assert record["induction_head"].startswith("L1") and record["induction_score"] > 0.5, record
    assert float(record["shown"]["attention"].rsplit(": ", 1)[1]) > 0.5, record
    metric = float(record["shown"]["metric"])
    change = float(record["shown"]["ablation"].rsplit("change ", 1)[1])
    assert metric > 0 and 0 < -change < 0.5 * metric, record


# ------------------------------------------------------------------------- the strict build
def _build(root, site):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(root, "mkdocs.yml"),
                          "-d", str(site)], capture_output=True, text=True, cwd=root, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _table_names(page_html):
    """The first column of the built page's hook table, as the reader sees it."""
    table = re.search(r"<table>.*?</table>", page_html, re.S).group(0)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    return [html.unescape(re.sub(r"<[^>]+>", "", re.search(r"<td>(.*?)</td>", r, re.S).group(1))) for r in rows]


@pytest.mark.docs
def test_docs_build_strictly_and_the_hook_table_is_the_models(tmp_path, model, pictures):
    _build(ROOT, tmp_path / "site")
    built = open(tmp_path / "site" / "techniques" / "pictures" / "index.html", encoding="utf-8").read()
    for image in re.findall(r'<img[^>]+src="([^"]+)"', built):  # the page's pictures are in the site
        assert (tmp_path / "site" / "techniques" / "pictures" / image).resolve().exists(), image
    assert (tmp_path / "site" / "images" / "circuit.html").exists()
    css = open(tmp_path / "site" / "stylesheets" / "extra.css", encoding="utf-8").read()
    assert "overflow-x: auto" in css  # code blocks scroll instead of being cut
    names = _table_names(open(tmp_path / "site" / "hook-points" / "index.html", encoding="utf-8").read())
    n_layer = model.cfg.n_layer
    per_block = [n for n in names if "{l}" in n]
    expanded = ([n for n in names if n.startswith("hook_")] + [n.format(l=l) for l in range(n_layer) for n in per_block]
                + [n for n in names if n.startswith("ln_final.")])
    assert len(expanded) == len(names) - len(per_block) + n_layer * len(per_block)  # every row placed
    assert expanded == model.hook_names()
    api = open(tmp_path / "site" / "api" / "model" / "index.html", encoding="utf-8").read()
    assert "run_with_cache" in api and "accumulated_resid" in api  # the reference comes from the docstrings


@pytest.mark.docs
def test_docs_build_strictly_with_the_porting_guide_present(tmp_path):
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    os.symlink(os.path.join(ROOT, "npgpt2"), tmp_path / "npgpt2")
    (tmp_path / "docs" / "from-transformerlens.md").write_text("# Porting from TransformerLens\n\nA guide.\n")
    _build(str(tmp_path), tmp_path / "site")
    index = open(tmp_path / "site" / "index.html", encoding="utf-8").read()
    assert "Porting from TransformerLens" in index and "from-transformerlens/" in index


def test_each_module_has_one_import_path():
    """The modules that moved into npgpt2.analysis and npgpt2.training live there only: no second
    name for the same module (the walkthroughs, docs and tests import them from where they are)."""
    for old, new in {"npgpt2.patching": "npgpt2.analysis.patching", "npgpt2.head_detector": "npgpt2.analysis.head_detector",
                     "npgpt2.optim": "npgpt2.training.optim", "npgpt2.sae_training": "npgpt2.training.sae",
                     "npgpt2.toy_models": "npgpt2.training.toy_models"}.items():
        file = os.path.join(ROOT, *old.split(".")) + ".py"
        assert not os.path.exists(file), f"{old} still exists (the module is {new})"
        assert importlib.import_module(new).__name__ == new
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True) + glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True):
        if "/.git/" in path or path.endswith("test_docs.py"):
            continue
        text = open(path, encoding="utf-8").read()
        old_import = re.search(r"npgpt2\.(patching|head_detector|optim|sae_training|toy_models)\b|from npgpt2 import [^\n]*\bpatching\b", text)
        assert old_import is None, f"{path}: {old_import.group(0)}"


def test_the_porting_guide_goes_by_one_name_and_tells_how_weights_are_written():
    name = "Porting from TransformerLens"
    guide = open(os.path.join(DOCS, "from-transformerlens.md"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert guide.startswith(f"# {name}\n") and f"[{name}](docs/from-transformerlens.md)" in readme
    assert _docs_hooks().PORTING[0] == name
    for text in (guide, open(os.path.join(DOCS, "getting-started.md"), encoding="utf-8").read()):
        assert "set_weight(" in text and "assignment destination is read-only" not in text
