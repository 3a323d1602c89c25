"""npgpt2 inspect: the server's rules (token, Host), its answers to bad input, and its numbers against
the model run by hand in Python (run_with_hooks with hooks written here); then the page itself in
a real browser (Playwright driving the system's Chromium).
"""

from __future__ import annotations

import http.client
import json
import os
import threading

import numpy as np
import pytest

from npgpt2.inspect import Inspector
from npgpt2.inspect.api import Cancelled
from npgpt2.inspect.server import Server

from browser import CHROMIUM, SCREENSHOTS

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Alice and Bob went to the store, Carl gave a drink to"
REQUEST = {"prompt": CLEAN, "target": " Mary", "distractor": " John", "corrupted": CORRUPTED}


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, port=0).start_in_thread()
    yield s
    s.stop()


def call(server, method, path, body=None, token=True, host=None, raw=None, headers=None):
    """(status, parsed JSON) of one request to the server."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    h = {"Host": host or f"127.0.0.1:{server.port}"}
    if token:
        h["Authorization"] = f"token {server.token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is not None:
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    out = r.read()
    conn.close()
    return r.status, json.loads(out) if out[:1] in (b"{", b"[") else out


def post(server, action, **fields):
    return call(server, "POST", f"/api/{action}", {**REQUEST, **fields})


# ----------------------------------------------------------------------------------- hand-made runs
def metric_by_hand(model, logits):
    """logit[' Mary'] - logit[' John'] at the last position."""
    return float(logits[0, -1, model.to_single_token(" Mary")] - logits[0, -1, model.to_single_token(" John")])


def tokens_of(model, text):
    return model.to_tokens(text, prepend_bos=True)


def zero_head(layer, head):
    def hook(z, point):
        z = z.copy()
        z[:, :, head] = 0.0
        return z
    return f"blocks.{layer}.attn.hook_z", hook


# ----------------------------------------------------------------------------------- the rules
def test_a_request_without_the_token_is_refused_and_one_with_it_is_answered(server):
    status, body = call(server, "GET", "/api/info", token=False)
    assert status == 401 and "token" in body["error"]
    status, body = call(server, "GET", "/api/info", token=False, headers={"Authorization": "token nope"})
    assert status == 403 and "wrong token" in body["error"]
    status, body = call(server, "POST", "/api/analyse", REQUEST, token=False)
    assert status == 401
    status, body = call(server, "GET", "/", token=False)
    assert status == 401
    status, body = call(server, "GET", f"/api/info?token={server.token}", token=False)
    assert status == 200 and body["n_layer"] == 2
    status, body = call(server, "GET", "/api/info")
    assert status == 200 and body["n_head"] == 4


def test_the_host_header_must_name_this_server(server):
    status, body = call(server, "GET", "/api/info", host=f"attacker.example:{server.port}")
    assert status == 403 and "attacker.example" in body["error"]
    status, body = call(server, "GET", "/api/info", host="127.0.0.1:1")  # the right name, another port
    assert status == 403
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}"):
        assert call(server, "GET", "/api/info", host=host)[0] == 200


def test_a_cross_site_origin_and_a_form_body_are_refused(server):
    status, body = call(server, "POST", "/api/analyse", REQUEST, headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in body["error"]
    status, body = call(server, "POST", "/api/analyse", raw=b"prompt=x",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and "application/json" in body["error"]


def test_ip_given_on_purpose_accepts_any_host(model):
    s = Server(model, port=0, ip="127.0.0.1").start_in_thread()
    try:
        assert call(s, "GET", "/api/info", host="my-machine.lan:80")[0] == 200
        assert call(s, "GET", "/api/info", host="my-machine.lan:80", token=False)[0] == 401
    finally:
        s.stop()


def test_the_page_sets_a_cookie_its_files_are_fetched_with(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", f"/?token={server.token}", headers={"Host": f"127.0.0.1:{server.port}"})
    r = conn.getresponse()
    page = r.read().decode()
    cookie = r.getheader("Set-Cookie")
    assert r.status == 200 and "<title>npgpt2 inspect</title>" in page
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    conn.request("GET", "/static/colours.js", headers={"Host": f"127.0.0.1:{server.port}",
                                                       "Cookie": cookie.split(";")[0]})
    r = conn.getresponse()
    js = r.read().decode()
    from npgpt2 import style

    assert r.status == 200 and style.JS_COLOURS in js  # the colour stops of npgpt2.style, not a copy
    conn.close()
    assert call(server, "GET", "/static/..%2Fserver.py")[0] == 404  # no file outside the page's own
    assert call(server, "GET", "/static/server.py")[0] == 404


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fields, status, says", [
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": "word " * 80}, 400, "n_ctx=64"),
    ({"target": " Marygold-unknownish"}, 400, "target ' Marygold-unknownish' is"),
    ({"distractor": " John and"}, 400, "distractor ' John and' is 2 tokens"),
    ({"prompt": 5}, 400, "prompt=5 is an integer: expected a string"),
    ({"prepend_bos": "yes"}, 400, "prepend_bos='yes'"),
    ({"corrupted": "Alice"}, 400, "same number of tokens"),
])
def test_bad_fields_get_a_400_naming_them_and_the_server_goes_on(server, fields, status, says):
    got, body = post(server, "analyse", **fields)
    assert got == status and says in body["error"], body
    assert post(server, "analyse")[0] == 200


@pytest.mark.parametrize("action, fields, says", [
    ("intervene", {"interventions": [{"component": "L9H0"}]}, "layer 9 is out of range 0..1"),
    ("intervene", {"interventions": [{"component": "L0H1", "method": "scramble"}]}, "method='scramble'"),
    ("intervene", {"interventions": ["L0H1"]}, "interventions[0]='L0H1' is a string"),
    ("intervene", {"interventions": [{"component": "S3"}]}, "no SAE was loaded"),
    ("intervene", {"corrupted": "", "interventions": [{"component": "L0H1", "method": "patch"}]}, "needs a corrupted prompt"),
    ("layer", {"depth": 3}, "depth=3 is out of range"),
    ("layer", {"depth": True}, "not a boolean"),
    ("attention", {"layer": -1}, "layer=-1 is out of range"),
    ("attention", {"head": 4}, "head=4 is out of range 0..3"),
    ("components", {"method": "resample"}, "method='resample'"),
    ("frobnicate", {}, "no API action 'frobnicate'"),
])
def test_bad_requests_of_each_action(server, action, fields, says):
    got, body = post(server, action, **fields)
    assert got in (400, 404) and says in body["error"], body
    assert post(server, "intervene", interventions=[{"component": "L0H1"}])[0] == 200


def test_malformed_json_and_a_body_that_is_no_object(server):
    status, body = call(server, "POST", "/api/analyse", raw=b'{"prompt": "The cat",')
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = call(server, "POST", "/api/analyse", raw=b'["The cat"]')
    assert status == 400 and "expected an object" in body["error"]
    status, body = call(server, "POST", "/api/analyse", raw=b'\xff\xfe')
    assert status == 400
    assert post(server, "analyse")[0] == 200


def test_unknown_pages_and_jobs_are_404_json(server):
    assert call(server, "GET", "/nowhere")[0] == 404
    status, body = call(server, "GET", "/api/jobs/999999")
    assert status == 404 and "no job" in body["error"]
    status, body = call(server, "GET", "/harvest/index.html")
    assert status == 404 and "--harvest" in body["error"]


# ----------------------------------------------------------------------------------- the numbers
def test_analyse_reads_the_model(server, model):
    status, a = post(server, "analyse")
    tokens = tokens_of(model, CLEAN)
    logits = model(tokens)
    assert status == 200 and a["tokens"] == model.to_str_tokens(tokens)
    assert a["metric"] == pytest.approx(metric_by_hand(model, logits), abs=1e-5)
    assert a["corrupted_metric"] == pytest.approx(metric_by_hand(model, model(tokens_of(model, CORRUPTED))), abs=1e-5)
    logp = logits[0].astype(np.float64) - np.log(np.exp(logits[0].astype(np.float64)).sum(-1, keepdims=True))
    expected_loss = [-logp[j, tokens[0, j + 1]] for j in range(tokens.shape[1] - 1)]
    assert a["loss"][0] is None and np.allclose(a["loss"][1:], expected_loss, atol=1e-4)
    assert a["next_tokens"][0]["id"] == int(logits[0, -1].argmax())
    assert sum(r["prob"] for r in a["next_tokens"]) <= 1 + 1e-9


def test_no_target_means_the_top_next_tokens_logprob(server, model):
    status, a = post(server, "analyse", target="", distractor="")
    logits = model(tokens_of(model, CLEAN))[0, -1].astype(np.float64)
    top = int(logits.argmax())
    assert status == 200 and a["metric"] == pytest.approx(logits[top] - np.log(np.exp(logits).sum()), abs=1e-5)


def test_zero_ablating_a_head_changes_the_metric_as_run_with_hooks_does(server, model):
    status, r = post(server, "intervene", interventions=[{"component": "L1H2", "method": "zero"}])
    tokens = tokens_of(model, CLEAN)
    before = metric_by_hand(model, model(tokens))
    after = metric_by_hand(model, model.run_with_hooks(tokens, fwd_hooks=[zero_head(1, 2)]))
    assert status == 200
    assert r["before"] == pytest.approx(before, abs=1e-5) and r["after"] == pytest.approx(after, abs=1e-5)
    assert r["change"] == pytest.approx(after - before, abs=1e-5) and abs(after - before) > 1e-3
    clean = model(tokens)[0, -1].astype(np.float64)
    first = r["next_tokens"][0]
    assert first["prob_before"] == pytest.approx(np.exp(clean[first["id"]] - np.log(np.exp(clean).sum())), rel=1e-5)


def test_patching_from_the_corrupted_prompt_as_run_with_hooks_does(server, model):
    status, r = post(server, "intervene", interventions=[{"component": "L0H1", "method": "patch"},
                                                         {"component": "mlp1", "method": "patch"}])
    _, corrupted = model.run_with_cache(tokens_of(model, CORRUPTED))

    def from_corrupted(name, index):
        def hook(act, point):
            act = act.copy()
            act[(slice(None), slice(None)) + index] = corrupted[name][(slice(None), slice(None)) + index]
            return act
        return name, hook

    tokens = tokens_of(model, CLEAN)
    after = metric_by_hand(model, model.run_with_hooks(tokens, fwd_hooks=[
        from_corrupted("blocks.0.attn.hook_z", (1,)), from_corrupted("blocks.1.hook_mlp_out", ())]))
    assert status == 200 and r["after"] == pytest.approx(after, abs=1e-5)
    assert r["change"] == pytest.approx(after - metric_by_hand(model, model(tokens)), abs=1e-5)


def test_mean_ablating_a_neuron_uses_its_mean_over_the_positions(server, model):
    status, r = post(server, "intervene", interventions=[{"component": "L0N7", "method": "mean"}])
    tokens = tokens_of(model, CLEAN)
    _, cache = model.run_with_cache(tokens)
    mean = cache["blocks.0.mlp.hook_post"][0, :, 7].mean()

    def hook(post_act, point):
        post_act = post_act.copy()
        post_act[0, :, 7] = mean
        return post_act

    after = metric_by_hand(model, model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", hook)]))
    assert status == 200 and r["after"] == pytest.approx(after, abs=1e-5)


def test_estimated_total_effects_are_the_metrics_slope_times_the_change(model64):
    """Attribution patching's estimate for zero ablation is -(activation . gradient): the derivative of
    the metric along scaling the activation down, taken here by central finite differences."""
    inspector = Inspector(model64)
    c = inspector.components({**REQUEST, "method": "zero", "neurons": True})
    rows = {r["component"]: r for r in c["rows"]}
    tokens = tokens_of(model64, CLEAN)
    eps = 1e-4

    def scaled(name, index, factor):
        def hook(act, point):
            act = act.copy()
            act[(slice(None), slice(None)) + index] *= factor
            return act
        return metric_by_hand(model64, model64.run_with_hooks(tokens, fwd_hooks=[(name, hook)]))

    for component, name, index in (("L1H3", "blocks.1.attn.hook_z", (3,)), ("mlp0", "blocks.0.hook_mlp_out", ()),
                                   ("L1N20", "blocks.1.mlp.hook_post", (20,))):
        slope = (scaled(name, index, 1 + eps) - scaled(name, index, 1 - eps)) / (2 * eps)  # d metric / d scale
        assert rows[component]["total"] == pytest.approx(-slope, rel=1e-5, abs=1e-7), component
    assert c["method"] == "zero" and len(rows) == 2 * (4 + 1) + 2 * model64.cfg.d_mlp
    # an MLP layer's direct effect is its neurons' and its b_out's, the latter put through the final
    # layer norm (its scale frozen) onto the logit difference by hand
    _, cache = model64.run_with_cache(tokens)
    w = model64.weights
    direction = (model64.W_U[:, model64.to_single_token(" Mary")] - model64.W_U[:, model64.to_single_token(" John")])
    b_out = w.blocks[0].b_out
    bias = float(((b_out - b_out.mean()) / cache["ln_final.hook_scale"][0, -1]) @ (direction * w.ln_final_w))
    neurons = sum(r["direct"] for r in c["rows"] if r["component"].startswith("L0N"))
    assert rows["mlp0"]["direct"] == pytest.approx(neurons + bias, rel=1e-9, abs=1e-9)


def test_patch_estimates_are_first_order_in_the_change(model64):
    """The estimate of patching a head from the corrupted run is (corrupted - clean) . gradient: the
    derivative at t = 0 of the metric with the head's z moved t of the way to its corrupted value."""
    inspector = Inspector(model64)
    rows = {r["component"]: r for r in inspector.components(REQUEST)["rows"]}
    _, corrupted = model64.run_with_cache(tokens_of(model64, CORRUPTED))
    _, clean = model64.run_with_cache(tokens_of(model64, CLEAN))
    name, eps = "blocks.0.attn.hook_z", 1e-4

    def moved(t):
        def hook(z, point):
            z = z.copy()
            z[:, :, 2] += t * (corrupted[name][:, :, 2] - clean[name][:, :, 2])
            return z
        return metric_by_hand(model64, model64.run_with_hooks(tokens_of(model64, CLEAN), fwd_hooks=[(name, hook)]))

    assert rows["L0H2"]["total"] == pytest.approx((moved(eps) - moved(-eps)) / (2 * eps), rel=1e-5, abs=1e-7)


def test_direct_effects_add_up_with_the_rest_to_the_logit_difference(server, model):
    """The heads' and MLPs' direct effects, plus the embeddings' and the biases' direct writes computed
    here, add up to the metric (the final layer norm's scale frozen)."""
    status, c = post(server, "components")
    tokens = tokens_of(model, CLEAN)
    _, cache = model.run_with_cache(tokens)
    w = model.weights
    direction = (model.W_U[:, model.to_single_token(" Mary")] - model.W_U[:, model.to_single_token(" John")]) * w.ln_final_w
    scale = cache["ln_final.hook_scale"][0, -1]

    def onto(x):  # a write into the final residual stream, centred and scaled, onto the direction
        return float(((x - x.mean()) / scale) @ direction)

    rest = onto(cache["hook_embed"][0, -1] + cache["hook_pos_embed"][0, -1])
    rest += sum(onto(w.blocks[l].b_O) for l in range(model.cfg.n_layer))  # (b_out is in each MLP's output)
    rest += float(w.ln_final_b @ (model.W_U[:, model.to_single_token(" Mary")] - model.W_U[:, model.to_single_token(" John")]))
    total = sum(r["direct"] for r in c["rows"]) + rest
    assert status == 200 and total == pytest.approx(metric_by_hand(model, model(tokens)), abs=1e-3)


def test_layer_and_attention_read_the_cache(server, model):
    tokens = tokens_of(model, CLEAN)
    _, cache = model.run_with_cache(tokens)
    status, d = post(server, "layer", depth=1)
    assert status == 200 and d["label"] == "after block 0"
    assert [p["norm"] for p in d["positions"]] == pytest.approx(np.linalg.norm(cache["resid_pre", 1][0], axis=-1).tolist(), rel=1e-5)
    x = cache["resid_pre", 1][0].astype(np.float64)  # the lens by hand: the final layer norm, the unembedding
    w = model.weights
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + model.cfg.eps) * w.ln_final_w + w.ln_final_b
    lens = normed @ model.W_U
    assert [p["top"][0]["token"] for p in d["positions"]] == [model.tokenizer.token_str(t) for t in lens.argmax(-1)]
    names = [h["name"] for h in d["hooks"]]
    assert names[0] == "blocks.0.hook_resid_pre" and "blocks.0.attn.hook_pattern" in names
    pattern = cache["blocks.0.attn.hook_pattern"]
    h = d["hooks"][names.index("blocks.0.attn.hook_pattern")]
    assert h["shape"] == list(pattern.shape) and h["max"] == pytest.approx(float(pattern.max()))
    # the lens at the last depth is the model's own prediction
    status, last = post(server, "layer", depth=2)
    assert last["positions"][-1]["top"][0]["token"] == model.tokenizer.token_str(int(model(tokens)[0, -1].argmax()))
    status, a = post(server, "attention", layer=1, head=3)
    assert status == 200 and np.allclose(a["pattern"], cache["pattern", 1][0, 3], atol=5e-5)
    assert np.allclose(a["thumbs"], cache["pattern", 1][0], atol=5e-4)  # a short prompt: every position its own


def test_a_long_prompts_thumbnails_are_block_means(server, model):
    from npgpt2.inspect.api import THUMB

    prompt = " ".join(["the cat sat on the mat and looked at the dog"] * 5)
    tokens = tokens_of(model, prompt)
    n = tokens.shape[1]
    assert THUMB < n <= model.cfg.n_ctx
    status, a = post(server, "attention", prompt=prompt, corrupted="", layer=0, head=1)
    _, cache = model.run_with_cache(tokens)
    pattern = cache["pattern", 0][0]
    block = [j * THUMB // n for j in range(n)]  # each position's block, by hand
    expected = np.zeros((model.cfg.n_head, THUMB, THUMB))
    for q in range(n):
        for k in range(n):
            expected[:, block[q], block[k]] += pattern[:, q, k] / (block.count(block[q]) * block.count(block[k]))
    assert status == 200 and np.array(a["thumbs"]).shape == (model.cfg.n_head, THUMB, THUMB)
    assert np.allclose(a["thumbs"], expected, atol=5e-4) and np.array(a["pattern"]).shape == (n, n)


def test_two_clients_at_once_get_their_own_answers(server, model):
    """Many requests at once from threads, on two prompts and two interventions: each answer is the
    one its own request gets alone."""
    asks = [dict(prompt=CLEAN, interventions=[{"component": "L1H2", "method": "zero"}]),
            dict(prompt="When Tom and Kate went to the park, Kate gave a ball to",
                 corrupted="When Sam and Lily went to the park, Emma gave a ball to",
                 interventions=[{"component": "mlp0", "method": "patch"}])]
    alone = [post(server, "intervene", **ask)[1] for ask in asks]
    results = [None] * 12

    def client(k):
        results[k] = post(server, "intervene", **asks[k % 2])[1]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, r in enumerate(results):
        assert r["after"] == pytest.approx(alone[k % 2]["after"], abs=1e-6)
        assert r["next_tokens"] == alone[k % 2]["next_tokens"] or \
            [x["id"] for x in r["next_tokens"]] == [x["id"] for x in alone[k % 2]["next_tokens"]]
    assert alone[0]["after"] != pytest.approx(alone[1]["after"])


# ----------------------------------------------------------------------------------- jobs
def wait_for(server, job_id, timeout=120):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status, job = call(server, "GET", f"/api/jobs/{job_id}")
        if job["state"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def test_the_circuit_job_gives_edge_attribution_eap_ig(server, model):
    from npgpt2 import metrics
    from npgpt2.analysis import edge_attribution

    status, job = call(server, "POST", "/api/jobs", {**REQUEST, "kind": "circuit", "ig_steps": 3, "top": 20})
    assert status == 200 and job["state"] == "running"
    job = wait_for(server, job["id"])
    assert job["state"] == "done" and job["done"] == job["total"] > 0
    scores = edge_attribution(model, tokens_of(model, CLEAN), tokens_of(model, CORRUPTED),
                              metrics.logit_diff(" Mary", " John"), method="eap-ig", ig_steps=3)
    got = job["result"]["edges"]
    assert len(got) == 20 and job["result"]["n_edges"] == len(scores)
    assert [(e["upstream"], e["downstream"], e["input"]) for e in got] == \
        list(zip(scores["upstream"][:20], scores["downstream"][:20], scores["input"][:20]))
    assert [e["score"] for e in got] == pytest.approx(scores["score"][:20].tolist(), rel=1e-5)


def test_a_circuit_job_can_be_cancelled(server, monkeypatch):
    from npgpt2.analysis import edges

    monkeypatch.setattr(edges, "_IG_ROWS", 1)  # one step per run: many runs, progress after each
    status, job = call(server, "POST", "/api/jobs", {**REQUEST, "kind": "circuit", "ig_steps": 100})
    status, cancelled = call(server, "DELETE", f"/api/jobs/{job['id']}")
    assert status == 200
    job = wait_for(server, job["id"])
    assert job["state"] == "cancelled" and job["result"] is None and job["done"] < job["total"]
    assert post(server, "analyse")[0] == 200


def test_cancelling_stops_the_work_where_it_is(model):
    """The progress callback raising Cancelled stops EAP-IG after the first layer's pass."""
    calls = []

    def progress(done, total):
        calls.append(done)
        raise Cancelled()

    with pytest.raises(Cancelled):
        Inspector(model).circuit(REQUEST, progress=progress)
    assert calls == [1]


def test_a_bad_job_request_fails_before_it_starts(server):
    status, body = call(server, "POST", "/api/jobs", {**REQUEST, "kind": "circuit", "corrupted": ""})
    assert status == 400 and "needs a corrupted prompt" in body["error"]
    status, body = call(server, "POST", "/api/jobs", {**REQUEST, "kind": "circuit", "ig_steps": 0})
    assert status == 400 and "ig_steps=0" in body["error"]
    status, body = call(server, "POST", "/api/jobs", {**REQUEST, "kind": "circuit", "prompt": ""})
    assert status == 400 and "empty" in body["error"]
    status, body = call(server, "POST", "/api/jobs", {**REQUEST, "kind": "mine"})
    assert status == 400 and "kind='mine'" in body["error"]


# ----------------------------------------------------------------------------------- the command
def test_the_command_needs_tornado_before_loading_the_model(monkeypatch, capsys):
    import builtins

    from npgpt2 import cli

    real = builtins.__import__

    def no_tornado(name, *args, **kwargs):
        if name == "tornado" or name.startswith("tornado."):
            raise ImportError("No module named 'tornado'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tornado)
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded before the check"))
    assert cli.main(["inspect", "--no-browser"]) == 2
    assert "pip install 'npgpt2[inspect]'" in capsys.readouterr().err


def test_the_command_refuses_a_harvest_that_is_not_a_folder(tmp_path, capsys):
    from npgpt2 import cli

    assert cli.main(["inspect", "--no-browser", "--harvest", str(tmp_path / "none")]) == 2
    assert "--harvest" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def open_page(browser, server, size=(1280, 900)):
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" and "400" not in m.text else None)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']")
    return page


def analyse(page, prompt=CLEAN, target=" Mary", distractor=" John", corrupted=CORRUPTED):
    page.fill("#prompt", prompt)
    page.fill("#target", target)
    page.fill("#distractor", distractor)
    page.fill("#corrupted", corrupted)
    page.click("#run")
    page.wait_for_function("document.querySelectorAll('#tokens .token').length > 0 && !document.body.classList.contains('busy')")


def snap(page, name):
    os.makedirs(SCREENSHOTS, exist_ok=True)
    path = os.path.join(SCREENSHOTS, f"inspect-{name}.png")
    page.screenshot(path=path, full_page=True)
    return path


def set_range(page, selector, value):
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", value)


def view(page, name):
    page.click(f"#tabs button[data-view={name}]")
    page.wait_for_function("!document.body.classList.contains('busy')")


def intervention_change(page):
    """The change the page shows once the interventions asked for have their answer."""
    page.wait_for_function("document.querySelector('#int-change') && !document.body.classList.contains('busy')")
    return page.inner_text("#int-change")


def choose_head(page, layer, head):
    """The attention view, the layer chosen and drawn, then the head."""
    view(page, "attention")
    page.select_option("#attn-layer", str(layer))
    page.wait_for_function(f"document.querySelector('#head-grid .head span').textContent === 'L{layer}H0'")
    page.click(f"#head-grid .head[data-head='{head}']")
    page.wait_for_function(f"document.querySelector('#head-title').textContent.startsWith('L{layer}H{head}:') && "
                           "!document.body.classList.contains('busy')")


def test_page_type_a_prompt_and_see_its_tokens(browser, server, model):
    page = open_page(browser, server)
    analyse(page)
    shown = page.locator("#tokens .token").all_inner_texts()
    from npgpt2.style import token_label

    assert shown == [token_label(t) for t in model.to_str_tokens(tokens_of(model, CLEAN))]
    assert page.inner_text("#metric-value") == f"{metric_by_hand(model, model(tokens_of(model, CLEAN))):.4f}"
    snap(page, "prompt")
    view(page, "layers")
    assert page.locator("#hooks tr").count() > 10
    snap(page, "layers")
    assert page.errors == []
    page.close()


def test_page_choose_a_head_and_see_its_pattern(browser, server, model):
    page = open_page(browser, server)
    analyse(page)
    choose_head(page, 1, 2)
    n = tokens_of(model, CLEAN).shape[1]
    assert page.locator("#pattern .cell").count() == n * n
    assert page.locator("#pattern .key").all_inner_texts()[2] == "\u2423Mary"
    page.hover("#pattern .cell[data-q='5'][data-k='2']")
    _, cache = model.run_with_cache(tokens_of(model, CLEAN))
    value = cache["blocks.1.attn.hook_pattern"][0, 2, 5, 2]
    assert page.inner_text("#attn-readout").endswith(f": {value:.4f}")
    assert "L1H2" in page.inner_text("#head-title")
    snap(page, "attention")
    assert page.errors == []
    page.close()


def test_page_a_long_prompts_pattern_is_a_canvas_that_reads_under_the_pointer(browser, server, model):
    prompt = " ".join(["the cat sat on the mat and looked at the dog"] * 5)
    page = open_page(browser, server)
    analyse(page, prompt=prompt, target="", distractor="", corrupted="")
    choose_head(page, 0, 1)
    canvas = page.locator("#pattern canvas")
    box = canvas.bounding_box()
    n = tokens_of(model, prompt).shape[1]
    q, k = n - 1, n - 12  # the pointer in the middle of that cell
    canvas.hover(position={"x": (k + 0.5) * box["width"] / n, "y": (q + 0.5) * box["height"] / n})
    _, cache = model.run_with_cache(tokens_of(model, prompt))
    assert page.inner_text("#attn-readout").startswith(f"query {q} ")
    from npgpt2.style import token_label

    key = token_label(model.to_str_tokens(tokens_of(model, prompt))[k])
    assert page.inner_text("#attn-readout").endswith(f"key {k} {key}: {cache['pattern', 0][0, 1, q, k]:.4f}")
    assert page.locator("#pattern .cell").count() == 0 and page.errors == []
    snap(page, "attention-long")
    page.close()


def test_page_ablate_a_head_and_read_the_change_run_with_hooks_gives(browser, server, model):
    page = open_page(browser, server)
    analyse(page)
    choose_head(page, 1, 2)
    page.click("#ablate-head")
    shown = intervention_change(page)
    tokens = tokens_of(model, CLEAN)
    change = metric_by_hand(model, model.run_with_hooks(tokens, fwd_hooks=[zero_head(1, 2)])) - \
        metric_by_hand(model, model(tokens))
    assert shown == f"{change:.4f}"
    assert page.locator("#active-interventions li").all_inner_texts()[0].startswith("zero L1H2")
    snap(page, "interventions")
    page.click("#active-interventions .remove")  # removing it: no change left
    page.wait_for_function("document.querySelectorAll('#active-interventions li').length === 0 && "
                           "!document.body.classList.contains('busy')")
    assert page.inner_text("#int-change") == "0.0000"
    assert page.errors == []
    page.close()


def test_page_patch_from_the_corrupted_prompt_and_read_the_change(browser, server, model):
    page = open_page(browser, server)
    analyse(page)
    view(page, "components")
    page.wait_for_selector("#components tr[data-component='L0H1']")
    snap(page, "components")
    page.click("#components tr[data-component='L0H1'] button[data-method='patch']")
    shown = intervention_change(page)
    _, corrupted = model.run_with_cache(tokens_of(model, CORRUPTED))

    def patch(z, point):
        z = z.copy()
        z[:, :, 1] = corrupted["blocks.0.attn.hook_z"][:, :, 1]
        return z

    tokens = tokens_of(model, CLEAN)
    change = metric_by_hand(model, model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", patch)])) - \
        metric_by_hand(model, model(tokens))
    assert shown == f"{change:.4f}"
    assert page.errors == []
    page.close()


def test_page_sorts_the_components(browser, server):
    page = open_page(browser, server)
    analyse(page)
    view(page, "components")
    page.wait_for_selector("#components tr[data-component]")
    for descending in (True, False):  # each click on the header turns the order round
        page.click("#components th[data-key='component']")
        names = page.locator("#components tr[data-component] td:first-child").all_inner_texts()
        assert names == sorted(names, reverse=descending)
    page.close()


def test_two_pages_at_once_get_their_own_results(browser, server, model):
    pages = [open_page(browser, server), open_page(browser, server)]
    other = "When Tom and Kate went to the park, Kate gave a ball to"
    other_corrupted = "When Sam and Lily went to the park, Emma gave a ball to"
    analyse(pages[0])
    analyse(pages[1], prompt=other, target=" Tom", distractor=" Kate", corrupted=other_corrupted)
    for p in pages:
        view(p, "interventions")
        p.fill("#int-component", "L1H2")
    for p in pages:  # each page shows its empty list's result first: the clicks must take it away
        assert intervention_change(p) == "0.0000"
    for p in pages:  # both clicks before either answer is read
        p.click("#int-add")  # the page takes its last result away within the click
    shown = [intervention_change(p) for p in pages]
    expected = []
    for prompt, target, distractor in ((CLEAN, " Mary", " John"), (other, " Tom", " Kate")):
        tokens = tokens_of(model, prompt)
        t, d = model.to_single_token(target), model.to_single_token(distractor)
        before, after = model(tokens), model.run_with_hooks(tokens, fwd_hooks=[zero_head(1, 2)])
        expected.append(f"{(after[0, -1, t] - after[0, -1, d]) - (before[0, -1, t] - before[0, -1, d]):.4f}")
    assert shown == expected and expected[0] != expected[1]
    for p in pages:
        assert p.errors == []
        p.close()


def test_page_bad_input_shows_a_message_and_the_page_goes_on(browser, server):
    page = open_page(browser, server)
    page.fill("#prompt", CLEAN)
    page.fill("#target", " Marygold-unknownish")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    assert "Marygold-unknownish" in page.inner_text("#error")
    snap(page, "error")
    page.fill("#prompt", "")
    page.click("#run")
    page.wait_for_function("document.querySelector('#error').textContent.includes('empty')")
    analyse(page)
    assert page.is_hidden("#error") and page.locator("#tokens .token").count() > 0
    page.close()


def test_page_circuit_with_progress_and_threshold(browser, server):
    page = open_page(browser, server)
    analyse(page)
    view(page, "circuit")
    page.click("#circuit-run")
    page.wait_for_function("document.querySelector('#circuit-state').textContent === 'done'", timeout=120_000)
    before = page.locator("#circuit-edges tr").count()
    set_range(page, "#threshold", 0)
    after = page.locator("#circuit-edges tr").count()
    assert after > before > 1 and page.locator("#circuit-graph line").count() > 0
    set_range(page, "#threshold", 500)
    snap(page, "circuit")
    assert page.errors == []
    page.close()


# ----------------------------------------------------------------------------------- harvest, SAE, command
def test_harvest_pages_are_served_with_the_token(model, tmp_path, browser):
    pytest.importorskip("pyarrow", reason="the harvest writes Parquet (pip install -e '.[test]')")
    from npgpt2.harvest import harvest
    from test_harvest import HOOK, KW, TEXTS

    h = harvest(TEXTS, model, HOOK, out=str(tmp_path / "h"), shard_contexts=8, **KW)
    s = Server(model, port=0, harvest=h).start_in_thread()
    try:
        status, info = call(s, "GET", "/api/info")
        assert status == 200 and info["harvest"]["hook"] == HOOK
        fired = int(h.features[h.features["fire_count"] > 0]["feature"].iloc[0])
        status, page = call(s, "GET", f"/harvest/feature-{fired}.html")
        assert status == 200 and f"<title>{HOOK} neuron {fired}</title>" in page.decode()
        status, index = call(s, "GET", "/harvest/index.html")
        assert status == 200 and f"feature-{fired}.html" in index.decode()
        assert call(s, "GET", f"/harvest/feature-{fired}.html", token=False)[0] == 401
        missing = int(h.features["feature"].max()) + 1
        status, body = call(s, "GET", f"/harvest/feature-{missing}.html")
        assert status == 404 and f"feature {missing} is not in the harvest" in body["error"]
        page = open_page(browser, s)  # the page's Dashboards tab shows the index, the cookie letting it in
        assert page.is_visible("#tab-dashboards")
        view(page, "dashboards")
        page.frame_locator("#dashboards").locator(f"a[href='feature-{fired}.html']").first.wait_for()
        snap(page, "dashboards")
        assert page.errors == []
        page.close()
    finally:
        s.stop()


def test_an_sae_latent_is_ablated_along_its_decoder_direction(model):
    from npgpt2.sae import SAE

    rng = np.random.default_rng(0)
    d, n = model.cfg.d_model, 32
    sae = SAE(W_enc=rng.standard_normal((d, n)).astype(np.float32) * 0.3, b_enc=np.full(n, 0.1, np.float32),
              W_dec=rng.standard_normal((n, d)).astype(np.float32) * 0.3, b_dec=np.zeros(d, np.float32),
              hook_name="blocks.1.hook_resid_pre")
    inspector = Inspector(model, sae=sae)
    tokens = tokens_of(model, CLEAN)
    _, cache = model.run_with_cache(tokens)
    f = np.maximum(cache["blocks.1.hook_resid_pre"] @ sae.W_enc + sae.b_enc, 0)  # [1, pos, n]
    latent = int(f[0].sum(0).argmax())  # the busiest latent on this prompt

    def hook(act, point):  # the latent's activation to 0: its decoder direction removed where it fired
        return act - f[..., latent, None] * sae.W_dec[latent]

    expected = metric_by_hand(model, model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", hook)]))
    r = inspector.intervene({**REQUEST, "interventions": [{"component": f"S{latent}", "method": "zero"}]})
    assert r["after"] == pytest.approx(expected, abs=1e-4) and abs(r["change"]) > 1e-4
    rows = {row["component"]: row for row in inspector.components({**REQUEST, "method": "zero"})["rows"]}
    assert rows[f"S{latent}"]["type"] == "latent" and rows[f"S{latent}"]["direct"] is None
    with pytest.raises(ValueError, match=f"latent {n} is out of range 0..{n - 1}"):
        inspector.intervene({**REQUEST, "interventions": [{"component": f"S{n}"}]})


def test_the_command_prints_a_url_that_answers(tiny_dir):
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "npgpt2", "inspect", "-m", tiny_dir, "--port", "0", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().startswith("npgpt2 inspect:")
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url, url
        port = int(url.split(":")[2].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/info?token=" + url.split("token=")[1], headers={"Host": f"127.0.0.1:{port}"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["n_layer"] == 2
        conn.request("GET", "/api/info", headers={"Host": f"127.0.0.1:{port}"})
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_command_says_when_the_port_is_taken(tiny_dir, capsys):
    import socket

    from npgpt2 import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["inspect", "-m", tiny_dir, "--port", str(port), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port 0" in err
