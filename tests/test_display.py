"""What a person sees: the attention pictures in a browser and in a PNG, the Jupyter views of the
model, the cache, factored matrices and SAEs, and probability-coloured token tables."""

import os
import re

import numpy as np
import pytest

from npgpt2 import SAE, plot
from npgpt2.analysis import next_token_table, ov_circuit, prompt_token_probs
from npgpt2.display import _CELL, harvest_html

from browser import render, texts

# Tokens a browser could mistake for markup, and one that would end a <script> element early.
TRICKY = ["<|endoftext|>", "When", " a</script><b>", " &amp;", " <!--<script>", " Mary"]


def tricky_patterns(n_head=3, n=len(TRICKY), seed=0):
    rng = np.random.default_rng(seed)
    p = np.tril(rng.random((n_head, n, n)) + 0.01)
    return p / p.sum(-1, keepdims=True)


def shade(w):
    """The colour the pages give weight w, written out independently: white (0) to blue (1)."""
    c = int(np.floor(255 * (1 - w) + 0.5))
    return f"rgb({c}, {c}, 255)"


# ------------------------------------------------------------------------ the two defects
def test_attention_page_shows_the_tokens_as_text_in_a_browser(tmp_path):
    page = plot.attention_html(tricky_patterns(), TRICKY, 0, path=tmp_path / "p.html")
    dom, _ = render(page)
    labels = [t for t in texts(dom, "th") if t]
    n = len(TRICKY)
    # the enlarged head labels every row and column with "position:token", exactly as the token reads
    assert labels[:n] == [f"{i}:{t}" for i, t in enumerate(TRICKY)]
    assert labels[n:2 * n] == labels[:n]
    assert not any("&lt;" in t or "&amp;amp;" in t for t in labels)


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


# ----------------------------------------------------------------------- the attention view
PROBE = """
const root = document.querySelector(".npgpt2-attn");
const toks = Array.from(root.querySelectorAll(".tokens .tok"));
const strips = () => Array.from(root.querySelectorAll(".head")).map(h =>
    Array.from(h.querySelectorAll(".strip .tok")).map(s => s.style.background));
const handlers = toks.map(s => typeof s.onmouseover === "function");
const before = strips();
toks[QUERY].dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
return {tokens: toks.map(s => s.textContent), handlers, before, after: strips(),
        heads: Array.from(root.querySelectorAll(".head h4")).map(h => h.textContent),
        query: toks.map(s => s.classList.contains("query")),
        info: root.querySelector(".info").textContent,
        views: document.querySelectorAll(".npgpt2-attn").length};
"""


def test_attention_view_hover_shows_where_a_token_attends(model, tmp_path):
    text = "When John and Mary went to the shops, John gave"
    _, c = model.run_with_cache(text)
    tokens = model.to_str_tokens(text)
    view = plot.attention_view(c, tokens, [(0, 1), (1, 3)])
    assert repr(view).startswith("AttentionView(2 heads: L0H1, L1H3")
    path = view.save(tmp_path / "view.html")
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and not re.search(r"(src|href)\s*=|https?://|@import", page)
    q = 5
    dom, r = render(page, PROBE.replace("QUERY", str(q)))
    assert r["tokens"] == tokens and all(r["handlers"]) and r["heads"] == ["L0H1", "L1H3"]
    assert r["query"] == [j == q for j in range(len(tokens))]
    for h, (layer, head) in enumerate([(0, 1), (1, 3)]):
        p = c["pattern", layer][0, head]
        expected = [shade(round(float(p[q, j]), 4)) if j <= q else "transparent" for j in range(len(tokens))]
        assert r["after"][h] == expected  # the hovered token's row of this head's pattern
        assert r["before"][h] != r["after"][h]  # before: the last token's row
        best = int(np.argmax(p[q, : q + 1]))
        assert f"L{layer}H{head} -> {best} " in r["info"]


def test_attention_view_inline_views_are_independent_and_keep_tricky_tokens():
    p = tricky_patterns()
    first = plot.attention_view(p, TRICKY)
    second = plot.attention_view(p[::-1], TRICKY, heads=[0, 2])
    page = f"<!DOCTYPE html><html><body>{first._repr_html_()}{second._repr_html_()}</body></html>"
    _, r = render(page, PROBE.replace("QUERY", "3"))  # probes the first view
    assert r["views"] == 2 and r["tokens"] == TRICKY and r["heads"] == ["H0", "H1", "H2"]
    assert r["after"][1] == [shade(round(float(p[1, 3, j]), 4)) if j <= 3 else "transparent" for j in range(len(TRICKY))]
    with pytest.raises(ValueError, match=r"patterns must be \[head, 6, 6\]"):
        plot.attention_view(p[:, :5], TRICKY)
    with pytest.raises(ValueError, match="heads is needed with a cache"):
        plot.attention_view({0: p[None]}, TRICKY)


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
