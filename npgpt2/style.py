"""The pictures' visual language, in one place: colours, the sign convention, token labels, titles.

Every picture npgpt2 draws, as a matplotlib figure or as an HTML page, takes its colours and its
labels from here, so that one colour means one thing everywhere:

- **Signed quantities** (attributions, logit differences, saliency scores, edge scores, W^T W):
  one diverging map, ColorBrewer's RdBu, centred on 0 (white) and symmetric around it.
  **Positive is blue, negative is red.** That is how the TransformerLens and ARENA demos draw
  them (plotly's ``RdBu`` with ``color_continuous_midpoint=0``), so a picture read there reads
  the same here; and "more" is blue in both of npgpt2's maps.
- **Quantities on 0..1** (probabilities, attention weights): one sequential map, ColorBrewer's
  Blues, always on the fixed scale 0..1 (never rescaled to the data, never -1..1), so that two
  pictures' shades compare.
- **Non-negative magnitudes** (a feature's activation on a token): the positive half of the
  diverging map, scaled to the largest value shown.

The maps are lists of colour stops; matplotlib colormaps (``diverging_cmap``, ``sequential_cmap``)
and the HTML colours (``diverging_rgb``, ``sequential_rgb``, and ``JS_COLOURS`` for pages that shade
in the browser) interpolate the same stops linearly, so a PNG and a page give a value one colour.
"""

from __future__ import annotations

import functools
import json

# ColorBrewer RdBu, 11 classes, from the most negative (dark red) through 0 (near white) to the
# most positive (dark blue).
DIVERGING_STOPS = ("#67001f", "#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7",
                   "#d1e5f0", "#92c5de", "#4393c3", "#2166ac", "#053061")
# ColorBrewer Blues, 9 classes, from 0 (near white) to 1 (dark blue).
SEQUENTIAL_STOPS = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6",
                    "#2171b5", "#08519c", "#08306b")
POSITIVE = DIVERGING_STOPS[-2]  # a line, bar or edge with a positive value
NEGATIVE = DIVERGING_STOPS[1]   # ... and with a negative one
NEUTRAL = "#9a9a9a"             # drawn, but not a value (empty nodes, masked cells)
MASKED = "#ececec"              # a cell with no value (attention to the future, no next token)

SIGN_CONVENTION = "positive blue, negative red, 0 white"


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _interpolate(stops, t: float) -> tuple[int, int, int]:
    """The colour at t in [0, 1] along ``stops`` (clipped), each channel rounded half up."""
    t = min(max(float(t), 0.0), 1.0) if t == t else 0.0
    x = t * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    a, b = _rgb(stops[i]), _rgb(stops[i + 1])
    f = x - i
    return tuple(int(ca + (cb - ca) * f + 0.5) for ca, cb in zip(a, b))


def sequential_rgb(value: float) -> str:
    """The CSS colour of a value on 0..1 (a probability, an attention weight): 'rgb(r, g, b)'."""
    return "rgb({}, {}, {})".format(*_interpolate(SEQUENTIAL_STOPS, value))


def diverging_rgb(value: float, bound: float) -> str:
    """The CSS colour of a signed value on -bound..bound: blue positive, red negative, white 0."""
    bound = float(bound) if bound and bound > 0 else 1.0
    return "rgb({}, {}, {})".format(*_interpolate(DIVERGING_STOPS, 0.5 + 0.5 * float(value) / bound))


def text_colour_on(rgb: str) -> str:
    """Black or white, whichever reads on the background ``rgb`` ('rgb(r, g, b)')."""
    r, g, b = (int(x) for x in rgb[4:-1].split(","))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "black"


# The same interpolation in JavaScript, for pages that shade in the browser: seq(w) and div(v, bound).
JS_COLOURS = (
    "const NPGPT2_STOPS = " + json.dumps({"seq": [_rgb(c) for c in SEQUENTIAL_STOPS],
                                          "div": [_rgb(c) for c in DIVERGING_STOPS]}) + ";\n"
    "function npgpt2Colour(stops, t) {\n"
    "  t = Math.min(Math.max(t, 0), 1); const x = t * (stops.length - 1);\n"
    "  const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;\n"
    "  const c = stops[i].map((a, k) => Math.floor(a + (stops[i + 1][k] - a) * f + 0.5));\n"
    "  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;\n"
    "}\n"
    "const seq = w => npgpt2Colour(NPGPT2_STOPS.seq, w);\n"
    "const div = (v, bound) => npgpt2Colour(NPGPT2_STOPS.div, 0.5 + 0.5 * v / (bound > 0 ? bound : 1));\n")


def diverging_cmap():
    """The diverging map as a matplotlib colormap (positive blue); masked values light grey."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("npgpt2_diverging", DIVERGING_STOPS, N=256).with_extremes(bad=MASKED)


def sequential_cmap():
    """The 0..1 map as a matplotlib colormap; masked values light grey."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("npgpt2_sequential", SEQUENTIAL_STOPS, N=256).with_extremes(bad=MASKED)


# ------------------------------------------------------------------------------------ labels
WHITESPACE_MARKERS = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}  # ␣ ↵ ⇥ ␍


def token_label(token) -> str:
    """A token as a label: whitespace made visible (space ␣, newline ↵, tab ⇥, return ␍); the
    text is otherwise the token's own. ``" cat"`` -> ``"␣cat"``. (HTML escaping is the page's
    job; matplotlib labels go through ``drawable`` too.)"""
    return "".join(WHITESPACE_MARKERS.get(ch, ch) for ch in str(token))


def short_label(token, width: int) -> str:
    """``token_label(token)`` cut to at most ``width`` characters, the cut marked with an ellipsis."""
    label = token_label(token)
    return label if len(label) <= width else label[: width - 1] + "\u2026"


@functools.lru_cache(maxsize=None)
def _font_files() -> tuple:
    """The font files matplotlib would draw a sans-serif label with (its family list, in order)."""
    import matplotlib
    from matplotlib import font_manager

    files = []
    for name in matplotlib.rcParams["font.sans-serif"]:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
        except ValueError:
            continue
        if path not in files:
            files.append(path)
    return tuple(files)


@functools.lru_cache(maxsize=4096)
def _has_glyph(ch: str) -> bool:
    from matplotlib import ft2font

    for path in _font_files():
        if ft2font.FT2Font(path).get_char_index(ord(ch)):
            return True
    return False


def drawable(text: str) -> str:
    """``text`` with every character that no installed font of matplotlib's can draw written as its
    code point, ``\\u4e2d``, instead of an empty box; so is a control character. (Install a CJK
    font, e.g. Noto Sans CJK, and add it to ``rcParams["font.sans-serif"]``, to see the characters.)"""
    return "".join(ch if ch.isprintable() and (ch.isascii() or _has_glyph(ch)) else f"\\u{ord(ch):04x}"
                   for ch in str(text))


def tick_label(token) -> str:
    """A token as a matplotlib tick label: ``drawable(token_label(token))``."""
    return drawable(token_label(token))


def head_name(layer: int, head: int) -> str:
    """The name of a head, as the field writes it: layer 5, head 3 -> ``L5H3``."""
    return f"L{layer}H{head}"


def title(*parts) -> str:
    """A picture's title from its parts (the model, the layer or head, the metric), skipping empty
    ones: ``title("gpt2", "L5H3", "attention")`` -> ``"gpt2 · L5H3 · attention"``."""
    return " · ".join(str(p) for p in parts if p not in (None, ""))
