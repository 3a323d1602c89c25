"""Screenshots of ``npgpt2 inspect`` for the documentation, from the trained induction model.

    python docs/make_screenshots.py                 # writes docs/images/inspect-*.png
    python docs/make_screenshots.py --model FOLDER  # another checkpoint folder

The inspector is started on ``npgpt2.zoo.induction()`` (built on first use, then cached) and driven
in Chromium (Playwright, the system's /usr/bin/chromium) as a reader would: a run of words and its
repeat as the prompt, the word that comes next as the target, the same run with its first half
replaced as the corrupted prompt; then every view in turn. The head shown in the attention view and
ablated in the interventions view is the one that scores highest as an induction head on this
prompt, found here (``make_pictures.head_scores``), not named by hand.

``pytest -m docs`` runs this script before it builds the site; ``inspect-screenshots.json`` lists
what was written, from which model and prompt, and what the page showed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "images")
VIEWS = ("prompt", "layers", "attention", "components", "interventions", "circuit")
SHOTS = tuple(f"inspect-{v}.png" for v in VIEWS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=IMAGES, help="folder for the screenshots (default: docs/images)")
    p.add_argument("--model", default=None, help="a checkpoint folder instead of npgpt2.zoo.induction()")
    args = p.parse_args(argv)

    import npgpt2
    from npgpt2 import zoo
    from npgpt2.inspect.server import Server
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, HERE)
    from make_pictures import head_scores

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("make_screenshots: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    model = npgpt2.from_pretrained(args.model) if args.model else zoo.induction(progress=False)
    n_words, period, prefix = len(zoo.WORDS), 7, 2
    tokens = zoo.repeated_batch(np.random.default_rng(0), batch=1, period=period, prefix=prefix, n_words=n_words,
                                bos=n_words)[0]
    start = 1 + prefix + period  # the repeat's first position
    words = model.to_str_tokens(tokens)[1:]  # each with its leading space
    prompt, target = "".join(words[:-1]).strip(), words[-1]  # the last word is left for the model
    others = [model.tokenizer.token_str(w) for w in range(n_words) if w not in set(tokens.tolist())]
    corrupted = "".join(words[:prefix] + others[:period] + words[prefix + period:-1]).strip()
    distractor = others[period]
    _, cache = model.run_with_cache(model.to_tokens(prompt, prepend_bos=True))
    scores = np.stack([head_scores(cache["pattern", l][0], start, period)[1] for l in range(model.cfg.n_layer)])
    layer, head = (int(i) for i in np.unravel_index(scores.argmax(), scores.shape))
    name = f"L{layer}H{head}"

    os.makedirs(args.out, exist_ok=True)
    written, shown = {}, {}
    server = Server(model, port=0).start_in_thread()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")
            idle = "!document.body.classList.contains('busy')"

            def view(v):
                page.click(f"#tabs button[data-view={v}]")
                page.wait_for_function(idle)

            def shot(v):
                file = f"inspect-{v}.png"
                page.screenshot(path=os.path.join(args.out, file), full_page=False)
                written[file] = os.path.getsize(os.path.join(args.out, file))

            page.fill("#prompt", prompt)
            page.fill("#target", target)
            page.fill("#distractor", distractor)
            page.fill("#corrupted", corrupted)
            page.click("#run")
            page.wait_for_function("document.querySelectorAll('#tokens .token').length > 0 && " + idle)
            shown["metric"] = page.inner_text("#metric-value")
            shot("prompt")
            view("layers")
            shot("layers")
            view("attention")
            page.select_option("#attn-layer", str(layer))
            page.wait_for_function(f"document.querySelector('#head-grid .head span').textContent === 'L{layer}H0'")
            page.click(f"#head-grid .head[data-head='{head}']")
            page.wait_for_function(f"document.querySelector('#head-title').textContent.startsWith('{name}:') && " + idle)
            q = len(tokens) - 2  # the last query of the prompt: it should look one past the earlier copy of its word
            k = q - period + 1
            page.hover(f"#pattern .cell[data-q='{q}'][data-k='{k}']")
            shown["attention"] = page.inner_text("#attn-readout")
            shot("attention")
            view("components")
            page.wait_for_selector(f"#components tr[data-component='{name}']")
            shot("components")
            page.click(f"#components tr[data-component='{name}'] button[data-method='zero']")
            page.wait_for_function("document.querySelector('#int-change') && " + idle)
            shown["ablation"] = page.inner_text("#intervention-result")
            shot("interventions")
            view("circuit")
            page.click("#circuit-run")
            page.wait_for_function("document.querySelector('#circuit-state').textContent === 'done'", timeout=600_000)
            page.eval_on_selector("#threshold", "e => { e.value = 150; e.dispatchEvent(new Event('input')); }")
            shown["circuit"] = page.inner_text("#threshold-label")
            shot("circuit")
            browser.close()
    finally:
        server.stop()

    record = {"model": model.name, "prompt": prompt, "target": target, "distractor": distractor,
              "corrupted": corrupted, "induction_head": name, "induction_score": round(float(scores.max()), 4),
              "shown": shown, "files": written}
    with open(os.path.join(args.out, "inspect-screenshots.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
    print(f"{len(written)} screenshots of npgpt2 inspect on {model.name} written to {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
