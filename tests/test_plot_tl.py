"""TransformerLens demos' plot helpers (imshow, line, scatter) and attention_patterns with flat head
indices: rendered to PNG offline, then the figure's layout is checked (panels, titles, tick labels,
the data drawn)."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from npgpt2 import plot  # noqa: E402


from figures import close_figures, ticks  # noqa: E402,F401  (close_figures: autouse)


def test_imshow_labels_batch_and_facets(tmp_path):
    values = np.random.default_rng(0).normal(size=(2, 3, 4))  # [batch, rows, cols]
    tokens = ["The", " cat", " sat", " down"]
    fig = plot.imshow(values, batch=1, x=tokens, y=["L0", "L1", "L2"], labels={"x": "position", "y": "layer"},
                      title="patched", path=tmp_path / "im.png", renderer="png")
    assert (tmp_path / "im.png").stat().st_size > 1000
    ax, bar = fig.axes  # the heatmap and its colour bar
    assert ticks(ax) == ["The", "\u2423cat", "\u2423sat", "\u2423down"] and ticks(ax, "y") == ["L0", "L1", "L2"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("position", "layer", "patched")
    np.testing.assert_array_equal(ax.images[0].get_array(), values[1])
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi == -np.abs(values).max()  # centred on 0, over the whole input
    fig = plot.imshow(values, facet_col=1, facet_labels=["a", "b", "c"], xaxis="key", title="heads")
    panels = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in panels] == ["a", "b", "c"] and fig._suptitle.get_text() == "heads"
    np.testing.assert_array_equal(panels[2].images[0].get_array(), values[:, 2])
    with pytest.raises(ValueError, match="batch=i"):
        plot.imshow(values)
    with pytest.raises(ValueError, match="3 x labels for 4 columns"):
        plot.imshow(values[0], x=tokens[:3])


def test_line_and_scatter(tmp_path):
    values = np.arange(12.0).reshape(2, 2, 3)  # [batch, lines, points]
    fig = plot.line(values, batch=1, x=["embed", "0_attn_out", "0_mlp_out"], line_labels=["clean", "corrupt"],
                    xaxis="component", yaxis="logit diff", path=tmp_path / "line.png")
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.get_lines()] == ["clean", "corrupt"]
    np.testing.assert_array_equal(ax.get_lines()[1].get_ydata(), values[1, 1])
    assert ticks(ax) == ["embed", "0_attn_out", "0_mlp_out"] and ax.get_ylabel() == "logit diff"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["clean", "corrupt"]
    fig = plot.line(np.array([1.0, 3.0, 2.0]), x=[0.5, 1.0, 1.5])
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_xdata(), [0.5, 1.0, 1.5])

    xs, ys = np.array([[0.0, 1, 2], [3, 4, 5]]), np.array([[5.0, 6, 7], [8, 9, 10]])
    fig = plot.scatter(xs, ys, batch=0, text=["L0H0", "L0H1", "L1H0"], color=[1, 2, 3], caxis="layer",
                       xaxis="attribution", yaxis="patching", path=tmp_path / "scatter.png")
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), np.stack([xs[0], ys[0]], 1))
    assert [t.get_text() for t in ax.texts] == ["L0H0", "L0H1", "L1H0"] and len(fig.axes) == 2
    assert fig.axes[1].get_ylabel() == "layer" and ax.get_xlabel() == "attribution"
    with pytest.raises(ValueError, match="2 point labels for 3 points"):
        plot.scatter(xs[0], ys[0], text=["a", "b"])


def test_scatter_facets_as_the_attribution_demo_draws_them(tmp_path):
    """``scatter(y=act, x=attr, facet_col=0, facet_labels=[...])``: one panel per row of the stacked
    sweeps (output, query, key, value, pattern), each drawing its own points."""
    rng = np.random.default_rng(0)
    attr, act = rng.normal(size=(5, 2, 4)), rng.normal(size=(5, 2, 4))  # [sweep, layer, head]
    names = ["Output", "Query", "Key", "Value", "Pattern"]
    fig = plot.scatter(y=act, x=attr, facet_col=0, facet_labels=names, xaxis="attribution",
                       yaxis="activation patching", title="heads", path=tmp_path / "facets.png")
    panels = fig.axes
    assert [a.get_title() for a in panels] == names and fig._suptitle.get_text() == "heads"
    for i, ax in enumerate(panels):
        np.testing.assert_array_equal(ax.collections[0].get_offsets(), np.stack([attr[i].ravel(), act[i].ravel()], 1))
    with pytest.raises(ValueError, match="4 facet_labels for 5 panels"):
        plot.scatter(attr, act, facet_col=0, facet_labels=names[:4])


def test_attention_patterns_flat_heads_and_batch(model, tmp_path):
    tokens = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    _, cache = model.run_with_cache(tokens)
    str_tokens = [model.to_str_tokens(row) for row in tokens]
    n_head = model.cfg.n_head
    fig = plot.attention_patterns(cache, str_tokens, [1, n_head + 3, (0, 2)], batch=1, path=tmp_path / "a.png")
    panels = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in panels] == ["L0H1", "L1H3", "L0H2"]
    drawn = panels[1].images[0].get_array()  # the pattern, with the cells above the diagonal masked
    np.testing.assert_array_equal(drawn.filled(np.nan)[np.tril_indices(4)], cache["pattern", 1][1, 3][np.tril_indices(4)])
    assert np.ma.getmaskarray(drawn)[np.triu_indices(4, 1)].all()
    assert ticks(panels[0]) == [t.replace(" ", "\u2423") for t in str_tokens[1]]
    fig = plot.attention_patterns({0: cache["pattern", 0]}, str_tokens[0], 2)  # one flat index, a dict
    assert [a.get_title() for a in fig.axes if a.images] == ["L0H2"]
    page = plot.attention_html(cache["pattern", 1], str_tokens, 1, batch=1)
    single = plot.attention_html(cache["pattern", 1][1], str_tokens[1], 1)
    assert page == single
