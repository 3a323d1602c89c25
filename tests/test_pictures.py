"""The pictures' visual language (``npgpt2.style``), checked on the figures and pages themselves:
one sign convention in every function that draws a signed array, the 0..1 map for probabilities
and attention, every axis and colourbar labelled, tokens as tick labels, the circuit page in
Chromium."""

import re

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from npgpt2 import plot, style  # noqa: E402
from npgpt2.analysis import logit_lens  # noqa: E402

from browser import render, screenshot  # noqa: E402

TOKENS = ["<|endoftext|>", "When", " John", " and", "\n", " \u4e2d"]
# how each reads as a tick label, written out by hand: whitespace visible, the CJK character (no
# font here draws it) as its code point
LABELS = ["<|endoftext|>", "When", "\u2423John", "\u2423and", "\u21b5", "\u2423\\u4e2d"]


from figures import close_figures, ticks  # noqa: E402,F401  (close_figures: autouse)


def colourbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def assert_labelled(fig):
    """Every panel has a title (or the figure one), each axis a label unless its ticks are blank or
    name the rows themselves (a deliberately blank axis label), and every colourbar a label."""
    fig.canvas.draw()
    for ax in panels(fig):
        where = ax.get_title() or (fig._suptitle.get_text() if fig._suptitle else "")
        assert where, f"a panel of {fig} has no title"
        for axis in ("x", "y"):
            label = ax.get_xlabel() if axis == "x" else ax.get_ylabel()
            tick_text = [t for t in ticks(ax, axis) if t]
            assert label or (ax.get_ylabel() == "" and axis == "y" and tick_text and not tick_text[0][0].isdigit()) \
                or not tick_text, f"{where}: the {axis} axis has ticks {tick_text[:3]} but no label"
    for bar in colourbars(fig):
        assert bar.get_ylabel().strip(), "a colourbar has no label"
    # no text is cut by the figure's edge (titles, axis and colourbar labels, tick labels, notes)
    renderer, page = fig.canvas.get_renderer(), fig.bbox
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        drawn_ticks = [t for t in ax.get_xticklabels() if x0 - 1e-9 <= t.get_position()[0] <= x1 + 1e-9]
        drawn_ticks += [t for t in ax.get_yticklabels() if y0 - 1e-9 <= t.get_position()[1] <= y1 + 1e-9]
        for text in [ax.title, ax.xaxis.label, ax.yaxis.label, *drawn_ticks, *ax.texts]:
            if text.get_text() and text.get_visible():
                box = text.get_window_extent(renderer)
                assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, \
                    f"{text.get_text()!r} runs off the figure ({box} outside {page})"


def test_token_labels_make_whitespace_visible_and_replace_what_no_font_draws():
    assert [style.tick_label(t) for t in TOKENS] == LABELS
    assert style.token_label(' ("') == '\u2423("'  # quotes stay themselves: no repr, no escaping
    assert style.drawable("\x08x") == "\\u0008x"  # a control character is written out too
    assert style.short_label(" extraordinary", 6) == "\u2423extr\u2026"


def test_html_colours_are_the_figures_colours():
    seq, div = style.sequential_cmap(), style.diverging_cmap()
    for w in np.linspace(0, 1, 23):
        got = np.array(re.findall(r"\d+", style.sequential_rgb(w)), dtype=float) / 255
        assert np.abs(got - np.array(seq(w)[:3])).max() <= 2.5 / 255, w  # matplotlib looks colours up in 256 steps
    for v in np.linspace(-2, 2, 23):
        got = np.array(re.findall(r"\d+", style.diverging_rgb(v, 2.0)), dtype=float) / 255
        assert np.abs(got - np.array(div(0.5 + v / 4)[:3])).max() <= 2.5 / 255, v
    r, g, b = (int(x) for x in re.findall(r"\d+", style.diverging_rgb(1, 1)))
    assert b > r + 60  # positive is blue
    r, g, b = (int(x) for x in re.findall(r"\d+", style.diverging_rgb(-1, 1)))
    assert r > b + 60  # negative is red


def _dla_table(values):
    rows = [{"type": "head", "layer": l, "head": h, "component": f"L{l}H{h}", "attribution": values[l, h]}
            for l in range(values.shape[0]) for h in range(values.shape[1])]
    return pd.DataFrame(rows)


def _cell_rgb(ax, i, j):
    im = ax.images[0]
    return np.array(im.cmap(im.norm(im.get_array()[i, j]))[:3])


def test_one_sign_convention_in_every_function_on_the_same_array():
    values = np.array([[1.5, -0.5, 0.0], [-1.5, 0.75, 0.25]])  # [layer, head]
    figs = {"heatmap": plot.heatmap(values, ["L0", "L1"], ["H0", "H1", "H2"], center=True, clabel="x (logits)"),
            "imshow": plot.imshow(values, labels={"color": "x (logits)"}),
            "attribution_heatmap": plot.attribution_heatmap(_dla_table(values))}
    reference = None
    for name, fig in figs.items():
        ax = next(a for a in panels(fig) if a.images)
        cells = np.array([[_cell_rgb(ax, i, j) for j in range(3)] for i in range(2)])
        if reference is None:
            reference = cells
        np.testing.assert_allclose(cells, reference, atol=1e-9, err_msg=f"{name} colours the array differently")
        pos, neg = cells[0, 0], cells[1, 0]
        assert pos[2] > pos[0] + 0.2 and neg[0] > neg[2] + 0.2, f"{name}: positive must be blue, negative red"
        assert np.allclose(cells[0, 2], to_rgb(style.DIVERGING_STOPS[5]), atol=0.01), f"{name}: 0 must be white"
    # bars and lines: the same blue and red
    saliency = pd.DataFrame({"position": [0, 1], "token": ["a", " b"], "score": [0.5, -0.5], "share": [0.5, 0.5]})
    saliency.attrs.update(metric=-1.0, method="grad_x_input")
    bars = panels(plot.saliency_plot(saliency, metric="log P(' b')"))[0].patches
    assert to_rgb(bars[0].get_facecolor()) == to_rgb(style.POSITIVE) and to_rgb(bars[1].get_facecolor()) == to_rgb(style.NEGATIVE)
    edges = pd.DataFrame({"upstream": ["L0H1", "L0H2"], "downstream": ["logits", "logits"], "input": ["logits"] * 2,
                          "score": [0.5, -0.5]})
    lines = [l for l in panels(plot.circuit(edges, n_head=3, n_layer=2))[0].get_lines() if len(l.get_xdata()) == 2]
    assert sorted(to_rgb(l.get_color()) for l in lines) == sorted([to_rgb(style.POSITIVE), to_rgb(style.NEGATIVE)])


def test_probabilities_and_attention_are_on_0_1_with_the_sequential_map(model):
    tokens = model.to_tokens("When John and Mary went to the shops")
    _, cache = model.run_with_cache(tokens)
    str_tokens = model.to_str_tokens(tokens[0])
    pattern = cache["pattern", 1][0]
    for fig in (plot.attention_patterns(cache, str_tokens, [(0, 1), (1, 2)]),
                plot.imshow(pattern[0], x=str_tokens, y=str_tokens),  # TransformerLens's default midpoint 0
                plot.logit_lens_heatmap(logit_lens(model, tokens))):
        for ax in panels(fig):
            if ax.images:
                assert ax.images[0].get_clim() == (0.0, 1.0)
                assert ax.images[0].cmap.name == "npgpt2_sequential"


def test_every_figure_is_labelled_and_its_ticks_are_the_tokens(model):
    tokens = model.to_tokens("When John and Mary went to the shops")
    _, cache = model.run_with_cache(tokens)
    str_tokens = model.to_str_tokens(tokens[0])
    marked = [t.replace(" ", "\u2423") for t in str_tokens]
    fig = plot.attention_patterns(cache, str_tokens, [(0, 1), (1, 2), (1, 3)], model="tiny")
    assert [a.get_title() for a in panels(fig)] == ["L0H1", "L1H2", "L1H3"]
    for ax in panels(fig):
        assert ticks(ax) == ticks(ax, "y") == marked
    assert [b.get_ylabel() for b in colourbars(fig)] == ["attention weight (0..1)"]
    assert "tiny" in fig._suptitle.get_text()
    assert_labelled(fig)

    lens = plot.logit_lens_heatmap(logit_lens(model, tokens), model="tiny")
    ax = panels(lens)[0]
    assert ticks(ax) == marked and "tiny" in ax.get_title() and "P(actual next token)" in ax.get_title()
    last = ax.images[0].get_array()[:, -1]
    assert np.ma.getmaskarray(last).all()  # no next token at the last position: masked (grey), and said so
    assert "grey: no next token" in ax.get_xlabel()
    assert_labelled(lens)

    saliency = pd.DataFrame({"position": range(len(TOKENS)), "token": TOKENS, "score": np.linspace(-1, 1, len(TOKENS)),
                             "share": 1 / len(TOKENS)})
    saliency.attrs.update(metric=-2.5, method="integrated_gradients", baseline_metric=-4.0)
    fig = plot.saliency_plot(saliency, metric="log P(' Paris')", model="tiny")
    assert ticks(panels(fig)[0]) == LABELS
    assert "log P(' Paris') = -2.500" in " ".join(panels(fig)[0].get_title().split())  # (a long title wraps)
    assert_labelled(fig)

    values = np.random.default_rng(0).normal(size=(len(TOKENS), len(TOKENS)))
    fig = plot.imshow(values, x=TOKENS, y=TOKENS, labels={"x": "key", "y": "query", "color": "score (nats)"}, title="t")
    assert ticks(panels(fig)[0]) == ticks(panels(fig)[0], "y") == LABELS
    assert_labelled(fig)
    fig = plot.heatmap(values, TOKENS, TOKENS, title="t", xlabel="key", ylabel="query", center=True)
    assert ticks(panels(fig)[0]) == ticks(panels(fig)[0], "y") == LABELS
    assert_labelled(fig)


def test_the_other_figures_are_labelled():
    rng = np.random.default_rng(0)
    fig = plot.attribution_heatmap(_dla_table(rng.normal(size=(3, 4))), model="tiny")
    assert_labelled(fig)
    assert "logits" in colourbars(fig)[0].get_ylabel()
    dla = pd.DataFrame({"component": ["embed", "L0H1", "mlp0"], "attribution": [0.5, -1.0, 0.25]})
    assert_labelled(plot.attribution_bars(dla))
    log = pd.DataFrame({"step": range(10), "loss": np.linspace(2, 1, 10), "mse": np.linspace(1, 0.5, 10),
                        "l0": np.arange(10.0), "dead_latents": np.arange(10)[::-1], "resampled": [0] * 10})
    fig = plot.sae_training_curves(log)
    assert [a.get_title() for a in fig.axes] == ["loss and reconstruction error", "L0", "dead latents"]
    assert not [l for l in fig.axes[2].get_lines() if l.get_linestyle() == ":"]  # no dotted line, none promised
    assert_labelled(fig)
    log["resampled"] = [0] * 5 + [1] + [0] * 4
    fig = plot.sae_training_curves(log)
    assert fig.axes[2].get_title() == "dead latents (dotted: resampling)"
    assert [l.get_xdata()[0] for l in fig.axes[2].get_lines() if l.get_linestyle() == ":"] == [5]
    from npgpt2.training.toy_models import train_toy_models

    toy, _ = train_toy_models(5, 2, sparsity=(0.0, 0.9), steps=20, batch=32, seed=0)
    fig = plot.toy_model_geometry(toy)
    assert len(colourbars(fig)) == 1 and "overlap" in colourbars(fig)[0].get_ylabel()
    grams = [a for a in panels(fig) if a.images]
    assert len(grams) == 2 and all(a.get_xlabel() == "feature" for a in grams)
    assert_labelled(fig)
    edges = pd.DataFrame({"upstream": ["embed", "L0H1"], "downstream": ["L0H1", "logits"], "input": ["q", "logits"],
                          "score": [0.5, -0.25]})
    fig = plot.circuit(edges, n_head=4, n_layer=12, model="gpt2")
    ax = panels(fig)[0]
    assert ticks(ax, "y") == ["embed"] + [f"layer {l}" for l in range(12)] + ["logits"]  # every layer drawn
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["edge, positive score", "edge, negative score"]
    assert "q / k / v: a head's inputs, where its edges end" in legend
    fig.canvas.draw()
    inside = ax.get_window_extent()
    for text in ax.texts:  # node names (logits at the top) are inside the picture, not clipped
        box = text.get_window_extent()
        assert inside.x0 - 1 <= box.x0 and box.x1 <= inside.x1 + 1 and box.y1 <= inside.y1 + 1, text.get_text()
    # several edges into one head's inputs (two into its k): one label per input, none over another
    edges = pd.DataFrame({"upstream": ["L0H0", "L0H1", "mlp0", "embed", "L0H2", "L1H2"],
                          "downstream": ["L1H2", "L1H2", "L1H2", "L1H2", "L1H1", "logits"],
                          "input": ["k", "k", "q", "v", "k", "logits"], "score": [1.0, 0.8, -0.5, 0.3, 0.7, 2.0]})
    fig = plot.circuit(edges, n_head=4, n_layer=2)
    ax = panels(fig)[0]
    fig.canvas.draw()
    labels = sorted(t.get_text() for t in ax.texts if t.get_text() in ("q", "k", "v"))
    assert labels == ["k", "k", "q", "v"]  # L1H2's k, q, v and L1H1's k
    boxes = [(t.get_text(), t.get_window_extent().expanded(1.0, 1.0)) for t in ax.texts]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b), (a, b)


CIRCUIT_PROBE = """
const facts = {};
document.querySelectorAll("dl.facts dt").forEach(dt => { facts[dt.textContent] = dt.nextElementSibling.textContent; });
const overflow = Array.from(document.querySelectorAll("h1, h2, dt, dd, td, th")).filter(e =>
    e.scrollWidth > e.clientWidth + 1).map(e => e.textContent);
const svg = document.querySelector(".circuit svg").getBoundingClientRect();
return {facts, overflow, svgWidth: svg.width, pageWidth: document.documentElement.clientWidth,
        scores: Array.from(document.querySelectorAll("table.edges td.num")).map(td => [td.textContent, td.style.background])};
"""


def test_circuit_page_says_what_the_circuit_was_found_on():
    edges = pd.DataFrame({"upstream": ["embed", "L0H1", "L1H3", "mlp0"], "downstream": ["L0H1", "L1H3", "logits", "logits"],
                          "input": ["q", "k", "logits", "logits"], "score": [0.25, 0.75, 1.5, -0.5]})
    prompts = {"clean": "When John and Mary went, John gave a bag to", "corrupted": "When John and Mary went, Mary gave a bag to"}
    page = plot.circuit_html(edges, n_head=4, n_layer=3, model="tiny <model>", prompts=prompts,
                             metric="logit difference ' Mary' - ' John'", faithfulness=0.8125)
    # nothing fetched: links only to the page's own elements (the SVG's "#..."), no imports
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)|@import|url\(\s*["']?http""", page)
    _, r = render(page, CIRCUIT_PROBE)
    assert r["facts"] == {"model": "tiny <model>", "clean prompt": prompts["clean"], "corrupted prompt": prompts["corrupted"],
                          "metric": "logit difference ' Mary' - ' John'", "edges": "4",
                          "faithfulness": "0.812 (1 = the circuit alone restores the clean metric, 0 = no better than corrupted)"}
    assert [s for s, _ in r["scores"]] == ["+1.5000", "+0.7500", "-0.5000", "+0.2500"]  # largest |score| first
    assert [bg for _, bg in r["scores"]] == [style.diverging_rgb(v, 1.5) for v in (1.5, 0.75, -0.5, 0.25)]
    assert not r["overflow"], r["overflow"]
    assert r["svgWidth"] <= r["pageWidth"]
    screenshot(page, "circuit-page")
