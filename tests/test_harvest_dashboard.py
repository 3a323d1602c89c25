"""Dashboards of a harvest, opened in headless Chromium from disk: the index sorts and filters as
asked, each feature page has its rows, and a screenshot shows something."""

import html
import os
import re
import subprocess

import numpy as np
import pytest

from npgpt2 import style
from npgpt2.harvest import harvest
from npgpt2.harvest.dashboard import build_dashboard, direct_logit_effect, parse_features
from npgpt2.harvest.run import HarvestError
from npgpt2.sae import SAE, latent_logit_effect

pytest.importorskip("pyarrow", reason="the harvest writes Parquet (pip install -e '.[test]')")
from browser import render, screenshot  # noqa: E402
from test_harvest import HOOK, KW, TEXTS  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
PAGES = [0, 1, 2, 5]


@pytest.fixture(scope="module")
def site(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    h = harvest(TEXTS, model, HOOK, out=str(root / "h"), shard_contexts=8, **KW)
    pages = build_dashboard(str(root / "h"), str(root / "site"), features=PAGES, model=model, progress=False)
    return h, pages, root / "site"


def chromium(tmp_path, *args):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"headless Chromium is not installed at {CHROMIUM} (.ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    proc = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_pages_quote_the_harvest_and_recompute_its_values(site, model):
    h, pages, folder = site
    assert sorted(os.listdir(folder)) == sorted(["index.html"] + [f"feature-{f}.html" for f in PAGES])
    # the neighbours' shading is computed again with the model; at the quoted token it is the harvest's value
    assert (pages["max_recomputed_error"] <= 1e-5).all()
    assert list(pages["n_top"]) == [len(h.top.query("feature == @f")) for f in PAGES]
    text = (folder / "feature-1.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert links and all(link.startswith(("feature-", "index.html")) for link in links)  # offline: nothing fetched
    # the neuron's logit effect is W_out[neuron] x ln_final gain @ W_U
    direction = model.weights.blocks[1].W_out[1] * model.weights.ln_final_w
    np.testing.assert_allclose(direct_logit_effect(model, HOOK, 1), direction.astype(np.float64) @ model.W_U.astype(np.float64), atol=1e-6)


def test_sae_latent_pages_use_latent_logit_effect(model, tmp_path):
    rng = np.random.default_rng(7)
    d, n = model.cfg.d_model, 8
    hook = "blocks.1.hook_resid_pre"
    sae = SAE(rng.normal(0, 0.3, (d, n)).astype(np.float32), rng.normal(-0.3, 0.1, n).astype(np.float32),
              rng.normal(0, 0.3, (n, d)).astype(np.float32), np.zeros(d, np.float32), hook_name=hook)
    sae.save(str(tmp_path / "sae" / hook))
    h = harvest(TEXTS[:20], model, sae=f"{tmp_path / 'sae'}:{hook}", out=str(tmp_path / "h"), **KW)
    latent = int(h.features.sort_values("max")["feature"].iloc[-1])
    pages = build_dashboard(str(tmp_path / "h"), str(tmp_path / "site"), features=[latent], model=model, progress=False)
    assert (pages["max_recomputed_error"] <= 1e-5).all()
    text = (tmp_path / "site" / f"feature-{latent}.html").read_text()
    assert f"latent {latent}" in text
    want = latent_logit_effect(model, sae, latent, 10)
    shown = re.findall(r'<tr class="logit-(\w+)"><td class="l">(.*?)</td>', text)
    assert [d for d, _ in shown] == list(want["direction"])
    assert [html.unescape(t) for _, t in shown] == [repr(t) for t in want["token"]]


def test_index_sorts_and_filters_in_chromium(site, tmp_path):
    h, _, folder = site
    url = (folder / "index.html").as_uri()
    dom = chromium(tmp_path, "--dump-dom", url + "?sort=max")
    order = [int(f) for f in re.findall(r'<tr class="feature-row" data-feature="(\d+)"', dom)]
    want = h.features.sort_values(["max", "feature"], ascending=[False, True])["feature"].tolist()
    assert order == want
    dom = chromium(tmp_path, "--dump-dom", url + "?sort=density&order=asc&q=1")
    rows = re.findall(r'<tr class="feature-row" data-feature="(\d+)"[^>]*?(style="display: none;")?>', dom)
    shown = [int(f) for f, hidden in rows if not hidden]
    want = h.features[h.features["feature"].astype(str).str.startswith("1")]
    assert shown == want.sort_values(["density", "feature"])["feature"].tolist()
    assert f"{len(shown)} of {len(h.features)} features" in dom


def test_feature_page_rows_and_screenshot_in_chromium(site, tmp_path):
    h, _, folder = site
    url = (folder / "feature-2.html").as_uri()
    dom = chromium(tmp_path, "--dump-dom", url)
    n_top, n_ex = len(h.top.query("feature == 2")), len(h.examples.query("feature == 2"))
    assert dom.count('class="top-row"') == n_top > 0
    assert dom.count('class="band-row"') == n_ex > 0
    assert dom.count('class="tok hot"') == n_top + n_ex  # one activating token per quoted context
    assert dom.count('class="logit-promoted"') == dom.count('class="logit-suppressed"') == 10
    assert dom.count('class="bar"') == int((h.histogram.query("feature == 2")["lo"] >= 0).sum())
    # kept as a CI artefact, and looked at: the histogram's bars and the shaded tokens are drawn in
    # the positive colour of npgpt2.style
    png = screenshot((folder / "feature-2.html").read_text(encoding="utf-8"), "dashboard-feature-2", size=(1000, 1200))
    import matplotlib.image

    pixels = matplotlib.image.imread(png)[..., :3]  # [h, w, rgb] in 0..1
    assert pixels.shape[0] > 100 and pixels.std() > 0.05
    positive = np.array([int(style.POSITIVE[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    assert (np.abs(pixels - positive).max(-1) < 0.04).sum() > 500


ALIGNMENT = """
const tables = Array.from(document.querySelectorAll("table.contexts"));
const centres = tables.map(t => Array.from(t.querySelectorAll(".tok.hot")).map(s => {
    const r = s.getBoundingClientRect(); return [r.left, r.right]; }));
const cells = tables.map(t => Array.from(t.querySelectorAll("td.at")).map(td => {
    const r = td.getBoundingClientRect(); return [r.left, r.right]; }));
const overflow = Array.from(document.querySelectorAll("td, th, h1, h2, h3, p")).filter(e =>
    e.scrollWidth > e.clientWidth + 1).map(e => e.textContent.slice(0, 40));
const svg = document.querySelector("#histogram").getBoundingClientRect();
Array.from(document.querySelectorAll("#histogram text")).forEach(t => { const b = t.getBoundingClientRect();
    if (b.left < svg.left - 0.5 || b.right > svg.right + 0.5 || b.top < svg.top - 0.5 || b.bottom > svg.bottom + 0.5)
        overflow.push(t.textContent); });
return {centres, cells, overflow,
        xticks: Array.from(document.querySelectorAll("#histogram text.xtick")).map(t => t.textContent),
        yticks: Array.from(document.querySelectorAll("#histogram text.ytick")).map(t => t.textContent),
        values: Array.from(document.querySelectorAll("td.val")).map(t => t.textContent),
        stats: Array.from(document.querySelectorAll("#stats tr")).map(r => r.cells[1].textContent)};
"""


def test_feature_page_contexts_line_up_and_numbers_share_a_precision(site):
    h, _, folder = site
    _, r = render((folder / "feature-2.html").read_text(encoding="utf-8"), ALIGNMENT)
    assert r["centres"] and all(r["centres"])
    for cells in r["cells"]:  # every row's activating token sits in the same column of its table
        assert max(c[0] for c in cells) - min(c[0] for c in cells) < 0.5, cells
    assert not r["overflow"], r["overflow"]
    # the histogram has a real axis: several labelled ticks, increasing, and counts up the side
    ticks = [float(t) for t in r["xticks"]]
    assert len(ticks) >= 3 and ticks == sorted(ticks)
    top = int(h.histogram.query("feature == 2 and lo >= 0")["count"].max())
    assert [int(t.replace(",", "")) for t in r["yticks"]] == [0, round(top / 2), top]
    # one number of decimals for every activation on the page (the quoted values, the stats, the ticks)
    decimals = {len(v.split(".")[1]) if "." in v else 0 for v in r["values"] + r["stats"][2:] + r["xticks"]}
    assert len(decimals) == 1, decimals
    expected = h.top.query("feature == 2").sort_values("rank")["value"].tolist()
    d = decimals.pop()
    assert r["values"][:len(expected)] == [f"{v:.{d}f}" for v in expected]


def test_feature_lists():
    assert parse_features("0-3,7, 2") == [0, 1, 2, 3, 7]
    for bad in ("a-3", "5-2", ""):
        with pytest.raises(HarvestError):
            parse_features(bad)
