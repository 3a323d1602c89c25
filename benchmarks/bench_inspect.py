"""npgpt2 inspect's speed: each interaction of the page against the plain forward pass of the same
prompt, in one run, on randomly initialised gpt2-small-shaped weights and a 20-token prompt.

Every interaction is timed as the page makes it, an HTTP request to the server (in this process,
on 127.0.0.1) with its JSON answer:

    prompt analysis     POST /api/analyse and /api/layer (the forward with its cache, the next-token
                        table, the loss, the logit lens at the last depth) and the direct effects
                        (direct_logit_attribution by head), the prompt's run not yet cached (the
                        corrupted prompt's is: it runs when it changes; both new is printed too)
                                                                                              <= 3 forwards
    total effects       POST /api/components: attribution patching's estimate for every head and MLP
                        (one forward and backward pass on the clean prompt; the corrupted run cached
                        by the analysis before it)                                            <= 4
    intervention        POST /api/intervene, one head patched from the corrupted prompt       <= 1.5
    first page usable   from the server's start (model loaded) to the page in Chromium having read
                        /api/info and drawn its controls                                      < 1 s

    python benchmarks/bench_inspect.py [--repeats 5]

On a machine others share, OPENBLAS_NUM_THREADS=1 in the environment gives steadier ratios (two
BLAS threads fighting for busy cores slow the small products of a 20-token forward pass many times).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import time

import npgpt2
from npgpt2.analysis import direct_logit_attribution
from npgpt2.inspect.server import Server
from common import describe_machine, gpt2_small_folder, interleaved

PROMPT = "When Mary and John went to the store on sunny day, John gave a bottle of milk to"
CORRUPTED = "When Alice and Bob went to the store on sunny day, Carl gave a bottle of milk to"


def request(server, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    headers = {"Host": f"127.0.0.1:{server.port}", "Authorization": f"token {server.token}"}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn.request("POST" if data is not None else "GET", path, body=data, headers=headers)
    r = conn.getresponse()
    out = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: {r.status} {out}")
    return out


def first_page_seconds(model, chromium: str) -> float:
    """Seconds from Server(...) to the page in Chromium ready (the browser already running)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto("about:blank")
        start = time.perf_counter()
        server = Server(model, port=0).start_in_thread()
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']")
        seconds = time.perf_counter() - start
        browser.close()
        server.stop()
    return seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--folder")
    args = ap.parse_args(argv)
    model = npgpt2.from_pretrained(gpt2_small_folder(args.folder))
    tokens = model.to_tokens(PROMPT, prepend_bos=True)
    assert tokens.shape[1] == 20 == model.to_tokens(CORRUPTED, prepend_bos=True).shape[1], tokens.shape
    body = {"prompt": PROMPT, "corrupted": CORRUPTED, "target": " Mary", "distractor": " John", "prepend_bos": True}
    server = Server(model, port=0).start_in_thread()
    runs = server.inspector.runs

    corrupted = model.to_tokens(CORRUPTED, prepend_bos=True)

    def analysis(both_new=False):
        runs.forget(tokens)  # the prompt is new to the server; the corrupted prompt's run is there from
        if both_new:         # before (made when it was typed), unless both are new
            runs.forget(corrupted)
        request(server, "/api/analyse", body)
        request(server, "/api/layer", {**body, "depth": model.cfg.n_layer})
        _, cache = runs.get(tokens)
        direct_logit_attribution(model, cache, tokens, " Mary", " John", by="head")

    def warm():
        runs.get(tokens), runs.get(corrupted)

    def components():
        warm()
        request(server, "/api/components", body)

    def intervention():
        warm()
        request(server, "/api/intervene", {**body, "interventions": [{"component": "L9H6", "method": "patch"}]})

    times = interleaved({"forward": lambda: model(tokens), "analysis": analysis, "components": components,
                         "intervention": intervention, "both new": lambda: analysis(both_new=True)}, args.repeats)
    server.stop()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    page = first_page_seconds(model, chromium) if chromium else None

    print(f"npgpt2 inspect on gpt2-small's shape (random weights), a {tokens.shape[1]}-token prompt; "
          f"median of {args.repeats}")
    print(describe_machine())
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    f = times["forward"]
    print(f"{'plain forward pass':<22} {f * 1e3:8.1f} ms")
    for name, target in (("analysis", 3), ("components", 4), ("intervention", 1.5)):
        ratio = times[name] / f
        label = {"analysis": "prompt analysis", "components": "total effects", "intervention": "one intervention"}[name]
        print(f"{label:<22} {times[name] * 1e3:8.1f} ms  {ratio:5.2f} forwards (target <= {target}): "
              f"{'met' if ratio <= target else 'NOT met'}")
    print(f"{'(analysis, both new)':<22} {times['both new'] * 1e3:8.1f} ms  {times['both new'] / f:5.2f} forwards: "
          "a new corrupted prompt adds its own forward pass")
    if page is None:
        print("first page usable: chromium not installed, not measured")
    else:
        print(f"{'first page usable':<22} {page * 1e3:8.1f} ms  after the server starts (target < 1000 ms): "
              f"{'met' if page < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
