"""What a person sees: the attention pictures in a browser and in a PNG, the Jupyter views of the
model, the cache, factored matrices and SAEs, and probability-coloured token tables."""

import os
import re

import numpy as np
import pytest

from npgpt2 import SAE, plot, style
from npgpt2.analysis import next_token_table, ov_circuit, prompt_token_probs
from npgpt2.display import _CELL, harvest_html

from browser import render, screenshot

# Tokens a browser could mistake for markup, and one that would end a <script> element early.
TRICKY = ["<|endoftext|>", "When", " a</script><b>", " &amp;", " <!--<script>", " Mary"]


def tricky_patterns(n_head=3, n=len(TRICKY), seed=0):
    rng = np.random.default_rng(seed)
    p = np.tril(rng.random((n_head, n, n)) + 0.01)
    return p / p.sum(-1, keepdims=True)


def shade(w):
    """The colour the pages give weight w: npgpt2.style's 0..1 map (checked against matplotlib's
    colormap of the same stops in test_pictures)."""
    return style.sequential_rgb(w)


def label(token):
    """How a token reads on a page or a figure: spaces and newlines made visible."""
    return token.replace(" ", "\u2423").replace("\n", "\u21b5")


# ------------------------------------------------------------------- the attention view (HTML)
PROBE = """
const root = document.querySelector(".npgpt2-attn");
const heads = () => Array.from(root.querySelectorAll("button.head"));
const state = () => ({selected: heads().filter(b => b.classList.contains("selected")).map(b => b.querySelector(".name").textContent),
    pressed: heads().filter(b => b.getAttribute("aria-pressed") === "true").length,
    big: root.querySelector(".selected-name").textContent,
    cells: Array.from(root.querySelectorAll("table.pattern tr")).slice(1).map(r => Array.from(r.cells).slice(1).map(c => c.style.background))});
const overflow = Array.from(root.querySelectorAll("*")).filter(e => e.children.length === 0 && e.textContent &&
    (e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1) && e.clientWidth > 0).map(e => e.textContent);
const first = state();
heads()[CLICK].click();
const second = state();
root.querySelectorAll("table.pattern tr")[QUERY + 1].cells[KEY + 1].dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
const prompt = Array.from(root.querySelectorAll(".tokens .tok"));
return {titles: heads().map(b => b.querySelector(".name").textContent), first, second, overflow,
        prompt: prompt.map(s => s.textContent), promptShade: prompt.map(s => s.style.background),
        keys: Array.from(root.querySelectorAll("th.key")).map(t => t.textContent),
        queries: Array.from(root.querySelectorAll("th.query")).map(t => t.textContent),
        info: root.querySelector(".info").textContent, views: document.querySelectorAll(".npgpt2-attn").length};
"""


def probe(click, query, key):
    return PROBE.replace("CLICK", str(click)).replace("QUERY", str(query)).replace("KEY", str(key))


def expected_cells(p):
    n = len(p)
    masked = "rgb({}, {}, {})".format(*(int(style.MASKED[i:i + 2], 16) for i in (1, 3, 5)))
    return [[shade(round(float(p[i, j]), 4)) if j <= i else masked for j in range(n)] for i in range(n)]


def test_attention_view_picks_a_head_and_reads_a_cell(model):
    text = "When John and Mary went to the shops, John gave"
    _, c = model.run_with_cache(text)
    tokens = model.to_str_tokens(text)
    view = plot.attention_view(c, tokens, [(0, 1), (1, 3), (1, 0)], title="tiny · three heads")
    assert repr(view).startswith("AttentionView(3 heads: L0H1, L1H3, L1H0")
    page = view.to_html()
    assert page.startswith("<!DOCTYPE html>") and not re.search(r"(src|href)\s*=|https?://|@import", page)
    q, k = 6, 2
    _, r = render(page, probe(1, q, k))
    assert r["titles"] == ["L0H1", "L1H3", "L1H0"]  # every head panel titled
    assert r["first"]["selected"] == ["L0H1"] == [r["first"]["big"]] and r["first"]["pressed"] == 1
    assert r["second"]["selected"] == ["L1H3"] == [r["second"]["big"]] and r["second"]["pressed"] == 1
    assert r["first"]["cells"] == expected_cells(c["pattern", 0][0, 1])
    assert r["second"]["cells"] == expected_cells(c["pattern", 1][0, 3])  # the large pattern is the picked head's
    # the prompt is shown once; tokens label both axes of the large pattern
    assert r["prompt"] == r["keys"] == r["queries"] == [label(t) for t in tokens]
    w = float(c["pattern", 1][0, 3, q, k])
    assert r["info"] == (f"L1H3: destination {q} {label(tokens[q])} \u2190 source {k} {label(tokens[k])}: "
                         f"attention weight {round(w, 4):.4f}")
    # hovering made position q the destination: the prompt is shaded by its attention
    assert r["promptShade"][: q + 1] == [shade(round(float(c["pattern", 1][0, 3, q, j]), 4)) for j in range(q + 1)]
    assert set(r["promptShade"][q + 1:]) == {"transparent"}
    assert not r["overflow"], r["overflow"]
    screenshot(page, "attention-view-tiny")


def test_attention_html_of_a_layer_keeps_tricky_tokens(tmp_path):
    p = tricky_patterns(n_head=12)
    page = plot.attention_html(p, TRICKY, 3, path=tmp_path / "p.html", model="tiny")
    assert (tmp_path / "p.html").read_text(encoding="utf-8") == page
    _, r = render(page, probe(11, 5, 1))
    assert r["titles"] == [f"L3H{h}" for h in range(12)] and r["second"]["selected"] == ["L3H11"]
    assert r["keys"] == [label(t) for t in TRICKY] and not any("&lt;" in t or "&amp;amp;" in t for t in r["keys"])
    assert r["second"]["cells"] == expected_cells(p[11]) and not r["overflow"], r["overflow"]
    screenshot(page, "attention-html-12-heads")
    with pytest.raises(ValueError, match=r"pattern must be \[head, 6, 6\]"):
        plot.attention_html(p[:, :5], TRICKY, 0)


def test_attention_views_inline_are_independent():
    p = tricky_patterns()
    first = plot.attention_view(p, TRICKY)
    second = plot.attention_view(p[::-1], TRICKY, heads=[0, 2])
    page = f"<!DOCTYPE html><html><body>{first._repr_html_()}{second._repr_html_()}</body></html>"
    _, r = render(page, probe(2, 3, 0))  # probes the first view; the second's script ran too, without clashing
    assert r["views"] == 2 and r["titles"] == ["H0", "H1", "H2"] and r["second"]["cells"] == expected_cells(p[2])
    with pytest.raises(ValueError, match=r"patterns must be \[head, 6, 6\]"):
        plot.attention_view(p[:, :5], TRICKY)
    with pytest.raises(ValueError, match="heads is needed with a cache"):
        plot.attention_view({0: p[None]}, TRICKY)


def _panel_texts(ax, renderer):
    items = ax.get_xticklabels() + ax.get_yticklabels() + [ax.xaxis.label, ax.yaxis.label, ax.title]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in items if t.get_text()]


@pytest.mark.parametrize("n_heads", [2, 4])
def test_attention_pattern_panels_do_not_overlap(model, n_heads):
    pytest.importorskip("matplotlib")
    text = "When John and Mary went to the shops, John gave the bag to"
    _, c = model.run_with_cache(text)
    tokens = model.to_str_tokens(text)
    fig = plot.attention_patterns(c, tokens, [(0, 1), (1, 3), (1, 0), (0, 2)][:n_heads])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"][:n_heads]
    assert len(panels) == n_heads
    for a in panels:
        for b in panels:
            if a is b:
                continue
            image_b = b.get_window_extent(r)
            for text_a, box_a in _panel_texts(a, r):
                assert not box_a.overlaps(image_b), f"{text_a!r} of {a.get_title()} is drawn over {b.get_title()}"
                for text_b, box_b in _panel_texts(b, r):
                    assert not box_a.overlaps(box_b), f"{text_a!r} ({a.get_title()}) over {text_b!r} ({b.get_title()})"


# -------------------------------------------------------------------------- rich reprs
def test_model_html_says_what_and_where(model):
    page = model._repr_html_()
    assert len(repr(model)) < 200 and "\n" not in repr(model)
    c = model.cfg
    for expected in (f"{c.n_layer} x {c.n_head}", f"{model.n_params():,}", str(model.dtype), "blockwise",
                     os.path.dirname(os.path.realpath(model.files.config)), os.path.basename(model.files.weights[0])):
        assert expected in page, expected
    assert "none (the logits equal" in page


def test_cache_html_groups_hook_points_by_layer(model):
    _, c = model.run_with_cache("The cat sat on the mat")
    page = c._repr_html_()
    summaries = re.findall(r"<summary>(.*?): (\d+) activations", page)
    names = list(c)  # every hook point but hook_result, made only when asked for
    assert set(names) == set(model.hook_names()) - {f"blocks.{l}.attn.hook_result" for l in range(model.cfg.n_layer)}
    expected = [("embed", sum(not n.startswith(("blocks.", "ln_final.")) for n in names))]
    expected += [(f"block {l}", sum(n.startswith(f"blocks.{l}.") for n in names)) for l in range(model.cfg.n_layer)]
    expected += [("final", sum(n.startswith("ln_final.") for n in names))]
    assert [(g, int(k)) for g, k in summaries] == expected
    total = sum(a.nbytes for a in c.values())
    assert f"{len(c)} activations, {total / 1024:,.1f} KiB" in page
    n = len(model.to_tokens("The cat sat on the mat")[0])
    assert f"[1, 4, {n}, {n}]" in page  # a pattern's shape: [batch, head, query_pos, key_pos]
    assert len(repr(c)) < 200


def test_factored_matrix_and_sae_html(model):
    ov = ov_circuit(model)[1, 2]
    page = ov._repr_html_()
    d, r = model.cfg.d_model, model.cfg.d_head
    assert f"FactoredMatrix {d} x {d}" in page and f"[{d}, {r}]" in page and f"{2 * d * r:,} numbers" in page
    rng = np.random.default_rng(0)
    sae = SAE(rng.normal(size=(d, 4 * d)), np.zeros(4 * d), rng.normal(size=(4 * d, d)), np.zeros(d),
              hook_name="blocks.1.hook_resid_pre", cfg={"l1_coefficient": 5})
    assert repr(sae) == f"SAE(blocks.1.hook_resid_pre: d_in={d}, d_sae={4 * d}, dtype=float64)"
    page = sae._repr_html_()
    assert "blocks.1.hook_resid_pre" in page and "4x" in page and "l1_coefficient" in page


def _harvest(folder=None, sae=None):
    import pandas as pd

    from npgpt2.harvest import Harvest

    features = pd.DataFrame({"feature": [0, 1, 2, 3, 4, 5, 6], "n_tokens": 12345,
                             "fire_count": [10, 0, 4000, 7, 12345, 3, 99],
                             "max": [2.5, -0.25, 7.0, 7.0, 1.0, 3.125, 0.5],
                             "density": [10 / 12345, 0.0, 4000 / 12345, 7 / 12345, 1.0, 3 / 12345, 99 / 12345],
                             "mean_firing": [1.5, np.nan, 2.0, 6.5, 0.5, 3.0, 0.25], "mean": 0.0, "min": -1.0})
    manifest = {"model": "/models/<tiny>", "model_name": "tiny & small", "hook": "blocks.1.mlp.hook_post",
                "sae": sae, "n_features": 7, "feature_kind": "latent" if sae else "neuron", "threshold": 0.0,
                "tokens_seen": 12345, "n_contexts": 196, "ctx": 64, "runner": "in-process", "seconds": 1.5,
                "corpus": {"description": "texts <3 & more", "fingerprint": "0123456789abcdef"}}
    empty = pd.DataFrame()
    return Harvest(manifest, features, empty, empty, empty, empty, folder=folder)


def test_harvest_html_says_what_was_read_and_its_strongest_features():
    h = _harvest(folder="/data/h<1>&2")
    assert repr(h) == "Harvest(7 neurons of blocks.1.mlp.hook_post; 12,345 tokens; in /data/h<1>&2)"
    page = h._repr_html_()
    for expected in ("tiny &amp; small (/models/&lt;tiny&gt;)", "blocks.1.mlp.hook_post", "none (the hook",
                     "7 neurons, 6 fired", "12,345 in 196 contexts of 64 tokens", "texts &lt;3 &amp; more",
                     "0123456789ab)", "/data/h&lt;1&gt;&amp;2"):
        assert expected in page, expected
    assert "<tiny>" not in page and "h<1>" not in page
    # the second table: the five largest maxima, ties (7.0) in feature order; a feature that never
    # fired (the last of all seven) has no mean when firing
    top = page.split("the 5 neurons with the largest activations")[1]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", top)[1:]]
    assert [r[0] for r in rows] == ["2", "3", "5", "0", "4"]
    assert rows[0] == ["2", "7", "0.324", "2", "4,000"] and rows[2] == ["5", "3.125", "0.000243", "3", "3"]
    everything = harvest_html(h, n_top=7).split("the 7 neurons with the largest activations")[1]
    last = re.findall(r"<td[^>]*>(.*?)</td>", re.findall(r"<tr>(.*?)</tr>", everything)[-1])
    assert last == ["1", "-0.25", "0", "-", "0"]
    assert _harvest()._repr_html_().count("not saved") == 1 and repr(_harvest()).endswith("; not saved)")


def test_harvest_html_of_an_sae_and_of_a_real_harvest(model):
    pytest.importorskip("pyarrow")
    h = _harvest(sae={"release": "res-jb", "sae_id": "blocks.1.hook_resid_pre", "hook": "blocks.1.hook_resid_pre",
                      "d_sae": 24576})
    page = h._repr_html_()
    assert "res-jb:blocks.1.hook_resid_pre (d_sae 24,576)" in page and "7 latents, 6 fired" in page
    assert "the 5 latents with the largest activations" in page
    from npgpt2.harvest import harvest

    real = harvest(["The cat sat on the mat. " * 20], model, "blocks.0.mlp.hook_post", ctx=32, top_k=3, per_band=1,
                   progress=False)
    page = real._repr_html_()
    assert f"{real.manifest['tokens_seen']:,} in {real.manifest['n_contexts']} contexts of 32 tokens" in page
    assert f"{model.cfg.d_mlp} neurons" in page and len(repr(real)) < 200 and "\n" not in repr(real)
    best = real.features.sort_values("max", ascending=False).iloc[0]
    assert f"<td style=\"{_CELL}\">{int(best['feature'])}</td><td style=\"{_CELL}\">{best['max']:.4g}</td>" in page


# ------------------------------------------------------------------- coloured token tables
def _cell_css(html_text):
    """{(row, col): css} from a Styler's HTML."""
    out = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", html_text.split("</style>")[0]):
        for r, c in re.findall(r"_row(\d+)_col(\d+)", selectors):
            out[int(r), int(c)] = " ".join(body.split())
    return out


def test_token_tables_as_coloured_stylers(model):
    pytest.importorskip("jinja2")
    prompt = "<|endoftext|>Hello, my dog <b>is</b> cute"
    plain = prompt_token_probs(model, prompt)
    styled = prompt_token_probs(model, prompt, style=True)
    html_text = styled.to_html()
    css = _cell_css(html_text)
    for (i, j), p in np.ndenumerate(plain.to_numpy()):
        assert f"background-color: {shade(p)}" in css[i, j]
    assert "&lt;|endoftext|&gt;" in html_text and "<b>is" not in html_text
    table = next_token_table(model, prompt, k=2)
    css = _cell_css(next_token_table(model, prompt, k=2, style=True).to_html())
    col = list(table.columns).index("top1_prob")
    for i, p in enumerate(table["top1_prob"]):
        assert f"background-color: {shade(p)}" in css[i, col]
    assert not any(c == list(table.columns).index("entropy") for _, c in css)  # only probabilities coloured
