"""Every ```python block of docs/from-transformerlens.md runs, in order, in one namespace, on the
synthetic tiny model (``npgpt2.from_pretrained`` is pointed at it whatever name is asked for).

A block preceded by ``<!-- skip-until: FEATURE -->`` needs a feature of npgpt2 that may not be
there yet; it runs when ``FEATURES[FEATURE](model)`` says the feature is there, and is skipped (and
reported) otherwise. Blocks marked ``py`` are TransformerLens originals and are not run."""

import os
import re

import pytest

import npgpt2

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "from-transformerlens.md")
BLOCK = re.compile(r"(?:<!--\s*skip-until:\s*(?P<feature>[\w.]+)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)

# feature name -> does this build have it? (checked on the loaded model)
FEATURES = {
    "default_prepend_bos": lambda model: hasattr(model.cfg, "default_prepend_bos"),
    "set_weight": lambda model: hasattr(model, "set_weight"),
}


def blocks():
    with open(GUIDE, encoding="utf-8") as f:
        text = f.read()
    return [(m.group("feature"), m.group("code"), text[: m.start()].count("\n") + 1) for m in BLOCK.finditer(text)]


def test_guide_has_the_promised_parts():
    with open(GUIDE, encoding="utf-8") as f:
        text = f.read()
    assert "| TransformerLens | npgpt2 |" in text and "## What differs on purpose" in text
    assert "## A worked port" in text and len(blocks()) >= 6
    unknown = {feature for feature, _, _ in blocks() if feature} - set(FEATURES)
    assert not unknown, f"skip-until markers with no availability check: {unknown}"


def test_every_python_block_runs(tiny_dir, monkeypatch, capsys):
    real = npgpt2.from_pretrained
    monkeypatch.setattr(npgpt2, "from_pretrained", lambda name="gpt2", **kwargs: real(tiny_dir, **kwargs))
    namespace = {"__name__": "guide"}
    skipped = []
    try:
        for feature, code, line in blocks():
            model = namespace.get("model")
            if feature and not (model is not None and FEATURES[feature](model)):
                skipped.append((line, feature))
                continue
            try:
                exec(compile(code, f"{GUIDE}:{line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"the block at docs/from-transformerlens.md line {line} failed: "
                                     f"{type(error).__name__}: {error}") from error
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
        if namespace.get("model") is not None:
            namespace["model"].reset_hooks(including_permanent=True)
    out = capsys.readouterr().out
    assert "Ranks of the answer tokens" in out  # test_prompt printed
    if skipped:
        print(f"guide blocks skipped until their feature is available: {skipped}")
